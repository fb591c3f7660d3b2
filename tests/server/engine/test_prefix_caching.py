"""The engine with its prefix cache and mixed steps, as callers see it (demo model, fp32, CPU):
cached prefixes are not recomputed and are reported, outputs equal those with the cache off,
running streams keep moving while a long prompt is prefilled, and no block leaks."""

import asyncio
import contextlib
import random
from collections import Counter

from server.engine.config import EngineConfig, resolve_config
from server.engine.core import EngineCore
from server.engine.request import GenerationRequest, RequestOutput
from tests.server.engine.test_engine import (  # noqa: F401  (demo and make_engine are fixtures)
    demo,
    greedy,
    make_engine,
    random_prompts,
    reference_greedy,
    request,
    run,
    wait_until,
)


def count_computed_tokens(engine) -> Counter:
    """Tokens the model computes for each request id from now on (prompt chunks and decodes)."""
    computed: Counter = Counter()
    runner = engine._core.runner
    run_batch = runner.run

    def counting_run(batch):
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            computed[seq.request_id] += num_new
        return run_batch(batch)

    runner.run = counting_run
    return computed


async def generate(engine, req: GenerationRequest) -> tuple[RequestOutput, dict[int, list[int]]]:
    """The request's last output and every choice's tokens."""
    tokens: dict[int, list[int]] = {}
    async for output in engine.generate(req):
        for delta in output.choices:
            tokens.setdefault(delta.index, []).extend(delta.token_ids)
    return output, tokens


def test_a_prompt_served_before_is_taken_from_the_cache_and_reported(demo, make_engine):
    model, _ = demo
    rng = random.Random(1)
    served = [rng.randrange(151643) for _ in range(1400)]
    prompt = served + [rng.randrange(151643) for _ in range(100)]
    engine = make_engine()
    computed = count_computed_tokens(engine)
    cold, warm = request(**greedy(served, 1)), request(**greedy(prompt, 8))

    async def main():
        return await generate(engine, cold), await generate(engine, warm)

    (cold_output, _), (warm_output, tokens) = run(main())
    assert cold_output.num_cached_tokens == 0 and computed[cold.request_id] == 1400
    assert warm_output.num_cached_tokens == 1392  # 87 whole blocks of 16
    assert computed[warm.request_id] == 1500 - 1392 + 7  # the rest of the prompt, then 7 decodes
    assert tokens[0] == reference_greedy(model, prompt, 8)
    stats = engine.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (1400 + 1500, 1392)


def test_choices_of_one_request_share_the_prompt_blocks(demo, make_engine):
    model, _ = demo
    prompt = random_prompts(1, seed=2, lengths=(100, 101))[0]
    engine = make_engine()
    computed = count_computed_tokens(engine)
    req = request(**greedy(prompt, 6), n=4)
    output, tokens = run(generate(engine, req))
    expected = reference_greedy(model, prompt, 6)
    assert [tokens[i] for i in range(4)] == [expected] * 4
    # Choice 0 computes the prompt; the others take its 6 full blocks and compute the last 4 tokens.
    assert computed[req.request_id] == 100 + 3 * 4 + 4 * 5
    assert output.num_cached_tokens == 0  # the prompt counts once: as choice 0 found it
    assert engine.stats().kv_blocks_used == 0


def shared_prefix_workload(seed: int) -> list[dict]:
    """Greedy requests over a few system prompts, some repeated, some with n > 1."""
    rng = random.Random(seed)
    systems = random_prompts(3, seed=seed, lengths=(20, 70))
    workload = []
    for i in range(14):
        prompt = rng.choice(systems) + [rng.randrange(151643) for _ in range(rng.randrange(1, 40))]
        workload.append(greedy(prompt, rng.randrange(4, 20), n=3 if i % 5 == 0 else 1))
    workload.append(dict(workload[1]))  # an exact repeat
    return workload


