"""Speculative decoding as users see it: with drafts (a prediction, n-gram lookup) the engine gives
exactly the tokens, logprobs, stops and text of plain decoding, on the demo model in fp32, under
concurrency, preemption, prefix caching and n > 1; rejected drafts leave no block behind."""

import asyncio
import random
from dataclasses import dataclass

import pytest

from server.engine.cuda_graph import DecodeGraphRunner
from server.engine.request import GenerationRequest, SamplingParams
from server.engine.speculative import SpeculativeConfig
from tests.server.engine.test_engine import Choice, random_prompts, run
from tests.server.engine.test_engine import demo, make_engine  # noqa: F401 (fixtures)

_ids = iter(range(10**9))


def req(prompt: list[int], prediction: list[int] | None = None, **params) -> GenerationRequest:
    params = {"temperature": 0.0, "ignore_eos": True} | params
    return GenerationRequest(f"spec-{next(_ids)}", prompt, SamplingParams(**params), prediction_token_ids=prediction)


def edited(tokens: list[int], rng: random.Random, share: float) -> list[int]:
    """`tokens` with about `share` of them replaced, dropped or doubled: a prediction that is
    partly wrong, so that windows are accepted in full, in part and not at all."""
    out = []
    for token in tokens:
        roll = rng.random()
        if roll < share / 3:
            out.append(rng.randrange(151643))
        elif roll < 2 * share / 3:
            continue
        elif roll < share:
            out += [token, token]
        else:
            out.append(token)
    return out


@dataclass
class Reply:
    choices: dict[int, Choice]
    completion_tokens: int
    accepted_prediction_tokens: int
    rejected_prediction_tokens: int
    num_cached_tokens: int


async def collect(engine, request: GenerationRequest) -> Reply:
    choices: dict[int, Choice] = {}
    async for output in engine.generate(request):
        for delta in output.choices:
            choice = choices.setdefault(delta.index, Choice())
            choice.text += delta.text
            choice.token_ids += delta.token_ids
            choice.logprobs += delta.logprobs or []
            choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
    assert output.finished
    return Reply(choices, output.completion_tokens, output.accepted_prediction_tokens,
                 output.rejected_prediction_tokens, output.num_cached_tokens)


def gather(engine, requests):
    async def main():
        return await asyncio.gather(*(collect(engine, r) for r in requests))

    return run(main())


def tokens_of(results) -> list[list[int]]:
    return [[t for i in sorted(r.choices) for t in r.choices[i].token_ids + [-1]] for r in results]


@pytest.mark.parametrize(
    "config", [{}, {"num_kv_blocks": 14, "max_num_batched_tokens": 48}], ids=["normal-cache", "tiny-cache"]
)
def test_greedy_with_predictions_equals_plain_decoding(make_engine, config):
    rng = random.Random(5)
    base = random_prompts(6, seed=21, lengths=(5, 40))
    prompts = base + [base[0] + base[1]]  # shares base[0]'s blocks through the prefix cache
    max_tokens = [rng.randrange(20, 40) for _ in prompts]
    ns = [1, 2, 1, 1, 3, 1, 1]
    engine = make_engine(**config)
    plain = gather(engine, [req(p, max_tokens=m, n=n) for p, m, n in zip(prompts, max_tokens, ns)])
    outputs = [r.choices[0].token_ids for r in plain]
    predictions = [outputs[0], edited(outputs[1], rng, 0.1), edited(outputs[2], rng, 0.5), [],
                   edited(outputs[4], rng, 0.2), outputs[5][5:], outputs[6][:10] + outputs[0]]
    spec = gather(engine, [req(p, pred or None, max_tokens=m, n=n)
                           for p, pred, m, n in zip(prompts, predictions, max_tokens, ns)])
    assert tokens_of(spec) == tokens_of(plain)
    assert [r.choices[0].text for r in spec] == [r.choices[0].text for r in plain]
    stats = engine._core.speculator.stats
    assert 0 < stats.accepted_tokens < stats.draft_tokens  # windows were kept and dropped
    assert spec[0].accepted_prediction_tokens > 0.6 * len(outputs[0])
    assert spec[3].accepted_prediction_tokens == spec[3].rejected_prediction_tokens == 0
    assert spec[2].rejected_prediction_tokens > 0
    assert all(r.completion_tokens == p.completion_tokens for r, p in zip(spec, plain))
    if config:
        assert engine.stats().num_preemptions > 0
    assert engine.stats().kv_blocks_used == 0  # rejected drafts' blocks all came back


def record_replays(monkeypatch) -> list[tuple]:
    """(model, bucket, sequences, tokens per sequence) of every graph replay from now on."""
    replayed = []
    replay = DecodeGraphRunner.replay
    def recorded(self, bucket: int, rows: int, query_len: int = 1):
        replayed.append((self.model, bucket, rows, query_len))
        return replay(self, bucket, rows, query_len)

    monkeypatch.setattr(DecodeGraphRunner, "replay", recorded)
    return replayed


