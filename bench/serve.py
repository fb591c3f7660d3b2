"""Load test of a running OpenAI-compatible server: throughput and latency percentiles under load.

    python bench/serve.py --url http://127.0.0.1:8000 --concurrency 1,4,16 --requests 64

For each concurrency level, N clients stream requests (`/v1/chat/completions` or
`/v1/completions`) either back to back (`--arrival fixed`) or as a Poisson process at `--rate`
requests/s with at most N in flight (`--arrival poisson`; `--request-rate R`, vLLM's flag, is
`--arrival poisson --rate R`). Every request asks for exactly
`--output-tokens` tokens (`ignore_eos`), so the work per request is fixed. With `--response-format`
(chat only) every reply is constrained by a grammar instead: `json_object`, or the JSON schema in a
file; the grammar ends a reply when its JSON is complete, so `ignore_eos` is not sent, and
bench/schemas/records.json asks for more records than `--output-tokens` holds, so that replies
still run to the limit and the run compares with an unconstrained one token for token. Reported per level:
output tokens/s, requests/s, time to first token (TTFT), inter-token latency (ITL, the gaps
between streamed chunks, divided by the tokens each chunk carries) and end-to-end latency as
p50/p90/p99, the prefix-cache hit rate (prompt tokens the server reports as cached in
`usage.prompt_tokens_details.cached_tokens`, over all prompt tokens), and errors. Writes JSON and, with matplotlib installed, a PNG of latency against load.

With `--hf-baseline DIR` (the checkpoint the server serves), the same run then measures
transformers' batch-1 `generate()` decode rate on those weights on this machine (while the
server idles) and reports each level's throughput as a multiple of it.

    python -m bench.serve --url http://127.0.0.1:8000 --concurrency 1,8 --hf-baseline /path/to/ckpt

With `--kernels SPEC` it starts `nanoserve serve --kernels SPEC` of this checkout itself (on a free
port, with `--serve-args`), runs against it and stops it: the spec of `bench.kernels --kernels`,
plug-ins included, measured end to end.

    python -m bench.serve --kernels triton,decode_attention=mykernels.flash:decode --serve-args '--model DIR'
"""

import argparse
import asyncio
import json
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.report import comma_ints

WORDS = "the of and to in is that for it as with was on be by at this from or an are not have but".split()


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server took from its prefix cache
    itl_s: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # perf_counter() of each chunk with text
    text: str = ""


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": statistics.median(ordered), "p90": at(0.90), "p99": at(0.99)}


