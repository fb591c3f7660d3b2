"""The demo checkpoint's tokenizer is Qwen3's, and its chat template renders Qwen3's format."""

import pytest
import torch
from transformers import AutoTokenizer, Qwen3ForCausalLM

from model.demo import demo_checkpoint
from model.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(demo_dir):
    return Tokenizer(demo_dir)


def test_known_token_ids(tokenizer):
    assert tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>") == [151644, 872, 198, 6023, 151645]
    assert tokenizer.encode("<think>\n\n</think>\n\n") == [151667, 271, 151668, 271]
    assert tokenizer.eos_token_ids == (151645, 151643)


def test_round_trips_multibyte_text(tokenizer):
    text = "naïve café — 你好，世界 😀🚀 \t\n  spaces"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens_skipped_but_think_kept(tokenizer):
    ids = tokenizer.encode("<think>x</think>y<|im_end|>")
    assert tokenizer.decode(ids) == "<think>x</think>y"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<think>x</think>y<|im_end|>"


GOLDEN = [
    ([{"role": "user", "content": "hi"}], {}, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"),
    (
        [{"role": "user", "content": "hi"}],
        {"enable_thinking": False},
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    ),
    (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        {},
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        {},
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        {"add_generation_prompt": False},
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nhello<|im_end|>\n",
    ),
]


@pytest.mark.parametrize("messages,kwargs,expected", GOLDEN, ids=["plain", "no-thinking", "system", "multi-turn", "no-gen-prompt"])
def test_chat_template_golden(tokenizer, messages, kwargs, expected):
    assert tokenizer.apply_chat_template(messages, **kwargs) == expected


def test_reasoning_kept_after_last_user_turn(tokenizer):
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning_content": "r"},
        {"role": "tool", "content": "result"},
    ]
    assert tokenizer.apply_chat_template(messages) == (
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\nr\n</think>\n\na<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nresult\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_demo_loads_in_transformers(demo_dir):
    hf_tokenizer = AutoTokenizer.from_pretrained(demo_dir)
    assert hf_tokenizer.encode("Hello, world!") == [9707, 11, 1879, 0]
    model = Qwen3ForCausalLM.from_pretrained(demo_dir)
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 128)
    assert not config.tie_word_embeddings and config.vocab_size == 151936  # its LM head is engineered (demo_weights)
    logits = model(torch.tensor([[9707, 11, 1879, 0]])).logits
    assert logits.shape == (1, 4, 151936) and torch.isfinite(logits).all()


def test_demo_build_is_deterministic(tmp_path, monkeypatch, demo_dir):
    monkeypatch.setenv("NANOSERVE_CACHE", str(tmp_path))
    rebuilt = demo_checkpoint()
    assert rebuilt != demo_dir
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (rebuilt / name).read_bytes() == (demo_dir / name).read_bytes(), name


# Tools in the chat template. Each expected string is what Qwen3's own template (the one in Qwen3's
# tokenizer_config.json) renders for the same messages and tools through transformers.
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "description": "What to look for"},
                                                    "top_k": {"type": "integer"}}, "required": ["query"]}}}
FETCH = {"type": "function", "function": {
    "name": "fetch", "description": "Fetch a page — its text, «as is».",
    "parameters": {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]}}}
TOOLS_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
SEARCH_LINE = (
    '{"type": "function", "function": {"name": "search", "description": "Search the web.", "parameters": '
    '{"type": "object", "properties": {"query": {"type": "string", "description": "What to look for"}, '
    '"top_k": {"type": "integer"}}, "required": ["query"]}}}\n'
)
FETCH_LINE = (
    '{"type": "function", "function": {"name": "fetch", "description": "Fetch a page — its text, «as is».", '
    '"parameters": {"type": "object", "properties": {"url": {"type": "string"}}, "required": ["url"]}}}\n'
)
TOOLS_OUTRO = (
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
)
BOTH_TOOLS = TOOLS_INTRO + SEARCH_LINE + FETCH_LINE + TOOLS_OUTRO


