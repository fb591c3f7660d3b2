"""Serving workloads for the prefix cache and mixed prefill/decode steps, against a running server.

    python -m bench.workloads --url http://127.0.0.1:8000 [--workloads chat,long-prompts,repeat]

- chat: `--conversations` chats at once, each `--turns` turns over one shared system prompt of
  `--system-words` words (about as many tokens). Every turn sends the conversation so far (system
  prompt, earlier user messages and replies) plus a new user message and streams a reply of
  `--output-tokens` tokens. Reported: TTFT p50/p99 over all turns and over the turns after the
  first, output tokens/s, and the prefix-cache hit rate (`usage.prompt_tokens_details.cached_tokens`
  over prompt tokens).
- long-prompts: `--streams` completions decode `--stream-tokens` tokens each; once they stream,
  `--long-prompts` prompts of `--long-prompt-tokens` token ids arrive one after another. Reported:
  the running streams' chunk gaps (ITL) p50/p99/max from the first long prompt's arrival to the
  last one's first token, the fewest chunks any stream received while one long prompt waited for
  its first token, and the long prompts' TTFT.
- repeat: TTFT of a fresh `--repeat-tokens`-token prompt (cold) against a prompt whose first
  `--repeat-shared` tokens were served just before (warm), medians over `--repeats`, their ratio,
  and the cached tokens the warm one reports.

To compare engine settings, run it against servers started with each (e.g. `nanoserve serve` and
`nanoserve serve --no-prefix-caching`). Every request is greedy with `ignore_eos`, so the work per
request is fixed. Writes JSON to `--out`.
"""

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

from bench.serve import RequestResult, discover_model, make_prompt, one_request, percentiles, summarize

VOCAB = 151643  # ordinary (non-special) Qwen3 token ids


def stream_body(model: str, max_tokens: int, **fields) -> dict:
    return {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **fields}


def token_ids(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(count)]


def checked(result: RequestResult) -> RequestResult:
    if not result.ok:
        raise RuntimeError(f"request failed: {result.error}")
    return result