def make_prompt(words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def request_body(args: argparse.Namespace, model: str, prompt: str) -> dict:
    body = {
        "model": model,
        "max_tokens": args.output_tokens,
        "temperature": args.temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        if args.response_format is not None:
            body["response_format"] = args.response_format
            del body["ignore_eos"]  # the grammar ends the reply; the server refuses the two together
    else:
        body["prompt"] = prompt
    return body


def chunk_text(chunk: dict, endpoint: str) -> str:
    if not chunk.get("choices"):
        return ""
    choice = chunk["choices"][0]
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


async def one_request(
    client: httpx.AsyncClient, endpoint: str, body: dict, streaming: asyncio.Event | None = None
) -> RequestResult:
    """Stream one request (`endpoint` chat or completions) and time its chunks; `streaming` is
    set once its first text has arrived."""
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    start = time.perf_counter()
    chunk_times: list[float] = []
    texts: list[str] = []
    usage = None
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")[:200]
                return RequestResult(ok=False, error=f"HTTP {response.status_code}: {detail}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(ok=False, error=chunk["error"].get("message", "stream error"))
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if text := chunk_text(chunk, endpoint):
                    chunk_times.append(time.perf_counter())
                    texts.append(text)
                    if streaming is not None:
                        streaming.set()
    except httpx.HTTPError as err:
        return RequestResult(ok=False, error=f"{type(err).__name__}: {err}")
    end = time.perf_counter()
    if not chunk_times or usage is None:
        return RequestResult(ok=False, error="stream ended without text or usage")
    output_tokens = usage["completion_tokens"]
    # A chunk can carry several tokens (text held back across a UTF-8 character): spread its gap.
    gaps = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    tokens_per_gap = max(1.0, (output_tokens - 1) / max(1, len(gaps)))
    return RequestResult(
        ok=True,
        ttft_s=chunk_times[0] - start,
        e2e_s=end - start,
        output_tokens=output_tokens,
        prompt_tokens=usage["prompt_tokens"],
        cached_tokens=(usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0,
        itl_s=[g / tokens_per_gap for g in gaps],
        chunk_times=chunk_times,
        text="".join(texts),
    )


async def run_level(args: argparse.Namespace, model: str, concurrency: int) -> dict:
    rng = random.Random(args.seed + concurrency)
    prompts = [make_prompt(args.prompt_words, rng) for _ in range(args.requests)]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4)
    timeout = httpx.Timeout(args.timeout)
    results: list[RequestResult] = []
    in_flight = asyncio.Semaphore(concurrency)

    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits, timeout=timeout) as client:

        async def send(prompt: str) -> None:
            async with in_flight:
                results.append(await one_request(client, args.endpoint, request_body(args, model, prompt)))

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            if args.arrival == "poisson":
                await asyncio.sleep(rng.expovariate(args.rate))
            tasks.append(asyncio.create_task(send(prompt)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - start

    rate = args.rate if args.arrival == "poisson" else None
    return {"concurrency": concurrency, "request_rate": rate} | summarize(results, duration)


def summarize(results: list[RequestResult], duration: float) -> dict:
    """Throughput, latency percentiles and the prefix-cache hit rate of requests run in `duration` s."""
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if not r.ok})[:3],
        "duration_s": duration,
        "output_tokens_per_s": output_tokens / duration,
        "requests_per_s": len(ok) / duration,
        "prompt_tokens_mean": statistics.mean(r.prompt_tokens for r in ok) if ok else None,
        "cache_hit_rate": sum(r.cached_tokens for r in ok) / prompt_tokens if prompt_tokens else None,
        "ttft_s": percentiles([r.ttft_s for r in ok]),
        "itl_s": percentiles([g for r in ok for g in r.itl_s]),
        "e2e_s": percentiles([r.e2e_s for r in ok]),
    }


def print_table(levels: list[dict]) -> None:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1e3:.1f}"

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value * 100:.1f}"

    header = (f"{'conc':>5} {'req':>5} {'err':>4} {'tok/s':>9} {'req/s':>7} {'TTFT p50/p90/p99 ms':>22} "
              f"{'ITL p50/p90/p99 ms':>22} {'cache hit %':>12}")
    print(header)
    for lv in levels:
        ttft, itl = lv["ttft_s"], lv["itl_s"]
        print(
            f"{lv['concurrency']:>5} {lv['requests']:>5} {lv['errors']:>4} {lv['output_tokens_per_s']:>9.1f} "
            f"{lv['requests_per_s']:>7.2f} {ms(ttft['p50']) + '/' + ms(ttft['p90']) + '/' + ms(ttft['p99']):>22} "
            f"{ms(itl['p50']) + '/' + ms(itl['p90']) + '/' + ms(itl['p99']):>22} {pct(lv['cache_hit_rate']):>12}"
        )


def plot(levels: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    conc = [lv["concurrency"] for lv in levels]
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4))
    for metric, style in (("ttft_s", "o-"), ("itl_s", "s-")):
        for q, alpha in (("p50", 1.0), ("p99", 0.5)):
            values = [lv[metric][q] * 1e3 if lv[metric][q] is not None else None for lv in levels]
            lat.plot(conc, values, style, alpha=alpha, label=f"{metric[:-2].upper()} {q}")
    lat.set(xlabel="concurrent clients", ylabel="latency (ms)", title="latency vs load", xscale="log", yscale="log")
    lat.legend()
    thr.plot(conc, [lv["output_tokens_per_s"] for lv in levels], "o-")
    thr.set(xlabel="concurrent clients", ylabel="output tokens/s", title="throughput vs load", xscale="log")
    for ax in (lat, thr):  # label the measured levels themselves, not powers of ten
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.minorticks_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def hf_batch1_decode_tok_s(model_dir: str, prompt_len: int, new_tokens: int) -> float:
    """transformers' batch-1 greedy decode rate on `model_dir` (checkpoint dtype, CPU or CUDA)."""
    import torch

    from bench.generate import hf_generate_time
    from bench.timing import on_own_thread
    from model.load import resolve_device
    from transformers import Qwen3ForCausalLM

    device = resolve_device("auto")
    hf = on_own_thread(lambda: Qwen3ForCausalLM.from_pretrained(model_dir).to(device).eval())
    prompt = torch.randint(0, 151643, (1, prompt_len), device=device)
    first = on_own_thread(hf_generate_time, hf, prompt, 1, 3, device)
    total = on_own_thread(hf_generate_time, hf, prompt, new_tokens + 1, 3, device)
    return new_tokens / (total - first)


