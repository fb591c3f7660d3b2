"""Scoring a prompt: completions `echo` + `logprobs` return the prompt tokens' logprobs, equal to
log-softmax of transformers' logits (over the tokens that exist), and `max_tokens: 0` scores
without generating; the engine computes them across prefill chunks too."""

import asyncio

import pytest
import torch
from transformers import Qwen3ForCausalLM

from model.load import load_model
from model.tokenizer import Tokenizer
from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from server.engine.request import GenerationRequest, SamplingParams

PROMPT = "The quick brown fox jumps over the lazy dog, then naps; 你好 — the end of the story."
NUM_TOKENS = 151669


def hf_prompt_logprobs(checkpoint, prompt_ids: list[int]) -> torch.Tensor:
    """[len - 1, tokens]: row j is the log-distribution of token j + 1, over the tokens that exist."""
    hf = Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt_ids])).logits[0, :-1, :NUM_TOKENS]
    return logits.float().log_softmax(-1)


def test_echo_with_logprobs_scores_the_prompt_as_hf_does(client, server, chat_checkpoint):
    tokenizer = Tokenizer(chat_checkpoint)
    ids = tokenizer.encode(PROMPT)
    expected = hf_prompt_logprobs(chat_checkpoint, ids)
    scored = client.completions.create(model=server.model, prompt=PROMPT, echo=True, logprobs=5, max_tokens=0)
    [choice] = scored.choices
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert scored.usage.prompt_tokens == len(ids) and scored.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.tokens == [raw.decode(errors="replace") for raw in tokenizer.token_bytes(ids)]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset[0] == 0
    got = torch.tensor(lp.token_logprobs[1:])
    want = expected.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    for position, top in enumerate(lp.top_logprobs[1:]):
        values, top_ids = expected[position].topk(5)
        assert len(top) == 5
        assert sorted(top.values(), reverse=True) == pytest.approx(values.tolist(), abs=1e-4)
        assert set(top) == {raw.decode(errors="replace") for raw in tokenizer.token_bytes(top_ids.tolist())}


def test_echo_logprobs_lead_the_generated_ones_streamed_or_not(client, server):
    kwargs = dict(model=server.model, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                  extra_body={"ignore_eos": True})
    plain = client.completions.create(**kwargs).choices[0]
    echoed = client.completions.create(**kwargs, echo=True).choices[0]
    prompt_len = len(echoed.logprobs.tokens) - 4
    assert echoed.text == PROMPT + plain.text
    assert echoed.logprobs.tokens[prompt_len:] == plain.logprobs.tokens
    assert echoed.logprobs.token_logprobs[prompt_len:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)
    assert echoed.logprobs.text_offset[prompt_len] == len(PROMPT)
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, echo=True, stream=True) if c.choices]
    assert chunks[0].text == PROMPT and chunks[0].logprobs.token_logprobs[0] is None
    assert "".join(c.text for c in chunks) == echoed.text
    assert [t for c in chunks if c.logprobs for t in c.logprobs.tokens] == echoed.logprobs.tokens


def test_max_tokens_0_needs_echo(http, server):
    answer = http.post("/v1/completions", json={"model": server.model, "prompt": "hi", "max_tokens": 0})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "max_tokens"
    echoed = http.post("/v1/completions", json={"model": server.model, "prompt": "hi", "max_tokens": 0, "echo": True})
    assert echoed.json()["choices"][0]["text"] == "hi" and echoed.json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("chunk", [7, 2048])
def test_the_engine_scores_prompts_across_prefill_chunks(chat_checkpoint, chunk):
    tokenizer = Tokenizer(chat_checkpoint)
    ids = tokenizer.encode(PROMPT * 2)
    expected = hf_prompt_logprobs(chat_checkpoint, ids)
    engine = AsyncEngine(load_model(chat_checkpoint, "cpu"), tokenizer, chat_checkpoint,
                         EngineConfig(max_num_batched_tokens=max(chunk, 8), max_num_seqs=4))

    async def score():
        params = SamplingParams(n=2, temperature=0.0, max_tokens=3, prompt_logprobs=3, ignore_eos=True)
        assert not params.uses_prefix_cache
        outputs = [output async for output in engine.generate(GenerationRequest("scored", ids, params))]
        return outputs

    try:
        outputs = asyncio.run(score())
    finally:
        engine.shutdown()
    assert outputs[0].prompt_logprobs is not None and all(o.prompt_logprobs is None for o in outputs[1:])
    scored = outputs[0].prompt_logprobs
    assert [lp.token_id for lp in scored] == ids[1:]
    got = torch.tensor([lp.logprob for lp in scored])
    want = expected.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert [[t for t, _ in lp.top] for lp in scored] == expected.topk(3).indices.tolist()
    assert sum(o.completion_tokens for o in outputs[-1:]) == 6
