"""Ids past the tokenizer's (the embedding table's padding rows) are never sampled nor listed."""

import itertools

import pytest
import torch

from server.engine.request import GenerationRequest, SamplingParams
from server.engine.sampler import Sampler
from server.engine.sequence import Sequence

VOCAB, NUM_TOKENS = 96, 80  # rows of logits; ids with a token
_seq_ids = itertools.count()


def _seq(sampler: Sampler, params: SamplingParams) -> Sequence:
    seq_id = next(_seq_ids)
    seq = Sequence(seq_id, GenerationRequest(f"r{seq_id}", [1, 2], params), 0, 100, (0,), detokenizer=None)
    seq.sampling = sampler.new_state(params, [1, 2], 0)
    return seq


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, logprobs=5),
    SamplingParams(temperature=1.0, seed=3, logprobs=5),
    SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=4, logprobs=5),
], ids=["greedy", "sampled", "top-p-top-k"])
def test_ids_without_a_token_are_never_sampled_nor_listed(params):
    sampler = Sampler(VOCAB, torch.device("cpu"), eos_token_ids=(0,), num_token_ids=NUM_TOKENS)
    seqs = [_seq(sampler, params) for _ in range(64)]
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, VOCAB, generator=generator)
    logits[:, NUM_TOKENS:] += 8.0  # the padding rows would win almost every draw
    out = sampler.sample(logits, seqs)
    assert out.token_ids.max() < NUM_TOKENS
    assert out.top_ids.max() < NUM_TOKENS