@pytest.mark.parametrize(
    "config", [{}, {"num_kv_blocks": 14, "max_num_batched_tokens": 48}], ids=["normal-cache", "tiny-cache"]
)
def test_verification_graphs_give_plain_decodings_tokens(make_engine, config, monkeypatch):
    """Graphs on (their CPU form) on a server speculating with k = 4: concurrent requests, some
    with predictions, some with n-gram drafts only (repeating prompts), some with none, so verification
    steps pad windows of fewer drafts and sequences that bring none, and batches shrink as requests
    finish (the tiny cache also preempts). Tokens equal eager plain decoding, and verification
    steps did replay their graphs of 5 tokens a sequence."""
    rng = random.Random(6)
    base = random_prompts(6, seed=23, lengths=(6, 30))
    prompts = [p * 3 if i % 2 else p for i, p in enumerate(base)]
    max_tokens = [rng.randrange(15, 35) for _ in prompts]
    plain = gather(make_engine(**config), [req(p, max_tokens=m) for p, m in zip(prompts, max_tokens)])
    outputs = [r.choices[0].token_ids for r in plain]
    predictions = [outputs[0], None, edited(outputs[2], rng, 0.3), None, edited(outputs[4], rng, 0.1), None]
    spec = SpeculativeConfig("ngram", 4, 1, 3, disable_by_batch_size=8)
    engine = make_engine(speculative_config=spec, enforce_eager=False, **config)
    assert "verification steps of 5 tokens" in engine.decode_mode
    replayed = record_replays(monkeypatch)
    got = gather(engine, [req(p, pred, max_tokens=m) for p, pred, m in zip(prompts, predictions, max_tokens)])
    assert tokens_of(got) == tokens_of(plain)
    verifications = [rows for _, _, rows, q in replayed if q == 5]
    assert len(verifications) > 5 and len(set(verifications)) > 1  # several batch sizes
    stats = engine._core.speculator.stats
    assert 0 < stats.accepted_tokens < stats.draft_tokens
    if config:
        assert engine.stats().num_preemptions > 0
    assert engine.stats().kv_blocks_used == 0


def test_cached_blocks_hold_only_accepted_tokens(make_engine):
    """A prompt that extends an earlier request's prompt and output reuses its cached blocks, which
    a wrong draft's K/V would have spoiled: its tokens equal a run without the prefix cache."""
    rng = random.Random(9)
    prompt = random_prompts(1, seed=33, lengths=(20, 21))[0]
    engine, uncached = make_engine(), make_engine(enable_prefix_caching=False)
    first = gather(uncached, [req(prompt, max_tokens=60)])[0].choices[0].token_ids
    spec = gather(engine, [req(prompt, edited(first, rng, 0.3), max_tokens=60)])[0].choices[0].token_ids
    assert spec == first
    follow = prompt + first + [11, 12]
    again = gather(engine, [req(follow, edited(first, rng, 0.3), max_tokens=20)])[0]
    assert again.num_cached_tokens >= 64
    assert again.choices[0].token_ids == gather(uncached, [req(follow, max_tokens=20)])[0].choices[0].token_ids


