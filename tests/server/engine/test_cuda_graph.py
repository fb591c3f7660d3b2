"""CUDA-graph decode: buckets, padding, static buffers and slicing, checked against eager decode.

On CPU the graph runner replays its recorded step function over the same static buffers that a
CUDA graph reads, so everything here but the capture itself runs on CPU; the same tests run on
CUDA (real graphs) when a GPU is present.
"""

import asyncio
import gc
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from model.load import load_model
from model.tokenizer import Tokenizer
from server.engine import model_runner
from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig, resolve_config
from server.engine.cuda_graph import CaptureSummary, DecodeGraphRunner, graph_buckets
from server.engine.draft_model import DraftModel
from server.engine.model_runner import ModelRunner
from server.engine.request import GenerationRequest, SamplingParams
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.engine.speculative import SpeculativeConfig
from tests.conftest import load_test_model

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
BLOCK_SIZE = 16
EOS = (151645,)


def test_buckets_cover_every_batch_up_to_the_largest():
    assert graph_buckets(1) == [1]
    assert graph_buckets(3) == [1, 2, 3]
    assert graph_buckets(8) == [1, 2, 4, 8]
    assert graph_buckets(100) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100]
    assert graph_buckets(256)[-3:] == [224, 240, 256] and len(graph_buckets(256)) == 23


def test_a_batch_runs_in_the_smallest_bucket_that_holds_it(demo_dir):
    model = load_model(demo_dir, "cpu")
    runner = ModelRunner(model, _config(model, max_num_seqs=100, enforce_eager=False), EOS, model.config.vocab_size)
    graphs = runner._graphs
    assert [graphs.bucket_for(n) for n in (1, 2, 3, 5, 8, 9, 64, 65, 97, 100)] == [1, 2, 4, 8, 8, 16, 64, 80, 100, 100]
    assert graphs.bucket_for(101) is None


def test_capture_summary_is_the_startup_line():
    summary = CaptureSummary([1, 2, 4], 1.234, 3 << 29, [8, 16])
    assert summary.describe(torch.device("cuda")) == (
        "CUDA graphs for 3 batch sizes (1-4) in 1.2 s, 1.50 GiB of GPU memory; "
        "larger batches run eagerly (16 did not fit in memory)"
    )
    recorded = CaptureSummary([1, 2, 4, 8], 0.01, 0, [])
    assert recorded.describe(torch.device("cpu")) == "recorded decode steps (CPU replay) for 4 batch sizes (1-8) in 0.0 s"
    verifying = CaptureSummary([1, 2, 4, 8], 2.5, 1 << 30, [], 5, [1, 2], [4, 8])
    assert verifying.describe(torch.device("cuda")) == (
        "CUDA graphs for 4 batch sizes (1-8) and verification steps of 5 tokens for 2 (1-2) in 2.5 s, "
        "1.00 GiB of GPU memory; larger verifications run eagerly (8 did not fit in memory)"
    )


def test_graphs_are_the_default_on_cuda_and_eager_on_cpu():
    def model(device: str):
        return SimpleNamespace(device=torch.device(device), config=SimpleNamespace(max_position_embeddings=4096))

    sized = EngineConfig(num_kv_blocks=64)
    assert resolve_config(sized, model("cpu")).enforce_eager is True
    assert resolve_config(sized, model("cuda")).enforce_eager is False
    assert resolve_config(replace(sized, enforce_eager=False), model("cpu")).enforce_eager is False
    assert resolve_config(replace(sized, enforce_eager=True), model("cuda")).enforce_eager is True


def _config(model, **fields) -> EngineConfig:
    return resolve_config(EngineConfig(block_size=BLOCK_SIZE, num_kv_blocks=64, max_model_len=512, **fields), model)