def test_greedy_outputs_equal_with_and_without_the_cache_under_eviction_and_preemption(make_engine):
    workload = shared_prefix_workload(seed=3)
    baseline = make_engine(enable_prefix_caching=False)
    tiny = make_engine(num_kv_blocks=14, max_num_batched_tokens=48)  # 224 tokens: evicts and preempts
    evictions = []
    manager = tiny._core.block_manager
    take = manager._take

    def counting_take():
        evictions.append(not manager._empty)
        return take()

    manager._take = counting_take

    async def serve(engine) -> list[dict[int, list[int]]]:
        # Two waves: the second finds what the first left in the cache (or what eviction spared).
        first = await asyncio.gather(*(generate(engine, request(**params)) for params in workload[:8]))
        second = await asyncio.gather(*(generate(engine, request(**params)) for params in workload[8:]))
        return [tokens for _, tokens in first + second]

    expected = run(serve(baseline))
    assert run(serve(tiny)) == expected
    stats = tiny.stats()
    assert stats.prefix_cache_hits > 0 and stats.num_preemptions > 0 and any(evictions)
    assert stats.kv_blocks_used == 0 and baseline.stats().prefix_cache_queries == 0


def test_a_running_stream_keeps_receiving_tokens_while_a_long_prompt_is_prefilled(make_engine):
    engine = make_engine(max_num_batched_tokens=256)
    stream_prompt, long_prompt = random_prompts(1, seed=4)[0], random_prompts(1, seed=5, lengths=(2000, 2001))[0]
    received = []

    async def main() -> int:
        stream = engine.generate(request(**greedy(stream_prompt, 60)))
        await anext(stream)  # decoding before the long prompt arrives
        long_request = asyncio.ensure_future(anext(engine.generate(request(**greedy(long_prompt, 1)))))

        async def read_stream():
            async for output in stream:
                received.append(sum(len(delta.token_ids) for delta in output.choices))

        reader = asyncio.ensure_future(read_stream())
        await long_request
        tokens_before_first = sum(received)
        await reader
        return tokens_before_first

    tokens_meanwhile = run(main())
    # 2000 prompt tokens in chunks of 255 beside the stream's decode token: 8 steps.
    assert tokens_meanwhile >= 6


def test_blocks_in_use_are_exactly_those_of_running_sequences(make_engine):
    """Finished, cancelled, aborted and preempted requests over shared prefixes: after every step
    the used count is the set of blocks in running sequences' tables, and at the end nothing."""
    engine = make_engine(num_kv_blocks=12, max_num_batched_tokens=64)
    core = engine._core
    step = core.step
    mismatches = []

    def checked_step():
        outputs = step()
        held = {block for seq in core.scheduler.running for block in seq.block_table}
        if core.block_manager.num_used != len(held):
            mismatches.append((core.block_manager.num_used, len(held)))
        return outputs

    core.step = checked_step
    workload = shared_prefix_workload(seed=6)

    async def consume(index: int, params: dict) -> None:
        iterator = engine.generate(request(**params))
        if index % 4 == 1:  # cancelled after two outputs
            with contextlib.suppress(StopAsyncIteration):
                await anext(iterator)
                await anext(iterator)
            await iterator.aclose()
        else:
            async for _ in iterator:
                pass

    async def main():
        await asyncio.gather(*(consume(i, params) for i, params in enumerate(workload)))
        await wait_until(lambda: not core.has_work())

    run(main())
    stats = engine.stats()
    assert mismatches == [] and stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert stats.kv_blocks_used == 0 and 0 < stats.kv_blocks_cached <= stats.kv_blocks_total


def test_blocks_of_a_prompt_cancelled_mid_prefill_are_found_only_where_computed(demo):
    """A chunked prefill registers only the blocks a finished step has written: after the first
    chunk is cancelled, the same prompt finds that chunk's blocks and computes the rest."""
    model, tokenizer = demo
    core = EngineCore(model, tokenizer, resolve_config(EngineConfig(max_num_batched_tokens=64), model))
    prompt = random_prompts(1, seed=7, lengths=(300, 301))[0]
    cancelled = request(**greedy(prompt, 1))
    core.add_request(cancelled)
    core.step()  # the first chunk: tokens 0..63, 4 blocks written; the other 15 allocated, unwritten
    core.abort(cancelled.request_id)
    again = request(**greedy(prompt, 4))
    core.add_request(again)
    tokens = []
    while core.has_work():
        for _, output in core.step():
            tokens += output.choices[0].token_ids if output.choices else []
    assert output.num_cached_tokens == 64
    assert tokens == reference_greedy(model, prompt, 4)