def test_stops_inside_an_accepted_window_end_where_plain_decoding_ends(make_engine, demo):
    _, tokenizer = demo
    engine = make_engine()
    prompt = random_prompts(1, seed=41)[0]
    plain = gather(engine, [req(prompt, max_tokens=40)])[0].choices[0]
    tokens = plain.token_ids
    stop_token = tokens[13]
    first_at = tokens.index(stop_token)
    stop_text = tokenizer.decode(tokens[20:22])
    cases = [dict(stop_token_ids=[stop_token]), dict(stop=[stop_text]), dict(max_tokens=11),
             dict(stop_token_ids=[stop_token], ignore_eos=False, min_tokens=0)]
    for params in cases:
        params = {"max_tokens": 40} | params
        expected = gather(engine, [req(prompt, **params)])[0].choices[0]
        got = gather(engine, [req(prompt, tokens, **params)])[0].choices[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == (
            expected.token_ids, expected.text, expected.finish_reason, expected.stop_reason), params
    assert len(gather(engine, [req(prompt, tokens, max_tokens=40, stop_token_ids=[stop_token])])[0]
               .choices[0].token_ids) == first_at + 1


def test_logprobs_of_accepted_tokens_equal_plain_decoding(make_engine):
    engine = make_engine()
    prompt = random_prompts(1, seed=43)[0]
    plain = gather(engine, [req(prompt, max_tokens=30, logprobs=3)])[0].choices[0]
    spec = gather(engine, [req(prompt, plain.token_ids, max_tokens=30, logprobs=3)])[0]
    assert spec.accepted_prediction_tokens > 20
    spec = spec.choices[0]
    assert spec.token_ids == plain.token_ids and len(spec.logprobs) == 30
    for a, b in zip(spec.logprobs, plain.logprobs):
        assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [lp for _, lp in a.top] == pytest.approx([lp for _, lp in b.top], abs=1e-5)


def test_ngram_speculation_keeps_greedy_tokens(make_engine):
    """Prompt lookup on prompts that repeat themselves (so drafts exist) gives plain decoding's tokens."""
    rng = random.Random(2)
    prompts = [p * 3 for p in random_prompts(4, seed=51, lengths=(4, 12))]
    plain_engine = make_engine()
    spec_engine = make_engine(speculative_config=SpeculativeConfig("ngram", 4, 1, 3, disable_by_batch_size=8))
    params = [dict(max_tokens=rng.randrange(20, 40)) for _ in prompts]
    plain = gather(plain_engine, [req(p, **kw) for p, kw in zip(prompts, params)])
    spec = gather(spec_engine, [req(p, **kw) for p, kw in zip(prompts, params)])
    assert tokens_of(spec) == tokens_of(plain)
    assert spec_engine._core.speculator.stats.draft_tokens > 0


def test_async_scheduling_with_predictions_equals_plain_decoding(make_engine):
    rng = random.Random(8)
    prompts = random_prompts(4, seed=61)
    plain_engine, spec_engine = make_engine(), make_engine(async_scheduling=True)
    plain = gather(plain_engine, [req(p, max_tokens=30) for p in prompts])
    predictions = [edited(r.choices[0].token_ids, rng, 0.2) for r in plain]
    spec = gather(spec_engine, [req(p, pred, max_tokens=30) for p, pred in zip(prompts, predictions)])
    assert tokens_of(spec) == tokens_of(plain)
    assert spec_engine._core.speculator.stats.accepted_tokens > 0
    assert spec_engine.stats().kv_blocks_used == 0


def test_sampling_with_a_prediction_is_seeded_and_accepts(make_engine):
    engine = make_engine()
    prompt = random_prompts(1, seed=71)[0]
    sampled = dict(temperature=1.0, top_k=2, seed=5, max_tokens=30)  # top-2: a draft has odds near 1 in 2
    first = gather(engine, [req(prompt, **sampled)])[0].choices[0].token_ids
    again = gather(engine, [req(prompt, first, **sampled), req(prompt, first, **sampled)])
    assert again[0].choices[0].token_ids == again[1].choices[0].token_ids
    assert again[0].accepted_prediction_tokens > 0


def test_the_batch_cutoff_is_measured_at_load(make_engine, caplog):
    with caplog.at_level("INFO", logger="nanoserve.engine"):
        engine = make_engine(speculative_config=SpeculativeConfig("ngram", 4, 1, 3), max_num_seqs=4)
    cutoff = engine._core.speculator.disable_by_batch_size
    assert cutoff in (0, 1, 2, 4)
    assert f"speculation on up to {cutoff} decoding sequences" in caplog.text and "1: " in caplog.text


@pytest.fixture(scope="module")
def other_vocab(tmp_path_factory, demo_dir):
    """A small checkpoint with the demo's tokenizer but not its 151,936-row embedding table."""
    import shutil
    from pathlib import Path

    from model.demo import write_checkpoint

    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 151680, "dtype": "float32"}
    directory = write_checkpoint(tmp_path_factory.mktemp("other-vocab"), shape, seed=3, with_tokenizer=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(demo_dir) / name, directory / name)
    return directory


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("draft", ["self", pytest.param("other", marks=pytest.mark.slow)])
def test_a_draft_model_keeps_greedy_tokens(make_engine, demo_dir, request, draft, graphs, monkeypatch):
    """The target as its own draft (every draft accepted) and an unrelated small model (few); with
    graphs on (their CPU form), the draft's proposals replay its own decode graphs and its copies of
    the target's steps replay its decode and verification graphs."""
    rng = random.Random(4)
    prompts = random_prompts(2, seed=81)
    params = [dict(max_tokens=rng.randrange(20, 30), n=n) for n in (2, 1)]
    plain = gather(make_engine(), [req(p, **kw) for p, kw in zip(prompts, params)])
    other = [(request.getfixturevalue("chat_checkpoint"), None)] if draft == "other" else []
    for draft, acceptance in [(demo_dir, 1.0)] if draft == "self" else other:
        engine = make_engine(speculative_config=SpeculativeConfig("draft_model", 4, disable_by_batch_size=8,
                                                                  model=str(draft)), num_kv_blocks=40,
                             enforce_eager=not graphs)
        replayed = record_replays(monkeypatch)
        spec = gather(engine, [req(p, **kw) for p, kw in zip(prompts, params)])
        assert tokens_of(spec) == tokens_of(plain)
        draft_model = engine._core.runner.draft_model.model
        by_draft = {q for model, _, _, q in replayed if model is draft_model}
        assert by_draft == ({1, 5} if graphs else set())
        assert (5 in {q for model, _, _, q in replayed if model is not draft_model}) == graphs
        stats = engine._core.speculator.stats
        assert stats.draft_tokens > 0
        if acceptance is not None:
            assert stats.accepted_tokens == stats.draft_tokens
        assert engine.stats().kv_blocks_used == 0


def test_a_draft_model_with_another_vocabulary_is_refused(make_engine, other_vocab):
    with pytest.raises(ValueError, match="the draft model's vocabulary .* differs from the target's"):
        make_engine(speculative_config=SpeculativeConfig("draft_model", 4, model=str(other_vocab)))
