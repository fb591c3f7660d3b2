"""Speculative decoding on vs off, same model, same prompts, one run.

    python -m bench.speculative --shape qwen3-0.6b --device cpu --batches 1
    python -m bench.speculative --shape demo --dtype float32 --batches 1,4,16

Workloads, each at every batch size of `--batches` (that many concurrent requests, greedy, EOS
ignored, `--new-tokens` each):
- `prediction exact`: a chat-style `prediction` equal to the output, taken from a first plain run;
- `prediction 10%` / `prediction 50%`: the same with that share of its lines replaced by other
  tokens (a "line" is `--line-tokens` tokens: random weights write no newlines);
- `prediction none`: every line replaced, a prediction that never matches (nothing accepted: what
  speculation costs when it never pays, once its first window fails);
- `prediction wrong`: each output token followed by a random one, so the prediction re-aligns after
  every token and drafts a full window every step that is rejected at its first token: nothing
  accepted, drafts every step (what the acceptance tracking's fallback must make cheap);
- `ngram repetitive` / `ngram random`: `--speculative-config` n-gram prompt lookup on prompts made
  of one random stretch repeated, and on random prompts.
"off" is the same requests without speculation on an engine without the flag. Tokens/s counts
every generated token over the time from the first request's submission to the last one's end,
median over `--repeats`; acceptance is accepted over drafted tokens. Both sides must give the same
tokens (greedy): the bench checks it. Weights are random (`--shape`) or a checkpoint (`--model`).
"""

import argparse
import asyncio
import random
import statistics
import sys
import time
from dataclasses import dataclass, replace

import torch

from bench.report import comma_ints, run_and_report
from bench.timing import on_own_thread
from server.engine.request import GenerationRequest, SamplingParams

WORKLOADS = ("prediction exact", "prediction 10%", "prediction 50%", "prediction none", "prediction wrong",
             "ngram repetitive", "ngram random")
CHANGED_LINES = {"prediction exact": 0.0, "prediction 10%": 0.1, "prediction 50%": 0.5, "prediction none": 1.0}


@dataclass
class Measured:
    seconds: float
    tokens: int
    drafted: int = 0
    accepted: int = 0


def changed_lines(tokens: list[int], share: float, line_tokens: int, rng: random.Random) -> list[int]:
    """`tokens` with `share` of its lines (runs of `line_tokens`) replaced by random tokens; at
    least one line when `share` is not 0."""
    lines = [tokens[i : i + line_tokens] for i in range(0, len(tokens), line_tokens)]
    count = max(1, round(share * len(lines))) if share else 0
    for index in rng.sample(range(len(lines)), count):
        lines[index] = [rng.randrange(151643) for _ in lines[index]]
    return [t for line in lines for t in line]


def interleaved(tokens: list[int], rng: random.Random) -> list[int]:
    """Each of `tokens` followed by a random other token: a prediction that re-aligns after every
    output token and whose next token is always wrong."""
    return [t for token in tokens for t in (token, (token + 1 + rng.randrange(151642)) % 151643)]