class _Pool:
    """Decoding sequences with random histories and block tables, stepped as the engine steps them."""

    def __init__(self, runner: ModelRunner, count: int, num_blocks: int, seed: int):
        self.rng = random.Random(seed)
        self.free = list(range(num_blocks))
        self.rng.shuffle(self.free)
        self.seqs = []
        for seq_id in range(count):
            prompt = [self.rng.randrange(151643) for _ in range(self.rng.randrange(2, 40))]
            params = SamplingParams(temperature=0.0, logprobs=5, max_tokens=100)
            seq = Sequence(seq_id, GenerationRequest(f"r{seq_id}", prompt, params), 0, 100, EOS, detokenizer=None)
            seq.sampling = runner.sampler.new_state(params, prompt, 0)
            seq.num_cached = seq.num_tokens - 1  # as if prefilled but for its newest token
            seq.block_table = [self.free.pop() for _ in range(-(-seq.num_tokens // BLOCK_SIZE))]
            self.seqs.append(seq)

    def batch(self, size: int) -> ScheduledBatch:
        seqs = self.rng.sample(self.seqs, size)
        return ScheduledBatch(seqs, [1] * size, num_decodes=size)

    def advance(self, batch: ScheduledBatch, tokens: list[int]) -> None:
        for seq, token in zip(batch.seqs, tokens):
            seq.num_cached += 1
            seq.token_ids.append(token)
            if seq.num_tokens > len(seq.block_table) * BLOCK_SIZE:
                seq.block_table.append(self.free.pop())


def _runners(model) -> tuple[ModelRunner, ModelRunner]:
    """An eager runner and a graph runner over one model, their caches holding the same random K/V."""
    eager = ModelRunner(model, _config(model, max_num_seqs=8, enforce_eager=True), EOS, model.config.vocab_size)
    graphs = ModelRunner(model, _config(model, max_num_seqs=8, enforce_eager=False), EOS, model.config.vocab_size)
    for (k1, v1), (k2, v2) in zip(eager.kv_cache, graphs.kv_cache):
        for a, b in ((k1, k2), (v1, v2)):
            a.copy_(torch.randn_like(a))
            b.copy_(a)
    return eager, graphs


def _slots(batch: ScheduledBatch) -> list[int]:
    return [seq.block_table[(seq.num_tokens - 1) // BLOCK_SIZE] * BLOCK_SIZE + (seq.num_tokens - 1) % BLOCK_SIZE
            for seq in batch.seqs]


def _flat(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(-1, *cache.shape[2:])


def _assert_only_written(before: list, after: list, reference: list, written: torch.Tensor, tolerance: float) -> None:
    """Cache slots `written` hold the reference's K/V (within `tolerance`); every other slot is
    bit-identical to `before` (padding rows stored nothing)."""
    untouched = torch.ones(before[0][0].shape[0] * BLOCK_SIZE, dtype=torch.bool, device=written.device)
    untouched[written] = False
    for (k0, v0), (k, v), (ke, ve) in zip(before, after, reference):
        for old, new, expected in ((k0, k, ke), (v0, v, ve)):
            assert torch.equal(_flat(new)[untouched], _flat(old)[untouched])
            torch.testing.assert_close(_flat(new)[written], _flat(expected)[written], rtol=tolerance, atol=tolerance)


# (logprobs, K/V) tolerances between a replayed and an eager step: fp32 on CPU, bf16 on CUDA, where
# a padded batch may take another matmul algorithm.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (3e-2, 1.6e-2)}


def _assert_same_step(eager_out, graph_out, logprob_tolerance: float) -> None:
    assert [token for token, _ in graph_out] == [token for token, _ in eager_out]
    for (_, e), (_, g) in zip(eager_out, graph_out):
        assert g.logprob == pytest.approx(e.logprob, abs=logprob_tolerance)
        assert [t for t, _ in g.top] == [t for t, _ in e.top]
        assert [lp for _, lp in g.top] == pytest.approx([lp for _, lp in e.top], abs=logprob_tolerance)


@pytest.mark.parametrize("device", DEVICES)
def test_replayed_decode_equals_eager_and_padding_leaves_the_cache_alone(demo_dir, device):
    """Batch sizes that shrink and grow, so that padding rows sit where real rows of an earlier,
    larger batch were: every step gives eager's tokens and logprobs, writes eager's K/V to its
    own slots, and leaves every other cache slot bit-identical."""
    torch.manual_seed(0)
    model = load_test_model(demo_dir, device)
    logprob_tolerance, kv_tolerance = TOLERANCES[model.dtype]
    eager, graphs = _runners(model)
    assert eager._graphs is None and graphs._graphs.buckets == [1, 2, 4, 8]
    pool = _Pool(graphs, count=10, num_blocks=64, seed=1)
    for size in (8, 3, 5, 1, 2, 7, 4, 6, 8, 1):
        batch = pool.batch(size)
        before = [(k.clone(), v.clone()) for k, v in graphs.kv_cache]
        expected = eager.run(batch)
        got = graphs.run(batch)
        _assert_same_step(expected, got, logprob_tolerance)
        written = torch.tensor(_slots(batch), device=device)
        _assert_only_written(before, graphs.kv_cache, eager.kv_cache, written, kv_tolerance)
        pool.advance(batch, [token for token, _ in got])


def test_batches_above_the_largest_captured_bucket_run_eagerly(demo_dir, monkeypatch):
    """As when memory caps the buckets: a batch of 3 over buckets [1, 2] runs eagerly, right."""
    monkeypatch.setattr(model_runner, "graph_buckets", lambda max_batch: [1, 2])
    model = load_model(demo_dir, "cpu")
    eager, graphs = _runners(model)
    replayed = []
    replay = DecodeGraphRunner.replay
    monkeypatch.setattr(DecodeGraphRunner, "replay", lambda self, *args: replayed.append(args) or replay(self, *args))
    pool = _Pool(graphs, count=4, num_blocks=64, seed=2)
    for size in (3, 2, 3, 1):
        batch = pool.batch(size)
        expected = eager.run(batch)
        got = graphs.run(batch)
        _assert_same_step(expected, got, TOLERANCES[model.dtype][0])
        pool.advance(batch, [token for token, _ in got])
    assert replayed == [(2, 2, 1), (1, 1, 1)]


def _greedy_outputs(model, demo_dir, prompts, max_tokens, **config) -> tuple[list[list[int]], str]:
    engine = AsyncEngine(model, Tokenizer(demo_dir), demo_dir, EngineConfig(**config))

    async def one(i: int, prompt: list[int]) -> list[int]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens[i], ignore_eos=True)
        tokens = []
        async for output in engine.generate(GenerationRequest(f"g{i}", prompt, params)):
            tokens += output.choices[0].token_ids
        return tokens

    async def main():
        return await asyncio.gather(*(one(i, prompt) for i, prompt in enumerate(prompts)))

    try:
        return asyncio.run(main()), engine.decode_mode
    finally:
        engine.shutdown()


@pytest.mark.parametrize("device", DEVICES)
# Sizes given, so that CUDA runs the CPU defaults rather than a cache filling the GPU.
@pytest.mark.parametrize("config", [{"num_kv_blocks": 1024, "max_num_seqs": 8},
                                    {"num_kv_blocks": 12, "max_num_seqs": 8, "max_num_batched_tokens": 40}],
                         ids=["normal-cache", "tiny-cache"])
def test_greedy_tokens_are_the_same_with_graphs_and_with_enforce_eager(demo_dir, device, config):
    """Concurrent requests of different lengths (the batch shrinks as they finish; the tiny cache
    preempts and recomputes) give the same tokens through graphs as eagerly."""
    model = load_test_model(demo_dir, device)
    rng = random.Random(4)
    prompts = [[rng.randrange(151643) for _ in range(rng.randrange(3, 50))] for _ in range(7)]
    max_tokens = [rng.randrange(4, 30) for _ in prompts]
    eager, eager_mode = _greedy_outputs(model, demo_dir, prompts, max_tokens, enforce_eager=True, **config)
    graphs, graph_mode = _greedy_outputs(model, demo_dir, prompts, max_tokens, enforce_eager=False, **config)
    assert graphs == eager
    assert [len(tokens) for tokens in graphs] == max_tokens
    assert eager_mode.startswith("eager decode")
    assert graph_mode.startswith("CUDA graphs" if device == "cuda" else "recorded decode steps (CPU replay)")


def test_capture_runs_with_the_garbage_collector_frozen(demo_dir, monkeypatch):
    model = load_model(demo_dir, "cpu")
    frozen_during = []
    capture = DecodeGraphRunner._capture
    monkeypatch.setattr(DecodeGraphRunner, "_capture", lambda self: frozen_during.append(gc.get_freeze_count()) or capture(self))
    runner = ModelRunner(model, _config(model, max_num_seqs=2, enforce_eager=False), EOS, model.config.vocab_size)
    assert runner._graphs is not None and frozen_during[0] > 0  # every object alive at the start is frozen
    assert gc.get_freeze_count() == 0  # and the collector has them back once capture ends


# ---- verification steps (speculative decoding): graphs keyed by (bucket, 1 + k) ----

K = 3  # drafts per step: verification graphs of 1 + K tokens a sequence


def _verify_runners(model) -> tuple[ModelRunner, ModelRunner]:
    """`_runners` for a server speculating with K drafts: the graph runner also holds verification graphs."""
    spec = SpeculativeConfig("ngram", K, disable_by_batch_size=8)
    eager = ModelRunner(model, _config(model, max_num_seqs=8, enforce_eager=True, speculative_config=spec), EOS,
                        model.config.vocab_size)
    graphs = ModelRunner(model, _config(model, max_num_seqs=8, enforce_eager=False, speculative_config=spec), EOS,
                         model.config.vocab_size)
    for (k1, v1), (k2, v2) in zip(eager.kv_cache, graphs.kv_cache):
        for a, b in ((k1, k2), (v1, v2)):
            a.copy_(torch.randn_like(a))
            b.copy_(a)
    return eager, graphs


def _verify_batch(pool: _Pool, size: int) -> ScheduledBatch:
    """`size` decoding sequences, most bringing 1..K drafts (random tokens, some the sequence's own
    last token so that a few are accepted), the plain decodes first, as the scheduler orders them."""
    seqs = pool.rng.sample(pool.seqs, size)
    drafts = [[] if pool.rng.random() < 0.3 else
              [pool.rng.choice([seq.token_ids[-1], pool.rng.randrange(151643)]) for _ in range(pool.rng.randint(1, K))]
              for seq in seqs]
    order = sorted(range(size), key=lambda i: bool(drafts[i]))
    batch = ScheduledBatch(num_decodes=sum(not draft for draft in drafts))
    for i in order:
        seq = seqs[i]
        while seq.num_tokens + len(drafts[i]) > len(seq.block_table) * BLOCK_SIZE:
            seq.block_table.append(pool.free.pop())
        batch.add(seq, 1 + len(drafts[i]), drafts[i])
    return batch


def _pairs(results: list) -> list[tuple]:
    """A step's results, (token, logprob) after (token, logprob): a verified window's in order."""
    return [pair for result in results for pair in (result if isinstance(result, list) else [result])]


def _window_slots(batch: ScheduledBatch) -> list[int]:
    return [seq.block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
            for seq, num_new in zip(batch.seqs, batch.num_new_tokens)
            for p in range(seq.num_cached, seq.num_cached + num_new)]


@pytest.mark.parametrize("device", DEVICES)
def test_replayed_verification_equals_eager_and_padding_rows_store_nothing(demo_dir, device, monkeypatch):
    """Steps of decodes and verifications (windows of 0..K drafts, so most sequences are padded to
    1 + K rows) in batches that shrink and grow: every row's token and logprobs are eager's, the
    verified tokens are eager's, the windows' K/V is eager's and every other slot is bit-identical,
    so padding rows, and padding sequences where rows of a larger batch were, stored nothing. In
    fp32 on CUDA too: eagerly a plain decode runs decode attention, in the graph prefill attention,
    and in bf16 that may flip the near-tied tokens of random weights."""
    torch.manual_seed(0)
    model = load_model(demo_dir, device)
    logprob_tolerance, kv_tolerance = TOLERANCES[model.dtype]
    eager, graphs = _verify_runners(model)
    assert eager._graphs is None
    assert (graphs._graphs.buckets, graphs._graphs.verify_query_len, graphs._graphs.verify_buckets) == (
        [1, 2, 4, 8], 1 + K, [1, 2, 4, 8])
    assert "verification steps of 4 tokens for 4 (1-8)" in graphs.decode_mode
    replayed = []
    replay = DecodeGraphRunner.replay
    monkeypatch.setattr(DecodeGraphRunner, "replay", lambda self, *args: replayed.append(args) or replay(self, *args))
    pool = _Pool(graphs, count=10, num_blocks=64, seed=3)
    for seq in pool.seqs:  # contexts of at least 1 + K + 1 tokens: every window fits a graph
        seq.token_ids[:0] = [7] * 6
        seq.num_cached += 6
        seq.block_table.append(pool.free.pop())
    for size in (8, 3, 5, 1, 2, 7, 4, 6, 8, 1):
        batch = _verify_batch(pool, size)
        before = [(k.clone(), v.clone()) for k, v in graphs.kv_cache]
        expected_step, got_step = eager.launch(batch), graphs.launch(batch)
        assert torch.equal(got_step.sampled.token_ids, expected_step.sampled.token_ids)
        torch.testing.assert_close(got_step.sampled.token_logprobs, expected_step.sampled.token_logprobs,
                                   rtol=0, atol=logprob_tolerance)
        expected, got = expected_step.results(), got_step.results()
        assert [len(r) if isinstance(r, list) else 1 for r in got] == [
            len(r) if isinstance(r, list) else 1 for r in expected]  # the same windows kept
        _assert_same_step(_pairs(expected), _pairs(got), logprob_tolerance)
        written = torch.tensor(_window_slots(batch), device=device)
        _assert_only_written(before, graphs.kv_cache, eager.kv_cache, written, kv_tolerance)
        expected_key = (graph_buckets(8)[[b >= size for b in graph_buckets(8)].index(True)], 1 + K if
                        batch.num_verifies else 1)
        assert replayed[-1] == (expected_key[0], size, expected_key[1])
        # the sequences take their first verified token (as if the rest were rejected)
        pool.advance(batch, [r[0][0] if isinstance(r, list) else r[0] for r in got])
    assert sum(q == 1 + K for _, _, q in replayed) >= 8


def test_a_window_over_a_context_too_short_for_padding_runs_eagerly(demo_dir):
    """A sequence whose context is at most 1 + K tokens (a one-token prompt) cannot hold a padded
    window (`cuda_graph.py`): its step runs eagerly, right; a step with a prompt chunk too."""
    model = load_model(demo_dir, "cpu")
    eager, graphs = _verify_runners(model)
    pool = _Pool(graphs, count=2, num_blocks=64, seed=4)
    short, long = pool.seqs
    del short.token_ids[: short.num_tokens - 2]
    short.num_cached, short.block_table = 1, short.block_table[:1]
    long.token_ids[:0] = [7] * 6
    long.num_cached += 6
    long.block_table.append(pool.free.pop())
    batch = ScheduledBatch([short, long], [2, 3], 0, [[5], [6, 7]])
    assert graphs._graph_key(batch) is None
    _assert_same_step(_pairs(eager.run(batch)), _pairs(graphs.run(batch)), TOLERANCES[model.dtype][0])
    assert graphs._graph_key(ScheduledBatch([long], [3], 0, [[6, 7]])) == (1, 1 + K)
    assert graphs._graph_key(ScheduledBatch([long, short], [3, 2], 0, [[6, 7], []])) is None  # short: a chunk


def test_a_verification_graph_reads_decodes_tokens_left_on_the_device(demo_dir):
    """Async scheduling's hand-over into a verification graph's step: decodes whose last token the
    step before sampled (still on the device) take it from there, at the last of their 1 + K rows;
    the step equals eager's with the tokens known on the host."""
    model = load_model(demo_dir, "cpu")
    eager, graphs = _verify_runners(model)
    pool = _Pool(graphs, count=5, num_blocks=64, seed=5)
    for seq in pool.seqs:
        seq.token_ids[:0] = [7] * 6
        seq.num_cached += 6
        seq.block_table.append(pool.free.pop())
    decodes, verifying = pool.seqs[:3], pool.seqs[3:]
    first = ScheduledBatch(list(decodes), [1] * 3, num_decodes=3)
    eager.run(first)
    launched = graphs.launch(first)
    for row, seq in enumerate(decodes):
        seq.append_unresolved(row)
        seq.num_cached += 1
    batch = ScheduledBatch(num_decodes=3)
    for seq in decodes:
        batch.add(seq, 1)
    for seq, draft in zip(verifying, ([11, 12], [13, 14, 15])):
        batch.add(seq, 1 + len(draft), draft)
    assert graphs._graph_key(batch) == (8, 1 + K)
    got = graphs.launch(batch, launched).results()
    for seq, (token, _) in zip(decodes, launched.results()):  # what resolve_token does, less the detokenizer
        seq.token_ids[-1], seq.unresolved_row = token, None
    _assert_same_step(_pairs(eager.run(batch)), _pairs(got), TOLERANCES[model.dtype][0])


@pytest.mark.parametrize("device", DEVICES)
def test_a_draft_model_replays_its_own_graphs_and_equals_its_eager_self(demo_dir, device, monkeypatch):
    """A draft model beside the graph runner captures graphs of its own: its copies of the target's
    steps (decode and verification graphs) write eager's K/V into its cache and nothing elsewhere,
    and its proposals (its decode graphs) are eager's. fp32, as the verification test."""
    torch.manual_seed(1)
    model = load_model(demo_dir, device)
    eager, graphs = _verify_runners(model)
    drafts = [DraftModel(model, 64, BLOCK_SIZE, model.config.vocab_size) for _ in range(2)]
    for (k1, v1), (k2, v2) in zip(*(draft.kv_cache for draft in drafts)):
        for a, b in ((k1, k2), (v1, v2)):
            a.copy_(torch.randn_like(a))
            b.copy_(a)
    eager.attach_draft(drafts[0])
    graphs.attach_draft(drafts[1])
    assert drafts[0].graphs is None and "; draft model: " in graphs.decode_mode
    assert (drafts[1].graphs.buckets, drafts[1].graphs.verify_buckets) == ([1, 2, 4, 8], [1, 2, 4, 8])
    replayed = []
    replay = DecodeGraphRunner.replay

    def recorded(self, bucket, rows, query_len=1):
        replayed.append((self.model is model and self.kv_cache is drafts[1].kv_cache, query_len))
        return replay(self, bucket, rows, query_len)

    monkeypatch.setattr(DecodeGraphRunner, "replay", recorded)
    kv_tolerance = TOLERANCES[model.dtype][1]
    pool = _Pool(graphs, count=8, num_blocks=64, seed=6)
    for seq in pool.seqs:
        seq.token_ids[:0] = [7] * 6
        seq.num_cached += 6
        seq.block_table.append(pool.free.pop())
    for size in (6, 2, 8, 3):
        batch = _verify_batch(pool, size) if size != 2 else pool.batch(size)
        before = [(k.clone(), v.clone()) for k, v in drafts[1].kv_cache]
        eager.run(batch)
        got = graphs.run(batch)
        written = torch.tensor(_window_slots(batch), device=device)
        untouched = torch.ones(before[0][0].shape[0] * BLOCK_SIZE, dtype=torch.bool, device=device)
        untouched[written] = False
        for (k0, v0), (k, v), (ke, ve) in zip(before, drafts[1].kv_cache, drafts[0].kv_cache):
            for old, new, reference in ((k0, k, ke), (v0, v, ve)):
                assert torch.equal(_flat(new)[untouched], _flat(old)[untouched])
                torch.testing.assert_close(_flat(new)[written], _flat(reference)[written], rtol=kv_tolerance,
                                           atol=kv_tolerance)
        pool.advance(batch, [r[0][0] if isinstance(r, list) else r[0] for r in got])
    seqs, counts = pool.seqs[:5], [3, 1, 2, 3, 3]
    for seq, count in zip(seqs, counts):  # slots for the proposals, as the scheduler appends them
        while seq.num_tokens + count > len(seq.block_table) * BLOCK_SIZE:
            seq.block_table.append(pool.free.pop())
    assert drafts[1].propose(seqs, counts) == drafts[0].propose(seqs, counts)
    by_draft = [q for is_draft, q in replayed if is_draft]
    assert 1 in by_draft and 1 + K in by_draft
