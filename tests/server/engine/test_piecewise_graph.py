"""Piecewise graphs for steps with prompt tokens: buckets, padding and static buffers, against eager.

On CPU the piecewise runner calls its recorded pieces over the same static buffers that its CUDA
graphs read, so everything here but the capture itself runs on CPU; the same tests run on CUDA
(real graphs) when a GPU is present.
"""

import asyncio
import random

import pytest
import torch

from model.batch import ForwardBatch, SequenceStep, make_batch
from model.load import load_model
from model.tokenizer import Tokenizer
from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from server.engine.piecewise_graph import PiecewiseCaptureSummary, PiecewiseGraphRunner, TokenInputs, token_buckets
from server.engine.request import GenerationRequest, SamplingParams
from server.engine.speculative import SpeculativeConfig
from tests.conftest import load_test_model
from tests.kernels.common import kernel_backend
from tests.model.test_qwen3_vs_hf import CHECKPOINTS, _shape

ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BLOCK_SIZE = 16
NUM_BLOCKS = 32


def test_buckets_cover_every_token_count_up_to_the_budget():
    assert token_buckets(10) == [10]
    assert token_buckets(40) == [16, 32, 40]
    assert token_buckets(2048) == [16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024, 1536, 2048]
    assert token_buckets(8192)[-3:] == [7168, 7680, 8192] and len(token_buckets(8192)) == 25
    assert token_buckets(600) == [16, 32, 64, 128, 256, 384, 512, 600]
    assert token_buckets(1100) == [16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024, 1100]


def test_capture_summary_is_a_startup_line():
    summary = PiecewiseCaptureSummary([16, 32, 64], 2.345, 3 << 28, [128], 29)
    assert summary.describe(torch.device("cuda")) == (
        "piecewise CUDA graphs for 3 token counts (16-64), 29 pieces each, in 2.3 s, 0.75 GiB of GPU memory; "
        "larger steps run eagerly (128 tokens did not fit in memory)")
    assert PiecewiseCaptureSummary([], 0.5, 0, [16, 32], 29).describe(torch.device("cuda")) == (
        "eager (piecewise CUDA graphs for 16 tokens and more did not fit in memory)")
    recorded = PiecewiseCaptureSummary([16, 32], 0.01, 0, [], 4)
    assert recorded.describe(torch.device("cpu")) == (
        "recorded prompt-step pieces (CPU replay) for 2 token counts (16-32), 4 pieces each, in 0.0 s")


@pytest.fixture(scope="module", params=[*CHECKPOINTS[:1], CHECKPOINTS[3]], ids=[CHECKPOINTS[0][0], CHECKPOINTS[3][0]])
def checkpoint(request, tmp_path_factory):
    from model.demo import write_checkpoint

    name, extra, shards = request.param
    return write_checkpoint(tmp_path_factory.mktemp(name), _shape(extra), seed=len(name), num_shards=shards,
                            with_tokenizer=False)


def _random_cache(model, seed: int):
    torch.manual_seed(seed)
    cache = model.allocate_kv_cache(NUM_BLOCKS, BLOCK_SIZE)
    for k, v in cache:
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
    return cache


def _in_static_rows(batch: ForwardBatch, inputs: TokenInputs, bucket: int) -> ForwardBatch:
    """`batch` with its per-token inputs as the first rows of `inputs`, padding after them to `bucket`
    (as `ModelRunner._prepare` writes them)."""
    n = batch.token_ids.shape[0]
    views = []
    for buffer, values, pad in ((inputs.token_ids, batch.token_ids, 0), (inputs.positions, batch.positions, 0),
                                (inputs.slot_mapping, batch.slot_mapping, -1)):
        buffer[:n] = values
        buffer[n:bucket] = pad
        views.append(buffer[:n])
    return ForwardBatch(*views, batch.block_tables, batch.context_lens, batch.query_start_loc, batch.query_lens,
                        batch.logits_indices)