def make_prompts(count: int, length: int, repetitive: bool, rng: random.Random) -> list[list[int]]:
    def one() -> list[int]:
        if repetitive:
            stretch = [rng.randrange(151643) for _ in range(16)]
            return (stretch * (length // 16 + 1))[:length]
        return [rng.randrange(151643) for _ in range(length)]

    return [one() for _ in range(count)]


def summarise(rows: list[dict]) -> list[dict]:
    """Per measured row (workload, batch, off and on `Measured` as dicts): tokens/s both ways, the
    ratio and the acceptance rate."""
    out = []
    for row in rows:
        off, on = row["off"], row["on"]
        off_rate, on_rate = off["tokens"] / off["seconds"], on["tokens"] / on["seconds"]
        out.append({"workload": row["workload"], "batch": row["batch"], "off_tok_s": off_rate, "on_tok_s": on_rate,
                    "speedup": on_rate / off_rate,
                    "acceptance": on["accepted"] / on["drafted"] if on["drafted"] else None,
                    "same_tokens": row["same_tokens"]})
    return out


def print_table(result: dict) -> None:
    print(f"speculative decoding, {result['model']}, {result['device']}, {result['dtype']}, "
          f"{result['new_tokens']} new tokens per request; {result['cutoff']}")
    print(f"{'workload':<18} {'batch':>5} {'off tok/s':>10} {'on tok/s':>10} {'on/off':>7} {'accepted':>9} {'same':>5}")
    for row in result["table"]:
        acceptance = "-" if row["acceptance"] is None else f"{row['acceptance']:.0%}"
        print(f"{row['workload']:<18} {row['batch']:>5} {row['off_tok_s']:>10.1f} {row['on_tok_s']:>10.1f} "
              f"{row['speedup']:>6.2f}x {acceptance:>9} {'yes' if row['same_tokens'] else 'NO':>5}")


async def _timed(engine, requests: list[GenerationRequest]) -> tuple[Measured, list[list[int]]]:
    tokens: list[list[int]] = [[] for _ in requests]

    async def one(i: int, request: GenerationRequest) -> None:
        async for output in engine.generate(request):
            for choice in output.choices:
                tokens[i] += choice.token_ids

    stats_before = engine.stats()
    start = time.perf_counter()
    await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    seconds = time.perf_counter() - start
    stats = engine.stats()
    return Measured(seconds, sum(map(len, tokens)),
                    stats.spec_decode_draft_tokens - stats_before.spec_decode_draft_tokens,
                    stats.spec_decode_accepted_tokens - stats_before.spec_decode_accepted_tokens), tokens


_ids = iter(range(10**9))


def _requests(prompts: list[list[int]], new_tokens: int, predictions: list[list[int]] | None = None):
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    return [GenerationRequest(f"bench-{next(_ids)}", p, params, predictions[i] if predictions else None)
            for i, p in enumerate(prompts)]


def _side_by_side(off_run, on_run, repeats: int) -> tuple[Measured, Measured, bool]:
    """Off and on alternately, `repeats` times each (a machine whose speed drifts favours neither),
    their median runs, and whether every run gave the same tokens."""
    offs, ons, same = [], [], True
    for _ in range(repeats):
        for runs, make in ((offs, off_run), (ons, on_run)):
            runs.append(make())
        same = same and offs[-1][1] == ons[-1][1]
    return _median(offs), _median(ons), same


def _median(runs: list[tuple[Measured, list[list[int]]]]) -> Measured:
    middle = sorted(runs, key=lambda run: run[0].seconds)[len(runs) // 2][0]
    return replace(middle, seconds=statistics.median(run[0].seconds for run in runs))


def build_model(args: argparse.Namespace):
    from bench.generate import DTYPES, SHAPES
    from model.config import parse_config
    from model.demo import demo_checkpoint, hf_config
    from model.load import load_model, resolve_device
    from model.qwen3 import Qwen3Model

    if args.model:
        return load_model(args.model, args.device, args.dtype), args.model
    device = resolve_device(args.device)
    model = Qwen3Model(parse_config(hf_config(SHAPES[args.shape] | {"dtype": args.dtype})), DTYPES[args.dtype], device)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():  # speed does not depend on the values
            param.normal_(0.0, 0.02)
    return model, demo_checkpoint()  # random shapes share the demo's (real Qwen3) tokenizer


def _engines(args: argparse.Namespace):
    from model.tokenizer import Tokenizer
    from server.engine.async_engine import AsyncEngine
    from server.engine.config import EngineConfig
    from server.engine.speculative import SpeculativeConfig

    model, tokenizer_dir = build_model(args)
    max_seqs = max(args.batches)
    config = EngineConfig(max_num_seqs=max_seqs, max_model_len=args.prompt_len + args.new_tokens + 16,
                          max_num_batched_tokens=max(2048, max_seqs * (1 + args.k)))
    tokenizer = Tokenizer(tokenizer_dir)
    if model.device.type == "cpu":
        model.plan_cpu_ops(max_seqs, config.max_model_len)
    spec = SpeculativeConfig("ngram", args.k, 2, 5, args.disable_by_batch_size)
    off = AsyncEngine(model, tokenizer, tokenizer_dir, config)
    on = AsyncEngine(model, tokenizer, tokenizer_dir, replace(config, speculative_config=spec))
    return model, off, on


def run(args: argparse.Namespace) -> dict:
    model, off, on = on_own_thread(_engines, args)
    rng = random.Random(args.seed)
    rows = []

    def timed(engine, prompts, predictions=None):
        return lambda: asyncio.run(_timed(engine, _requests(prompts, args.new_tokens, predictions)))

    try:
        for batch in args.batches:
            random_prompts = make_prompts(batch, args.prompt_len, False, rng)
            repetitive_prompts = make_prompts(batch, args.prompt_len, True, rng)
            _, outputs = timed(off, random_prompts)()  # also the warm-up
            for workload in args.workloads:
                if workload in CHANGED_LINES or workload == "prediction wrong":
                    predictions = [interleaved(o, rng) if workload == "prediction wrong"
                                   else changed_lines(o, CHANGED_LINES[workload], args.line_tokens, rng) for o in outputs]
                    # predictions speculate on any engine: the same one, with and without them
                    sides = timed(off, random_prompts), timed(off, random_prompts, predictions)
                else:
                    prompts = repetitive_prompts if workload == "ngram repetitive" else random_prompts
                    sides = timed(off, prompts), timed(on, prompts)
                base, measured, same = _side_by_side(*sides, args.repeats)
                rows.append({"workload": workload, "batch": batch, "off": vars(base), "on": vars(measured),
                             "same_tokens": same})
                print(f"  {workload}, batch {batch}: done", file=sys.stderr)
    finally:
        off.shutdown()
        on.shutdown()
    cutoff = on._core.speculator.disable_by_batch_size
    return {"model": args.model or args.shape, "device": model.device.type, "dtype": args.dtype,
            "new_tokens": args.new_tokens, "cutoff": f"n-gram speculation on up to {cutoff} decoding sequences",
            "rows": rows, "table": summarise(rows)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bench.generate import DTYPES, SHAPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="Qwen3 checkpoint directory (default: random weights, --shape)")
    src.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b", help="default %(default)s")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default %(default)s")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="default %(default)s (greedy tokens equal with and without speculation)")
    p.add_argument("--batches", default="1,4,16", help="comma-separated concurrent requests (default %(default)s)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated, of: " + ", ".join(WORKLOADS).replace("%", "%%"))  # argparse formats help with %
    p.add_argument("--prompt-len", type=int, default=64, help="default %(default)s")
    p.add_argument("--new-tokens", type=int, default=64, help="per request (default %(default)s)")
    p.add_argument("--k", type=int, default=8, help="draft tokens per step, n-gram (default %(default)s)")
    p.add_argument("--disable-by-batch-size", type=int, default=None,
                   help="n-gram speculation off above this many decodes (default: measured at load)")
    p.add_argument("--line-tokens", type=int, default=8, help="tokens per 'line' of a prediction (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure; medians (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default %(default)s)")
    p.add_argument("--out", default="bench/out/speculative.json", help="JSON output (default %(default)s)")
    args = p.parse_args(argv)
    args.batches = comma_ints(p, "--batches", args.batches)
    args.workloads = args.workloads.split(",")
    if set(args.workloads) - set(WORKLOADS):
        p.error(f"--workloads must name some of {', '.join(WORKLOADS)}")
    if min(args.batches + [args.prompt_len, args.new_tokens, args.k, args.repeats, args.line_tokens]) < 1:
        p.error("--batches, --prompt-len, --new-tokens, --k, --repeats and --line-tokens must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_and_report("bench.speculative", parse_args(argv), run, print_table)


if __name__ == "__main__":
    sys.exit(main())