def _call(call_id: str, name: str, arguments) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_GOLDEN = [
    (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Find nanoserve."}],
        [SEARCH, FETCH],
        {},
        "<|im_start|>system\nBe brief.\n\n" + BOTH_TOOLS
        + "<|im_start|>user\nFind nanoserve.<|im_end|>\n<|im_start|>assistant\n",
    ),
    (
        [{"role": "user", "content": "hi"}],
        [SEARCH],
        {"enable_thinking": False},
        "<|im_start|>system\n" + TOOLS_INTRO + SEARCH_LINE + TOOLS_OUTRO
        + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    ),
    (  # a call with no text (content null, as OpenAI clients send it), then its result
        [
            {"role": "user", "content": "Find nanoserve."},
            {"role": "assistant", "content": None, "tool_calls": [_call("call_1", "search", '{"query": "nanoserve"}')]},
            {"role": "tool", "tool_call_id": "call_1", "content": "nanoserve is a small server."},
        ],
        [SEARCH, FETCH],
        {},
        "<|im_start|>system\n" + BOTH_TOOLS + "<|im_start|>user\nFind nanoserve.<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "search", "arguments": {"query": "nanoserve"}}\n</tool_call>'
        "<|im_end|>\n<|im_start|>user\n<tool_response>\nnanoserve is a small server.\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n",
    ),
    (  # text then two calls (arguments as an object and as a string), two results in one turn, a later user turn
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Compare a and b."},
            {"role": "assistant", "content": "Looking both up.", "reasoning_content": "Two searches.",
             "tool_calls": [_call("call_1", "search", {"query": "a", "top_k": 2}),
                            _call("call_2", "fetch", '{"url":"https://b.example"}')]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a: first"},
            {"role": "tool", "tool_call_id": "call_2", "content": "b: second"},
            {"role": "assistant", "content": "a is first, b second."},
            {"role": "user", "content": "Thanks."},
        ],
        [SEARCH, FETCH],
        {},
        "<|im_start|>system\nBe brief.\n\n" + BOTH_TOOLS + "<|im_start|>user\nCompare a and b.<|im_end|>\n"
        '<|im_start|>assistant\nLooking both up.\n<tool_call>\n{"name": "search", "arguments": {"query": "a", "top_k": 2}}'
        '\n</tool_call>\n<tool_call>\n{"name": "fetch", "arguments": {"url":"https://b.example"}}\n</tool_call>'
        "<|im_end|>\n<|im_start|>user\n<tool_response>\na: first\n</tool_response>\n<tool_response>\nb: second\n"
        "</tool_response><|im_end|>\n<|im_start|>assistant\na is first, b second.<|im_end|>\n"
        "<|im_start|>user\nThanks.<|im_end|>\n<|im_start|>assistant\n",
    ),
    (  # after the last user turn: the call turn has no reasoning, the final answer keeps its think block
        [
            {"role": "user", "content": "Fetch it."},
            {"role": "assistant", "content": "", "tool_calls": [_call("call_1", "fetch", {"url": "https://x.example"})]},
            {"role": "tool", "tool_call_id": "call_1", "content": "page"},
            {"role": "assistant", "content": "<think>\nread it\n</think>\n\nDone."},
        ],
        [SEARCH, FETCH],
        {"add_generation_prompt": False},
        "<|im_start|>system\n" + BOTH_TOOLS + "<|im_start|>user\nFetch it.<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "fetch", "arguments": {"url": "https://x.example"}}\n'
        "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\npage\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\nread it\n</think>\n\nDone.<|im_end|>\n",
    ),
]


@pytest.mark.parametrize("messages,tools,kwargs,expected", TOOL_GOLDEN,
                         ids=["system-and-tools", "one-tool-no-thinking", "round-trip", "parallel-calls", "after-last-user"])
def test_chat_template_renders_tools_as_qwen3_does(tokenizer, messages, tools, kwargs, expected):
    assert tokenizer.apply_chat_template(messages, tools=tools, **kwargs) == expected


def test_tool_call_tags_are_single_tokens(tokenizer):
    assert tokenizer.encode("<tool_call>\n</tool_call>") == [151657, 198, 151658]
    assert tokenizer.decode([151657, 151658]) == "<tool_call></tool_call>"  # not special: kept in the text