def _steps(rng: random.Random, decodes: int, chunks: list[tuple[int, int]], vocab: int) -> list[SequenceStep]:
    """`decodes` one-token steps over random contexts, then prompt chunks of (cached, new) tokens;
    each sequence on blocks of its own, in random order."""
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    steps = []
    for cached, new in [(rng.randrange(1, 60), 1) for _ in range(decodes)] + chunks:
        table = [free.pop() for _ in range(-(-(cached + new) // BLOCK_SIZE))]
        steps.append(SequenceStep([rng.randrange(vocab) for _ in range(new)], cached, table))
    return steps


def _flat(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(-1, *cache.shape[2:])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=ON_CUDA)])
def test_replayed_pieces_equal_the_eager_forward_and_padding_stores_nothing(checkpoint, device):
    """Mixed steps (decodes, prompt chunks over a cached prefix, a whole prompt), pure prompt steps
    and a decode-only step, in buckets that shrink and grow, so that padding rows sit where real
    rows of a larger step were: every step gives eager's logits (prompt-scoring rows too), writes
    eager's K/V to its own slots and leaves every other slot of the cache bit-identical."""
    _check_pieces_against_eager(load_test_model(checkpoint, device), device, SHAPES)


def test_the_fused_front_end_in_the_pieces_stores_nothing_for_padding(tmp_path):
    """The same with the attention front-end's Triton kernel (interpreted), which stores the pieces'
    K/V on CUDA: two steps, the second's padding rows over the first's real ones."""
    from model.demo import write_checkpoint

    name, extra, shards = CHECKPOINTS[3]
    model = load_model(write_checkpoint(tmp_path, _shape(extra), seed=len(name), with_tokenizer=False), "cpu")
    with kernel_backend("auto,attention_frontend=triton"):
        _check_pieces_against_eager(model, "cpu", SHAPES[:2])


# (decode steps, prompt chunks as (cached, new) tokens) of the steps the runner tests run in turn
SHAPES = [(3, [(20, 17), (0, 25)]),  # 45 tokens: bucket 64
          (2, [(5, 11)]),  # 13: bucket 16, its padding rows were real rows just before
          (0, [(0, 30), (31, 2)]),  # 32: a full bucket
          (5, []),  # decodes only
          (1, [(16, 40)])]  # 41: back to 64


# (logits, K/V) tolerances between replayed pieces and the eager forward. fp32 (CPU): the same ops
# on the same rows, but for matmuls over the padded rows, which may sum in another order (measured:
# equal, or 1.4e-6 apart); attention reads k and v from the cache, where eager gets them passed.
# bf16 (CUDA): a padded matmul may take another algorithm, a bf16 ulp or two.
TOLERANCES = {torch.float32: (2e-5, 1e-5), torch.bfloat16: (5e-2, 1.6e-2)}


def _check_pieces_against_eager(model, device: str, shapes: list[tuple[int, list[tuple[int, int]]]]) -> None:
    logit_tolerance, kv_tolerance = TOLERANCES[model.dtype]
    eager_cache, cache = _random_cache(model, 0), _random_cache(model, 0)
    inputs = TokenInputs(*(torch.zeros(64, dtype=torch.int64, device=device) for _ in range(3)))
    runner = PiecewiseGraphRunner(model, cache, inputs, token_buckets(64))
    runner.capture()
    assert runner.buckets == [16, 32, 64] and runner.num_pieces == 4
    rng, vocab = random.Random(1), model.config.vocab_size
    for decodes, chunks in shapes:
        steps = _steps(rng, decodes, chunks, vocab)
        batch = make_batch(steps, BLOCK_SIZE, device, all_logits=True)
        tokens = batch.token_ids.shape[0]
        bucket = runner.bucket_for(tokens)
        before = [(k.clone(), v.clone()) for k, v in cache]
        expected = model.forward(batch, eager_cache)
        got = runner.forward(_in_static_rows(batch, inputs, bucket), bucket)
        torch.testing.assert_close(got, expected, rtol=logit_tolerance, atol=logit_tolerance)
        if model.dtype == torch.float32:
            assert torch.equal(got.argmax(-1), expected.argmax(-1))
        written = batch.slot_mapping
        untouched = torch.ones(NUM_BLOCKS * BLOCK_SIZE, dtype=torch.bool, device=device)
        untouched[written] = False
        for (k0, v0), (k, v), (ke, ve) in zip(before, cache, eager_cache):
            for old, new, reference in ((k0, k, ke), (v0, v, ve)):
                assert torch.equal(_flat(new)[untouched], _flat(old)[untouched])
                torch.testing.assert_close(_flat(new)[written], _flat(reference)[written], rtol=kv_tolerance,
                                           atol=kv_tolerance)
    assert runner.bucket_for(65) is None


def test_a_step_must_sit_in_the_runners_own_buffers_with_padding_that_stores_nothing(checkpoint):
    model = load_model(checkpoint, "cpu")
    inputs = TokenInputs(*(torch.zeros(32, dtype=torch.int64) for _ in range(3)))
    runner = PiecewiseGraphRunner(model, _random_cache(model, 2), inputs, [16, 32])
    runner.capture()
    batch = make_batch(_steps(random.Random(3), 2, [(4, 6)], model.config.vocab_size), BLOCK_SIZE, "cpu")
    with pytest.raises(ValueError, match="reads the runner's own inputs"):
        runner.forward(batch, 16)
    static = _in_static_rows(batch, inputs, 16)
    inputs.slot_mapping[12] = 5  # a padding row that would overwrite slot 5
    with pytest.raises(AssertionError, match="a padding row would store K/V"):
        runner.forward(static, 16)


def _outputs(model, demo_dir, requests, **config) -> tuple[list[tuple[list[int], list]], str, int]:
    """Each request's (tokens, prompt logprobs), from concurrent requests; the engine's mode line
    and its prefix-cache hits."""
    engine = AsyncEngine(model, Tokenizer(demo_dir), demo_dir, EngineConfig(**config))

    async def one(i: int, prompt: list[int], params: SamplingParams):
        tokens, prompt_logprobs = [], None
        async for output in engine.generate(GenerationRequest(f"p{i}", prompt, params)):
            tokens += output.choices[0].token_ids
            prompt_logprobs = prompt_logprobs or output.prompt_logprobs
        return tokens, prompt_logprobs

    async def main():
        return await asyncio.gather(*(one(i, prompt, params) for i, (prompt, params) in enumerate(requests)))

    try:
        return asyncio.run(main()), engine.decode_mode, engine.stats().prefix_cache_hits
    finally:
        engine.shutdown()


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "ngram-speculation"])
def test_engine_output_is_the_same_through_pieces_and_eagerly(demo_dir, monkeypatch, speculative):
    """Concurrent requests sharing prompt prefixes (prefix-cache hits), prompts longer than the token
    budget (chunked prefill, mixed steps), one asking for prompt logprobs, with and without n-gram
    drafts to verify: the same tokens and prompt logprobs through the pieces as eagerly."""
    model = load_test_model(demo_dir, "cpu")
    rng = random.Random(5)
    shared = [rng.randrange(151643) for _ in range(35)]
    repeating = [rng.randrange(151643) for _ in range(6)] * 5  # something for n-gram drafts to find
    prompts = [shared + [rng.randrange(151643) for _ in range(rng.randrange(1, 30))] for _ in range(4)]
    prompts += [[rng.randrange(151643) for _ in range(rng.randrange(3, 70))] for _ in range(2)] + [repeating]
    requests = [(prompt, SamplingParams(temperature=0.0, max_tokens=rng.randrange(4, 16), ignore_eos=True,
                                        prompt_logprobs=3 if i == 1 else None))
                for i, prompt in enumerate(prompts)]
    config = dict(num_kv_blocks=64, max_num_seqs=4, max_num_batched_tokens=48,
                  speculative_config=SpeculativeConfig("ngram", 3, 1, 3, disable_by_batch_size=8) if speculative else None)
    steps = []
    forward = PiecewiseGraphRunner.forward
    monkeypatch.setattr(PiecewiseGraphRunner, "forward",
                        lambda self, batch, bucket: steps.append((batch.query_lens, bucket)) or forward(self, batch, bucket))
    eager, _, _ = _outputs(model, demo_dir, requests, enforce_eager=True, **config)
    assert not steps
    pieces, mode, prefix_cache_hits = _outputs(model, demo_dir, requests, enforce_eager=False, **config)
    assert prefix_cache_hits > 0
    assert [tokens for tokens, _ in pieces] == [tokens for tokens, _ in eager]
    (_, eager_scored), (_, scored) = eager[1], pieces[1]
    assert len(scored) == len(prompts[1]) - 1 and [lp.token_id for lp in scored] == [lp.token_id for lp in eager_scored]
    for got, expected in zip(scored, eager_scored):
        assert got.logprob == pytest.approx(expected.logprob, abs=1e-4)
        assert [t for t, _ in got.top] == [t for t, _ in expected.top]
    assert "prompt steps: recorded prompt-step pieces (CPU replay) for 3 token counts (16-48)" in mode
    assert any(len(query_lens) > 1 and query_lens[0] == 1 and max(query_lens) > 1 for query_lens, _ in steps), \
        "no mixed step went through the pieces"
    assert {bucket for _, bucket in steps} >= {16, 48}
    if speculative:
        assert any(1 < q < 5 for query_lens, _ in steps for q in query_lens), "no verification window went through"


def test_no_pieces_beside_a_draft_model(demo_dir):
    """An engine with a draft model runs its prompt steps eagerly (see `ModelRunner.launch`), so it
    captures no pieces; the same engine without one, graphs on, has them."""
    model = load_model(demo_dir, "cpu")
    sizes = dict(num_kv_blocks=64, max_num_seqs=2, max_num_batched_tokens=32, enforce_eager=False)
    plain = AsyncEngine(model, Tokenizer(demo_dir), demo_dir, EngineConfig(**sizes))
    drafted = AsyncEngine(model, Tokenizer(demo_dir), demo_dir, EngineConfig(
        speculative_config=SpeculativeConfig("draft_model", 2, model=str(demo_dir)), **sizes))
    try:
        assert plain._core.runner._piecewise.buckets == [16, 32]
        assert drafted._core.runner._piecewise is None and "prompt steps" not in drafted.decode_mode
    finally:
        plain.shutdown()
        drafted.shutdown()