def discover_model(args: argparse.Namespace) -> str:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    response = httpx.get(f"{args.url}/v1/models", headers=headers, timeout=10)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default %(default)s)")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat", help="default %(default)s")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None, help="Bearer key, if the server has one")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default %(default)s)")
    p.add_argument("--requests", type=int, default=32, help="requests per level (default %(default)s)")
    p.add_argument("--arrival", choices=["fixed", "poisson"], default="fixed",
                   help="fixed: back to back; poisson: --rate requests/s (default %(default)s)")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, requests/s (default %(default)s)")
    p.add_argument("--request-rate", type=float, default=None, metavar="R",
                   help="Poisson arrivals at R requests/s (as vLLM names it): --arrival poisson --rate R")
    p.add_argument("--prompt-words", type=int, default=64, help="words per prompt (default %(default)s)")
    p.add_argument("--output-tokens", type=int, default=64, help="tokens per response (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="default %(default)s")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default %(default)s)")
    p.add_argument("--out", default="bench/out/serve.json", help="JSON output (default %(default)s)")
    p.add_argument("--plot", default="bench/out/serve.png", help="PNG output (default %(default)s)")
    p.add_argument("--response-format", default=None, metavar="json_object|SCHEMA.json",
                   help="constrain every chat reply: any JSON object, or the JSON schema in this file")
    p.add_argument("--hf-baseline", default=None, metavar="DIR",
                   help="also measure transformers' batch-1 decode rate on this checkpoint and report ratios")
    p.add_argument("--kernels", default=None, metavar="SPEC",
                   help="instead of --url, start `nanoserve serve --kernels SPEC` (plug-ins included) for the run")
    p.add_argument("--serve-args", default="", metavar="'ARGS'",
                   help="with --kernels: more flags for that server, e.g. '--model DIR --max-num-seqs 64'")
    args = p.parse_args(argv)
    if args.request_rate is not None:
        args.arrival, args.rate = "poisson", args.request_rate
    args.levels = comma_ints(p, "--concurrency", args.concurrency)
    if any(c < 1 for c in args.levels) or args.requests < 1 or args.output_tokens < 1 or args.rate <= 0:
        p.error("--concurrency levels, --requests, --output-tokens and --rate must be positive")
    args.response_format = response_format(p, args.response_format, args.endpoint)
    return args


def response_format(p: argparse.ArgumentParser, value: str | None, endpoint: str) -> dict | None:
    """The chat `response_format` that --response-format names."""
    if value is None:
        return None
    if endpoint != "chat":
        p.error("--response-format needs --endpoint chat")
    if value == "json_object":
        return {"type": "json_object"}
    try:
        schema = json.loads(Path(value).read_text())
    except (OSError, ValueError) as err:
        p.error(f"--response-format: {value} is neither json_object nor a readable JSON schema file ({err})")
    return {"type": "json_schema", "json_schema": {"name": Path(value).stem, "schema": schema, "strict": True}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.kernels is None:
        return run_against(args)
    from bench.launch import launched_server

    try:
        with launched_server(args.kernels, shlex.split(args.serve_args)) as args.url:
            return run_against(args)
    except RuntimeError as err:
        print(f"bench/serve.py: {err}", file=sys.stderr)
        return 2


def run_against(args: argparse.Namespace) -> int:
    """The load test against the server at `args.url`."""
    try:
        model = args.model or discover_model(args)
    except httpx.HTTPError as err:
        print(f"bench/serve.py: cannot reach {args.url}: {err}", file=sys.stderr)
        return 2
    levels = []
    for concurrency in args.levels:
        print(f"level: {concurrency} clients, {args.requests} requests ...", file=sys.stderr)
        levels.append(asyncio.run(run_level(args, model, concurrency)))
    print_table(levels)
    report = {"args": {k: v for k, v in vars(args).items() if k != "api_key"}, "model": model, "levels": levels}
    if args.hf_baseline:
        print("HF batch-1 baseline ...", file=sys.stderr)
        prompt_len = round(levels[0]["prompt_tokens_mean"] or args.prompt_words)
        baseline = hf_batch1_decode_tok_s(args.hf_baseline, prompt_len, args.output_tokens)
        report["hf_batch1_decode_tok_s"] = baseline
        print(f"transformers generate(), batch 1: {baseline:.1f} decode tok/s")
        for lv in levels:
            lv["x_hf_batch1"] = lv["output_tokens_per_s"] / baseline
            print(f"  {lv['concurrency']:>3} clients: {lv['x_hf_batch1']:.2f}x HF batch 1")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}" + (f" and {args.plot}" if plot(levels, Path(args.plot)) else " (no matplotlib: no plot)"))
    return 1 if any(lv["errors"] for lv in levels) else 0


if __name__ == "__main__":
    sys.exit(main())
