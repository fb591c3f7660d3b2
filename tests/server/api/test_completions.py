"""`/v1/completions` on a live server: text equals transformers' greedy text for the same prompt."""

import torch
from transformers import Qwen3ForCausalLM

from model.tokenizer import Tokenizer

PROMPT = "The capital of France is"


def test_greedy_text_equals_hf_greedy_text(client, server, chat_checkpoint):
    tokenizer = Tokenizer(chat_checkpoint)
    hf = Qwen3ForCausalLM.from_pretrained(chat_checkpoint, dtype=torch.float32).eval()
    prompt_ids = tokenizer.encode(PROMPT)
    generated = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False)[0, len(prompt_ids):]
    expected = tokenizer.decode(generated.tolist())
    assert expected.strip()

    completion = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=24, temperature=0)
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.choices[0].text == expected
    assert completion.usage.prompt_tokens == len(prompt_ids)
    assert completion.usage.completion_tokens == len(generated)


def test_stream_text_equals_non_stream_text(client, server):
    kwargs = dict(model=server.model, prompt=PROMPT, max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] \
        == [whole.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_default_max_tokens_is_16(client, server):
    completion = client.completions.create(model=server.model, prompt=PROMPT, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 16
    assert completion.choices[0].finish_reason == "length"


def test_token_id_prompts_and_many_prompts(client, server, chat_checkpoint):
    tokenizer = Tokenizer(chat_checkpoint)
    by_text = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model=server.model, prompt=tokenizer.encode(PROMPT), max_tokens=8,
                                       temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text

    other = "Once upon a time"
    alone = client.completions.create(model=server.model, prompt=other, max_tokens=8, temperature=0).choices[0].text
    both = client.completions.create(model=server.model, prompt=[[*tokenizer.encode(PROMPT)], tokenizer.encode(other)],
                                     max_tokens=8, temperature=0, n=2)
    # choice i * n + j is choice j of prompt i
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [by_text.choices[0].text] * 2 + [alone] * 2
    assert both.usage.prompt_tokens == len(tokenizer.encode(PROMPT)) + len(tokenizer.encode(other))


def test_echo_prepends_the_prompt(client, server):
    plain = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, temperature=0).choices[0].text
    echoed = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain
    streamed = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=5, temperature=0, echo=True,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == PROMPT + plain


def test_logprobs_columns(client, server):
    completion = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0,
                                           logprobs=3, extra_body={"ignore_eos": True})
    choice = completion.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert all(len(top) <= 3 for top in logprobs.top_logprobs)
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert logprob <= 0 and max(top.values()) == logprob  # greedy takes the most likely token
    offsets = logprobs.text_offset
    assert offsets[0] == 0 and all(b == a + len(t) for a, b, t in zip(offsets, offsets[1:], logprobs.tokens))
    streamed = client.completions.create(model=server.model, prompt=PROMPT, max_tokens=6, temperature=0,
                                         logprobs=3, stream=True, extra_body={"ignore_eos": True})
    chunks = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for lp in chunks for t in lp.tokens] == logprobs.tokens
    assert [o for lp in chunks for o in lp.text_offset] == offsets
