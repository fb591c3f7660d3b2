"""The engine as its callers see it: streamed outputs of concurrent requests on the demo model (fp32, CPU)."""

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field

import pytest
import torch

from model.batch import SequenceStep, make_batch
from model.load import load_model
from model.tokenizer import Tokenizer
from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig, resolve_config
from server.engine.request import (
    EngineDead,
    EngineOverloaded,
    GenerationRequest,
    RequestFailed,
    RequestRejected,
    SamplingParams,
    TokenLogprob,
)

BLOCK_SIZE = 16


@dataclass
class Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class Result:
    choices: dict[int, Choice]
    completion_tokens: int
    deltas: list[str]  # every text delta of choice 0, in order


@pytest.fixture(scope="module")
def demo(demo_dir):
    return load_model(demo_dir, "cpu"), Tokenizer(demo_dir)


@pytest.fixture
def make_engine(demo, demo_dir):
    model, tokenizer = demo
    engines = []

    def make(**config) -> AsyncEngine:
        engines.append(AsyncEngine(model, tokenizer, demo_dir, EngineConfig(**config)))
        return engines[-1]

    yield make
    for engine in engines:
        engine.shutdown()


_request_ids = iter(range(10**9))


def request(prompt: list[int], **params) -> GenerationRequest:
    return GenerationRequest(f"req-{next(_request_ids)}", prompt, SamplingParams(**params))


async def collect(engine: AsyncEngine, req: GenerationRequest) -> Result:
    choices: dict[int, Choice] = {}
    deltas = []
    async for output in engine.generate(req):
        for delta in output.choices:
            choice = choices.setdefault(delta.index, Choice())
            choice.text += delta.text
            choice.token_ids += delta.token_ids
            choice.logprobs += delta.logprobs or []
            choice.finish_reason, choice.stop_reason = delta.finish_reason, delta.stop_reason
            if delta.index == 0:
                deltas.append(delta.text)
        completion_tokens = output.completion_tokens
    assert output.finished and all(choice.finish_reason for choice in choices.values())
    return Result(choices, completion_tokens, deltas)


def run(coroutine):
    return asyncio.run(coroutine)


def greedy(prompt: list[int], max_tokens: int, **params) -> dict:
    return dict(prompt=prompt, temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **params)


def reference_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """Greedy tokens from a plain loop over the model, one sequence, no engine."""
    num_blocks = -(-(len(prompt) + num_tokens) // BLOCK_SIZE)
    kv_cache = model.allocate_kv_cache(num_blocks, BLOCK_SIZE)
    step = SequenceStep(prompt, 0, range(num_blocks))
    tokens = []
    for _ in range(num_tokens):
        logits = model.forward(make_batch([step], BLOCK_SIZE, "cpu"), kv_cache)[0]
        tokens.append(int(logits.argmax()))
        step = SequenceStep([tokens[-1]], step.num_cached + len(step.new_token_ids), step.block_table)
    return tokens


def random_prompts(count: int, seed: int, lengths: tuple[int, int] = (3, 60)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(151643) for _ in range(rng.randrange(*lengths))] for _ in range(count)]


