"""The batch invariant (`model.batch.check_batch`): every block table covers its context lengths
and names blocks of the cache. It is on in every test (tests/conftest.py), so these tests show
that it runs on every forward step of an engine, that the memory profile's step keeps it, and
that it catches the batches that would send a kernel past its inputs."""

from dataclasses import replace

import pytest
import torch

from model import batch as batches
from model.batch import ForwardBatch, check_batch
from model.qwen3 import Qwen3Model
from server.engine.config import EngineConfig, resolve_config
from server.engine.core import EngineCore
from server.engine.memory import profile_step
from server.engine.piecewise_graph import PiecewiseGraphRunner
from server.engine.request import GenerationRequest, SamplingParams
from tests.kernels.common import kernel_backend
from tests.server.engine.test_engine import demo, random_prompts  # noqa: F401  (demo is a fixture)


def test_batch_checks_are_on_in_tests():
    assert batches.CHECK_BATCHES


def test_the_memory_profile_step_covers_its_context_and_runs_the_triton_kernels_in_bounds(demo):
    model, _ = demo
    batch, kv_cache = profile_step(model, block_size=16, max_num_batched_tokens=100, max_num_seqs=4)
    check_batch(batch, *kv_cache[0][0].shape[:2])
    assert batch.block_tables.shape == (1, 7)  # cdiv(100, 16) entries, all block 0 of a one-block cache
    one_wide = replace(batch, block_tables=batch.block_tables[:, :1])  # the profile's table before the fix
    with pytest.raises(AssertionError, match="a context of 100 tokens needs 7 blocks of 16, its block table has 1"):
        check_batch(one_wide, 1, 16)
    with kernel_backend("auto,prefill_attention=triton"):  # the paged prefill kernel, through the interpreter
        logits = model.forward(batch, kv_cache)
    assert logits.shape == (4, model.config.vocab_size) and torch.isfinite(logits).all()


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "replayed-steps"])
def test_every_forward_step_of_an_engine_run_is_checked(demo, monkeypatch, enforce_eager):
    model, tokenizer = demo
    checked, forwards = [], []
    monkeypatch.setattr(batches, "check_batch", lambda batch, *cache: (checked.append(batch), check_batch(batch, *cache)))
    forward = Qwen3Model.forward
    monkeypatch.setattr(Qwen3Model, "forward", lambda self, batch, cache: (forwards.append(batch), forward(self, batch, cache))[1])
    pieces = PiecewiseGraphRunner.forward  # steps with prompt tokens, replayed: no Qwen3Model.forward
    monkeypatch.setattr(PiecewiseGraphRunner, "forward",
                        lambda self, batch, bucket: (forwards.append(batch), pieces(self, batch, bucket))[1])
    # A small token budget and cache: chunked prompts, mixed steps, preemption.
    config = resolve_config(EngineConfig(num_kv_blocks=12, max_num_batched_tokens=40, max_num_seqs=4,
                                         enforce_eager=enforce_eager), model)
    core = EngineCore(model, tokenizer, config)
    for i, prompt in enumerate(random_prompts(5, seed=3, lengths=(10, 70))):
        core.add_request(GenerationRequest(f"r{i}", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)))
    while core.has_work():
        for _, output in core.step():
            assert not isinstance(output, Exception), output
    assert checked == forwards and len(forwards) > 12
    assert any(0 < b.num_decodes < len(b.query_lens) for b in forwards), "no mixed step was checked"


def _batch(context_lens: list[int], width: int, query_lens: list[int], slot: int = 3) -> ForwardBatch:
    tokens = sum(query_lens)
    return ForwardBatch(
        token_ids=torch.zeros(tokens, dtype=torch.int64), positions=torch.zeros(tokens, dtype=torch.int64),
        slot_mapping=torch.full((tokens,), slot, dtype=torch.int64),
        block_tables=torch.arange(len(context_lens) * width, dtype=torch.int32).view(-1, width),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        query_start_loc=torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32),
        query_lens=query_lens, logits_indices=torch.tensor([tokens - 1]),
    )


def test_check_batch_names_what_would_be_read_out_of_bounds():
    check_batch(_batch([17, 32], 2, [1, 5]), num_blocks=4, block_size=16)
    with pytest.raises(AssertionError, match="sequence 1: a context of 33 tokens needs 3 blocks"):
        check_batch(_batch([17, 33], 2, [1, 5]), num_blocks=4, block_size=16)
    with pytest.raises(AssertionError, match=r"sequence 1: block ids \[2, 3\] outside a cache of 3 blocks"):
        check_batch(_batch([17, 32], 2, [1, 5]), num_blocks=3, block_size=16)
    with pytest.raises(AssertionError, match="a slot outside the cache"):
        check_batch(_batch([17, 32], 2, [1, 5], slot=64), num_blocks=4, block_size=16)
    with pytest.raises(AssertionError, match="shorter than its"):
        check_batch(_batch([17, 3], 2, [1, 5]), num_blocks=4, block_size=16)