async def chat_workload(client: httpx.AsyncClient, model: str, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    system = make_prompt(args.system_words, rng)
    turns: list[tuple[int, RequestResult]] = []

    async def conversation(index: int) -> None:
        conv_rng = random.Random(args.seed * 1000 + index)
        messages = [{"role": "system", "content": system}]
        for turn in range(args.turns):
            messages.append({"role": "user", "content": make_prompt(args.user_words, conv_rng)})
            body = stream_body(model, args.output_tokens, messages=messages)
            result = checked(await one_request(client, "chat", body))
            turns.append((turn, result))
            messages.append({"role": "assistant", "content": result.text})

    start = time.perf_counter()
    await asyncio.gather(*(conversation(i) for i in range(args.conversations)))
    report = summarize([result for _, result in turns], time.perf_counter() - start)
    report["ttft_s_later_turns"] = percentiles([result.ttft_s for turn, result in turns if turn > 0])
    return report


async def long_prompt_workload(client: httpx.AsyncClient, model: str, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    started = [asyncio.Event() for _ in range(args.streams)]
    streams = [
        asyncio.create_task(one_request(client, "completions", stream_body(
            model, args.stream_tokens, prompt=token_ids(rng, 32)), event))
        for event in started
    ]
    for event in started:
        await event.wait()
    windows = []  # (arrival, first token) of each long prompt
    long_results = []
    for _ in range(args.long_prompts):
        sent = time.perf_counter()
        result = checked(await one_request(client, "completions", stream_body(
            model, 4, prompt=token_ids(rng, args.long_prompt_tokens))))
        windows.append((sent, sent + result.ttft_s))
        long_results.append(result)
    running = [checked(result) for result in await asyncio.gather(*streams)]
    first, last = windows[0][0], windows[-1][1]
    if any(result.chunk_times[-1] < last for result in running):
        raise RuntimeError("a stream ended before the last long prompt's first token: raise --stream-tokens")
    gaps = [b - a for r in running for a, b in zip(r.chunk_times, r.chunk_times[1:]) if first < b <= last]
    during = [sum(start < t <= end for t in r.chunk_times) for r in running for start, end in windows]
    return {
        "stream_itl_s_while_prefilling": percentiles(gaps) | {"max": max(gaps)},
        "fewest_stream_chunks_during_a_prefill": min(during),
        "long_prompt_ttft_s": percentiles([result.ttft_s for result in long_results]),
        "long_prompt_tokens": long_results[0].prompt_tokens,
    }


async def repeat_workload(client: httpx.AsyncClient, model: str, args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    cold, warm, cached = [], [], []
    for _ in range(args.repeats):
        fresh = checked(await one_request(client, "completions", stream_body(
            model, 4, prompt=token_ids(rng, args.repeat_tokens))))
        cold.append(fresh.ttft_s)
        shared = token_ids(rng, args.repeat_shared)
        checked(await one_request(client, "completions", stream_body(model, 4, prompt=shared)))
        prompt = shared + token_ids(rng, args.repeat_tokens - args.repeat_shared)
        again = checked(await one_request(client, "completions", stream_body(model, 4, prompt=prompt)))
        warm.append(again.ttft_s)
        cached.append(again.cached_tokens)
    cold_s, warm_s = statistics.median(cold), statistics.median(warm)
    return {"cold_ttft_s": cold_s, "warm_ttft_s": warm_s, "warm_over_cold": warm_s / cold_s,
            "warm_cached_tokens": min(cached), "cold_ttft_samples_s": cold, "warm_ttft_samples_s": warm}


WORKLOADS = {"chat": chat_workload, "long-prompts": long_prompt_workload, "repeat": repeat_workload}


def print_report(name: str, report: dict) -> None:
    def ms(value: float) -> str:
        return f"{value * 1e3:.1f}"

    if name == "chat":
        ttft, later = report["ttft_s"], report["ttft_s_later_turns"]
        print(f"chat: {report['requests']} turns, {report['output_tokens_per_s']:.1f} "
              f"output tok/s, {report['requests_per_s']:.2f} turns/s, prompt {report['prompt_tokens_mean']:.0f} "
              f"tokens on average, cache hit {report['cache_hit_rate'] * 100:.1f}%")
        print(f"  TTFT p50/p99 ms: all turns {ms(ttft['p50'])}/{ms(ttft['p99'])}, "
              f"turns 2.. {ms(later['p50'])}/{ms(later['p99'])}")
    elif name == "long-prompts":
        itl, ttft = report["stream_itl_s_while_prefilling"], report["long_prompt_ttft_s"]
        print(f"long prompts ({report['long_prompt_tokens']} tokens): running streams' ITL while they prefill "
              f"p50/p99/max {ms(itl['p50'])}/{ms(itl['p99'])}/{ms(itl['max'])} ms; "
              f"fewest chunks a stream got during one prefill: {report['fewest_stream_chunks_during_a_prefill']}; "
              f"long prompt TTFT p50 {ms(ttft['p50'])} ms")
    else:
        print(f"repeat: TTFT cold {ms(report['cold_ttft_s'])} ms, warm {ms(report['warm_ttft_s'])} ms "
              f"(warm/cold {report['warm_over_cold']:.3f}), warm cached tokens {report['warm_cached_tokens']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default %(default)s)")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None, help="Bearer key, if the server has one")
    p.add_argument("--workloads", default="chat,long-prompts,repeat", help="comma-separated (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default %(default)s)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s (default %(default)s)")
    p.add_argument("--out", default="bench/out/workloads.json", help="JSON output (default %(default)s)")
    chat = p.add_argument_group("chat")
    chat.add_argument("--conversations", type=int, default=16, help="chats at once (default %(default)s)")
    chat.add_argument("--turns", type=int, default=4, help="turns per chat (default %(default)s)")
    chat.add_argument("--system-words", type=int, default=1000, help="shared system prompt (default %(default)s)")
    chat.add_argument("--user-words", type=int, default=40, help="words per user message (default %(default)s)")
    chat.add_argument("--output-tokens", type=int, default=32, help="tokens per reply (default %(default)s)")
    long = p.add_argument_group("long-prompts")
    long.add_argument("--streams", type=int, default=4, help="running streams (default %(default)s)")
    long.add_argument("--stream-tokens", type=int, default=400, help="tokens per stream (default %(default)s)")
    long.add_argument("--long-prompts", type=int, default=3,
                      help="long prompts, one after another (default %(default)s)")
    long.add_argument("--long-prompt-tokens", type=int, default=2000, help="default %(default)s")
    repeat = p.add_argument_group("repeat")
    repeat.add_argument("--repeats", type=int, default=5, help="cold/warm pairs (default %(default)s)")
    repeat.add_argument("--repeat-tokens", type=int, default=1500, help="prompt tokens (default %(default)s)")
    repeat.add_argument("--repeat-shared", type=int, default=1400, help="of them served before (default %(default)s)")
    args = p.parse_args(argv)
    args.workload_names = args.workloads.split(",")
    if unknown := set(args.workload_names) - set(WORKLOADS):
        p.error(f"--workloads: unknown {sorted(unknown)}; choose from {sorted(WORKLOADS)}")
    if not 0 < args.repeat_shared < args.repeat_tokens:
        p.error("--repeat-shared must be positive and below --repeat-tokens")
    return args


async def run_workloads(args: argparse.Namespace, model: str) -> dict:
    limits = httpx.Limits(max_connections=args.conversations + args.streams + 4)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout)) as client:
        reports = {}
        for name in args.workload_names:
            print(f"workload: {name} ...", file=sys.stderr)
            reports[name] = await WORKLOADS[name](client, model, args)
            print_report(name, reports[name])
        return reports


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = args.model or discover_model(args)
        reports = asyncio.run(run_workloads(args, model))
    except (httpx.HTTPError, RuntimeError) as err:
        print(f"bench.workloads: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "api_key"}
    out.write_text(json.dumps({"args": settings, "model": model, "workloads": reports}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
