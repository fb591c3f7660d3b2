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