async def wait_until(condition, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


@pytest.mark.parametrize(
    "config, preempts",
    [({}, False), ({"num_kv_blocks": 12, "max_num_batched_tokens": 40}, True)],
    ids=["normal-cache", "tiny-cache"],
)
def test_concurrent_greedy_requests_equal_their_solo_tokens(demo, make_engine, config, preempts):
    model, _ = demo
    rng = random.Random(3)
    prompts = random_prompts(8, seed=11)
    max_tokens = [rng.randrange(8, 28) for _ in prompts]
    expected = [reference_greedy(model, p, n) for p, n in zip(prompts, max_tokens)]
    engine = make_engine(**config)

    async def main():
        return await asyncio.gather(*(collect(engine, request(**greedy(p, n))) for p, n in zip(prompts, max_tokens)))

    results = run(main())
    assert [r.choices[0].token_ids for r in results] == expected
    assert all(r.choices[0].finish_reason == "length" for r in results)
    stats = engine.stats()
    assert (stats.num_preemptions > 0) == preempts
    assert stats.kv_blocks_used == 0 and stats.num_running == stats.num_waiting == 0


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(make_engine):
    engine = make_engine()
    prompt = random_prompts(1, seed=5)[0]
    params = dict(prompt=prompt, temperature=3.0, top_p=0.95, max_tokens=24, ignore_eos=True)
    company = [
        request(**greedy(random_prompts(1, seed=6)[0], 30)),
        request(prompt, temperature=3.0, max_tokens=30, ignore_eos=True),  # same prompt, no seed
        request(prompt, temperature=2.0, seed=42, top_k=5, max_tokens=30, n=2, ignore_eos=True),
        request(random_prompts(1, seed=7)[0], temperature=1.5, min_p=0.05, max_tokens=30, ignore_eos=True),
    ]

    async def main():
        alone = await collect(engine, request(seed=42, **params))
        again = await collect(engine, request(seed=42, **params))
        together = await asyncio.gather(
            collect(engine, request(seed=42, **params)), *(collect(engine, r) for r in company)
        )
        other_seed = await collect(engine, request(seed=43, **params))
        return alone, again, together[0], other_seed

    alone, again, in_company, other_seed = run(main())
    tokens = alone.choices[0].token_ids
    assert again.choices[0].token_ids == tokens
    assert in_company.choices[0].token_ids == tokens
    assert in_company.choices[0].text == alone.choices[0].text
    assert other_seed.choices[0].token_ids != tokens


def test_top_k_1_equals_greedy(demo, make_engine):
    model, _ = demo
    prompt = random_prompts(1, seed=8)[0]
    engine = make_engine()
    result = run(collect(engine, request(prompt, temperature=1.5, top_k=1, max_tokens=16, ignore_eos=True)))
    assert result.choices[0].token_ids == reference_greedy(model, prompt, 16)


def test_n_choices_are_distinct_reproducible_and_counted(make_engine):
    engine = make_engine()
    prompt = random_prompts(1, seed=9)[0]
    params = dict(temperature=3.0, seed=7, max_tokens=12, ignore_eos=True)

    async def main():
        return (
            await collect(engine, request(prompt, n=3, **params)),
            await collect(engine, request(prompt, n=3, **params)),
            await collect(engine, request(prompt, n=1, **params)),
        )

    three, again, one = run(main())
    assert sorted(three.choices) == [0, 1, 2]
    tokens = [three.choices[i].token_ids for i in range(3)]
    assert len({tuple(t) for t in tokens}) == 3
    assert [again.choices[i].token_ids for i in range(3)] == tokens
    assert one.choices[0].token_ids == tokens[0]  # choice 0 uses the request's seed itself
    assert three.completion_tokens == 36


def find_split_stop_string(tokenizer: Tokenizer, token_ids: list[int]) -> tuple[str, int, int] | None:
    """A 4-character string made of the end of one token's text and the start of the next's,
    occurring first at that boundary: (string, where it starts, tokens up to its end)."""
    text = ""
    pieces = [tokenizer.decode([t]) for t in token_ids]
    for i in range(len(pieces) - 1):
        text += pieces[i]
        left, right = pieces[i], pieces[i + 1]
        if len(left) >= 2 and len(right) >= 2 and "\ufffd" not in left + right:
            stop = left[-2:] + right[:2]
            if (text + right).find(stop) == len(text) - 2:
                return stop, len(text) - 2, i + 2
    return None


def test_stop_string_split_across_tokens_ends_the_text_before_it(demo, make_engine):
    _, tokenizer = demo
    engine = make_engine()
    for seed in range(20):
        prompt = random_prompts(1, seed=100 + seed)[0]
        full = run(collect(engine, request(**greedy(prompt, 40)))).choices[0]
        if found := find_split_stop_string(tokenizer, full.token_ids):
            break
    assert found, "no output with a usable token boundary"
    stop, start, num_tokens = found
    result = run(collect(engine, request(**greedy(prompt, 40), stop=["never there", stop])))
    choice = result.choices[0]
    assert choice.text == full.text[:start]
    assert (choice.finish_reason, choice.stop_reason) == ("stop", stop)
    assert choice.token_ids == full.token_ids[:num_tokens]
    # No delta ever carried the stop string's first half, even before it was complete.
    assert "".join(result.deltas) == full.text[:start]


def test_eos_min_tokens_ignore_eos_and_stop_token_ids(demo, make_engine):
    _, tokenizer = demo
    eos = tokenizer.eos_token_ids[0]
    hello = tokenizer.encode("Hello")[0]
    prompt = random_prompts(1, seed=12)[0]
    engine = make_engine()

    async def main():
        forced_eos = dict(temperature=0.0, max_tokens=10, logit_bias={eos: 100.0})
        return (
            await collect(engine, request(prompt, **forced_eos)),
            await collect(engine, request(prompt, min_tokens=4, **forced_eos)),
            await collect(engine, request(prompt, ignore_eos=True, **forced_eos)),
            await collect(engine, request(prompt, temperature=0.0, logit_bias={hello: 100.0}, stop_token_ids=[hello])),
        )

    at_once, after_min, ignored, stop_token = (r.choices[0] for r in run(main()))
    assert (at_once.token_ids, at_once.text, at_once.finish_reason, at_once.stop_reason) == ([eos], "", "stop", None)
    assert len(after_min.token_ids) == 5 and after_min.token_ids[-1] == eos and eos not in after_min.token_ids[:-1]
    assert after_min.finish_reason == "stop"
    assert ignored.token_ids == [eos] * 10 and ignored.finish_reason == "length"
    assert (stop_token.token_ids, stop_token.text) == ([hello], "")  # the stop token's text is not shown
    assert (stop_token.finish_reason, stop_token.stop_reason) == ("stop", hello)


def test_logprobs_are_those_of_the_model(demo, make_engine):
    model, _ = demo
    prompt = random_prompts(1, seed=13)[0]
    engine = make_engine()
    choice = run(collect(engine, request(**greedy(prompt, 6), logprobs=3))).choices[0]
    assert [lp.token_id for lp in choice.logprobs] == choice.token_ids
    for lp in choice.logprobs:
        assert len(lp.top) == 3 and lp.top[0] == (lp.token_id, pytest.approx(lp.logprob))
    kv_cache = model.allocate_kv_cache(8, BLOCK_SIZE)
    logits = model.forward(make_batch([SequenceStep(prompt, 0, range(8))], BLOCK_SIZE, "cpu"), kv_cache)[0]
    expected = torch.log_softmax(logits, -1).topk(3)
    first = choice.logprobs[0]
    assert [t for t, _ in first.top] == expected.indices.tolist()
    assert [v for _, v in first.top] == pytest.approx(expected.values.tolist(), abs=1e-4)


def test_cancelled_aborted_and_finished_requests_return_every_block(make_engine):
    engine = make_engine()
    requests = [request(**greedy(p, 300 if i < 3 else 20)) for i, p in enumerate(random_prompts(4, seed=14))]

    async def read(iterator, outputs: int) -> None:
        for _ in range(outputs):
            await anext(iterator)

    async def main():
        streams = [engine.generate(r) for r in requests]
        await asyncio.gather(*(read(s, 2) for s in streams))
        assert engine.stats().kv_blocks_used > 0
        await streams[0].aclose()  # the consumer stops iterating
        task = asyncio.ensure_future(read(streams[1], 1000))
        await asyncio.sleep(0.02)
        task.cancel()  # the consumer's task is cancelled (the client has gone)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        engine.abort(requests[2].request_id)
        aborted = [output async for output in streams[2]]
        finished = [output async for output in streams[3]]
        await wait_until(lambda: engine.stats().kv_blocks_used == 0)
        return aborted, finished

    aborted, finished = run(main())
    assert aborted[-1].finished and aborted[-1].choices[0].finish_reason == "abort"
    assert finished[-1].choices[0].finish_reason == "length"
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == 0


def test_over_long_request_is_rejected_without_affecting_others(demo, make_engine):
    model, _ = demo
    prompts = random_prompts(3, seed=15, lengths=(5, 20))
    expected = [reference_greedy(model, p, 20) for p in prompts]
    engine = make_engine(max_model_len=64)

    async def rejected(req: GenerationRequest) -> RequestRejected:
        with pytest.raises(RequestRejected) as info:
            await collect(engine, req)
        return info.value

    async def main():
        return await asyncio.gather(
            *(collect(engine, request(**greedy(p, 20))) for p in prompts),
            rejected(request(**greedy(prompts[0], 60))),
            rejected(request(**greedy(list(range(1, 70)), 1))),
        )

    *results, too_long, prompt_too_long = run(main())
    assert [r.choices[0].token_ids for r in results] == expected
    assert (too_long.code, too_long.param) == ("context_length_exceeded", "max_tokens")
    assert "maximum context length is 64 tokens" in str(too_long)
    assert (prompt_too_long.code, prompt_too_long.param) == ("context_length_exceeded", "prompt")
    assert engine.stats().kv_blocks_used == 0


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(demo, make_engine, monkeypatch):
    model, _ = demo
    engine = make_engine()
    runner = engine._core.runner
    run_batch = runner.run

    def run_or_fail(batch):
        if any(seq.request_id == "poison" for seq in batch.seqs):
            raise RuntimeError("injected failure")
        return run_batch(batch)

    monkeypatch.setattr(runner, "run", run_or_fail)
    healthy_prompt, later_prompt = random_prompts(2, seed=16)

    async def main():
        healthy = engine.generate(request(**greedy(healthy_prompt, 40)))
        first = await anext(healthy)  # running (decoding) before the poisoned request arrives
        poisoned = GenerationRequest("poison", random_prompts(1, seed=17)[0], SamplingParams(max_tokens=5))
        with pytest.raises(RequestFailed, match="injected failure"):
            await collect(engine, poisoned)
        rest = [output async for output in healthy]
        later = await collect(engine, request(**greedy(later_prompt, 10)))
        return first, rest, later

    first, rest, later = run(main())
    healthy_tokens = first.choices[0].token_ids + [t for out in rest for c in out.choices for t in c.token_ids]
    assert healthy_tokens == reference_greedy(model, healthy_prompt, 40)
    assert later.choices[0].token_ids == reference_greedy(model, later_prompt, 10)
    assert engine.is_alive and engine.stats().kv_blocks_used == 0


def test_queue_limit_shutdown_and_bad_requests(make_engine):
    engine = make_engine(max_queue=2)
    prompt = random_prompts(1, seed=18)[0]

    async def main():
        streams = [engine.generate(request(**greedy(prompt, 500))) for _ in range(3)]
        firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
        assert sum(isinstance(f, EngineOverloaded) for f in firsts) == 1
        with pytest.raises(RequestRejected) as info:
            await anext(engine.generate(request(prompt, top_p=0.0)))
        assert info.value.param == "top_p"
        with pytest.raises(RequestRejected):
            await anext(engine.generate(request([], max_tokens=3)))
        running = next(s for s, f in zip(streams, firsts) if not isinstance(f, Exception))
        engine.shutdown()
        with pytest.raises(EngineDead):
            async for _ in running:
                pass
        with pytest.raises(EngineDead):
            await anext(engine.generate(request(prompt, max_tokens=3)))

    run(main())
    assert not engine.is_alive


def test_a_slow_consumer_gets_what_piled_up_merged(make_engine):
    engine = make_engine()
    prompt = random_prompts(1, seed=19)[0]
    params = dict(temperature=3.0, seed=1, n=2, max_tokens=30, ignore_eos=True, logprobs=1)

    async def slow() -> tuple[dict[int, Choice], int]:
        choices: dict[int, Choice] = {}
        largest = 0
        async for output in engine.generate(request(prompt, **params)):
            # Block the event loop until the engine has delivered the whole request: every later
            # output piles up behind this one.
            deadline = time.monotonic() + 60
            while engine.stats().num_running + engine.stats().num_waiting and time.monotonic() < deadline:
                time.sleep(0.01)
            for delta in output.choices:
                choice = choices.setdefault(delta.index, Choice())
                choice.text += delta.text
                choice.token_ids += delta.token_ids
                choice.logprobs += delta.logprobs
                choice.finish_reason = delta.finish_reason
                largest = max(largest, len(delta.token_ids))
        return choices, largest

    fast = run(collect(engine, request(prompt, **params))).choices
    slow_choices, largest = run(slow())
    assert largest > 1
    for index in (0, 1):
        assert slow_choices[index].token_ids == fast[index].token_ids
        assert slow_choices[index].text == fast[index].text
        assert [lp.token_id for lp in slow_choices[index].logprobs] == fast[index].token_ids
        assert slow_choices[index].finish_reason == "length"


def test_a_finished_request_frees_its_id_before_its_iterator_is_closed(make_engine):
    engine = make_engine()
    req = request(**greedy(random_prompts(1, seed=20)[0], 3))

    async def main():
        stream = engine.generate(req)
        while not (await anext(stream)).finished:
            pass
        stats = engine.stats()
        again = await collect(engine, req)  # the same request id, while the first iterator is still open
        await stream.aclose()
        return stats, again

    stats, again = run(main())
    assert stats.num_running == stats.num_waiting == 0
    assert again.choices[0].finish_reason == "length" and len(again.choices[0].token_ids) == 3


def test_a_request_larger_than_the_whole_cache_is_rejected(make_engine):
    engine = make_engine(num_kv_blocks=3)  # 48 tokens: the context shrinks to what the cache holds
    assert engine.max_model_len == 48
    prompt = random_prompts(1, seed=21, lengths=(10, 11))[0]

    async def main():
        with pytest.raises(RequestRejected) as info:
            await anext(engine.generate(request(**greedy(prompt, 39))))
        fits = await collect(engine, request(**greedy(prompt, 38)))
        return info.value, fits

    rejected, fits = run(main())
    assert (rejected.code, rejected.param) == ("context_length_exceeded", "max_tokens")
    assert len(fits.choices[0].token_ids) == 38 and engine.stats().kv_blocks_used == 0


def test_cpu_default_context_is_the_checkpoints_and_the_cache_holds_it_within_a_memory_share(demo, monkeypatch, caplog):
    import server.engine.config as engine_config

    model, _ = demo
    block_bytes = engine_config.kv_block_bytes(model, 16)
    assert block_bytes == 2 * 2 * 16 * 2 * 128 * 4  # K and V, 2 layers, 16 tokens, 2 kv heads of 128 fp32
    with caplog.at_level("INFO", logger="nanoserve.engine"):
        roomy = resolve_config(EngineConfig(), model)
    assert roomy.max_model_len == 40960 == model.config.max_position_embeddings
    assert roomy.num_kv_blocks == 40960 // 16 * 8
    assert "KV cache: 20480 blocks (1.25 GiB) for 8 sequences of 40960 tokens" in caplog.text
    # A machine with 1 GiB available: a quarter of it, 4096 blocks of 64 KiB, a context cut to what they hold.
    monkeypatch.setattr(engine_config, "available_memory_bytes", lambda: 2**30)
    caplog.clear()
    with caplog.at_level("INFO", logger="nanoserve.engine"):
        tight = resolve_config(EngineConfig(), model)
    assert tight.num_kv_blocks == 2**30 // 4 // block_bytes == 4096
    assert tight.max_model_len == 40960  # 65,536 tokens in all: one sequence still holds the whole context
    assert "25% of the 1.0 GiB of memory available, short of 8 sequences of 40960 tokens" in caplog.text
    monkeypatch.setattr(engine_config, "available_memory_bytes", lambda: 2**26)
    assert resolve_config(EngineConfig(), model).max_model_len == 2**24 // block_bytes * 16 == 4096
    with pytest.raises(ValueError, match="--max-model-len 8192 does not fit the KV cache"):
        resolve_config(EngineConfig(max_model_len=8192), model)
