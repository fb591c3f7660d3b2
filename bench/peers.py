"""nanoserve beside llama.cpp on the same weights and dtype, through each one's server, on this CPU.

    pip install -e '.[peers]'     # the gguf package, to write llama.cpp's file
    python -m bench.peers [--model DIR | --shape qwen3-0.6b] [--dtype float32|bfloat16] [--quantization int8]
                          [--rounds 3] [--llama-server PATH] [--threads N]

The checkpoint (a directory, or random weights of `--shape` written once under `--work-dir`) is
converted to GGUF by `bench.gguf_export` (F32 or BF16 as `--dtype`; with `--quantization int8`,
llama.cpp's Q8_0 beside nanoserve's int8), then `llama-server` (`-np 8`, continuous batching) and
`nanoserve serve` start on it, each with the machine's cores. Each round measures one server and
then the other (the idle one sleeps), alternating which goes first; every figure is the median
over rounds. Both get the same random word prompts (new ones each round, so no prefix cache
helps), greedy, `--output-tokens` tokens with EOS ignored, streamed over `/v1/completions`:

- 1-stream and 8-stream tok/s: output tokens over wall time (prefill and HTTP included);
- decode tok/s at batch 1 and 8: from each stream's first token to its last, summed over streams;
- prefill tok/s: prompt tokens over the time to the first token, one stream;
- % of memory floor at batch 1: the bytes a step must read in each one's format (every matmul
  weight once, one embedding row; Q8_0 is 34 bytes per 32 weights) over the memory bandwidth
  measured here, against the step time.

Without llama.cpp's server it says how to get one and exits with status 2.
"""

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.launch import free_port, wait_healthy

INSTALL_HINT = """llama-server (llama.cpp's OpenAI-compatible server) was not found: give --llama-server PATH or put it on PATH.
Get llama.cpp, for example:
  brew install llama.cpp                                # macOS, Linux with Homebrew
  or build it (needs cmake and a C++ compiler): clone ggml-org/llama.cpp, then
  cmake -S llama.cpp -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build -j --target llama-server
  (the llama-cpp-python sdist carries the same sources under vendor/llama.cpp:
   pip download --no-deps --no-binary :all: llama-cpp-python)"""
WORDS = "the of and to in is that for it as with was on be by at this from or an are not have but".split()
METRICS = ("1-stream tok/s", "8-stream tok/s", "decode tok/s, batch 1", "decode tok/s, batch 8", "prefill tok/s",
           "% of memory floor, batch 1")
# Bytes per matmul weight element in each format, for the floor.
FORMAT_BYTES = {"F32": 4.0, "BF16": 2.0, "Q8_0": 34 / 32, "float32": 4.0, "bfloat16": 2.0, "int8": 1.0}


@dataclass
class Stream:
    start: float
    first: float  # arrival of the first text
    last: float  # arrival of the last text
    end: float


def median_table(rounds: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per side and metric, the median over rounds (a metric a round lacks is left out of it)."""
    sides = list(rounds[0])
    return {side: {m: statistics.median(r[side][m] for r in rounds if m in r[side])
                   for m in METRICS if any(m in r[side] for r in rounds)} for side in sides}


def format_table(medians: dict[str, dict[str, float]], rounds: int, ours: str, theirs: str) -> str:
    """One row per metric: each side's median and ours over theirs."""
    lines = [f"{'metric (median of ' + str(rounds) + ' rounds)':<34} {theirs:>16} {ours:>16} {'ratio':>7}"]
    for metric in METRICS:
        a, b = medians[theirs].get(metric), medians[ours].get(metric)
        cell = lambda v: f"{v:>16.1f}" if v is not None else f"{'-':>16}"  # noqa: E731
        ratio = f"{b / a:>6.2f}x" if a and b else f"{'-':>7}"
        lines.append(f"{metric:<34} {cell(a)} {cell(b)} {ratio}")
    return "\n".join(lines)


def round_metrics(one: Stream, eight: list[Stream], tokens: int, prompt_tokens: int, floor_s: float) -> dict[str, float]:
    """A round's figures for one server from its timed streams (each `tokens` long)."""
    decode1 = (tokens - 1) / (one.last - one.first)
    return {
        "1-stream tok/s": tokens / (one.end - one.start),
        "8-stream tok/s": len(eight) * tokens / (max(s.end for s in eight) - min(s.start for s in eight)),
        "decode tok/s, batch 1": decode1,
        "decode tok/s, batch 8": sum((tokens - 1) / (s.last - s.first) for s in eight),
        "prefill tok/s": prompt_tokens / (one.first - one.start),
        "% of memory floor, batch 1": 100 * floor_s * decode1,
    }


def floor_bytes(config: dict, element_bytes: float) -> float:
    """Bytes a batch-1 decode step must read: every matmul weight once (the LM head, tied or not),
    one embedding row, at `element_bytes` per weight."""
    h, layers, head = config["hidden_size"], config["num_hidden_layers"], config["head_dim"]
    q, kv = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * config["intermediate_size"]
    return element_bytes * (layers * per_layer + config["vocab_size"] * h + h)


async def _stream(client: httpx.AsyncClient, body: dict) -> Stream:
    start = time.perf_counter()
    first = last = None
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(c.get("text") for c in chunk.get("choices") or []):
                last = time.perf_counter()
                first = first or last
    if first is None or last == first:
        raise RuntimeError("the stream brought fewer than two chunks of text")
    return Stream(start, first, last, time.perf_counter())


async def _measure(url: str, model: str, prompts: list[str], tokens: int) -> tuple[Stream, list[Stream]]:
    def body(prompt: str) -> dict:
        return {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(1800)) as client:
        one = await _stream(client, body(prompts[0]))
        eight = await asyncio.gather(*(_stream(client, body(p)) for p in prompts[1:9]))
    return one, list(eight)


def _start(command: list[str], url: str, log: Path, timeout: float) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    if wait_healthy(url, process, timeout):
        return process
    if process.poll() is not None:
        raise RuntimeError(f"{command[0]} exited with {process.returncode}: see {log}")
    process.terminate()
    raise RuntimeError(f"{command[0]} did not become healthy in {timeout:.0f} s: see {log}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="Qwen3 checkpoint directory with its tokenizer (default: --shape)")
    src.add_argument("--shape", default="qwen3-0.6b", help="random weights of this bench.generate shape (default %(default)s)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="default %(default)s")
    p.add_argument("--quantization", choices=["int8"], default=None, help="nanoserve int8 beside llama.cpp Q8_0")
    p.add_argument("--rounds", type=int, default=3, help="default %(default)s")
    p.add_argument("--output-tokens", type=int, default=32, help="per request (default %(default)s)")
    p.add_argument("--prompt-words", type=int, default=48, help="per prompt (default %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-server -t (default: the cores, %(default)s)")
    p.add_argument("--llama-server", default=shutil.which("llama-server"), help="default: llama-server on PATH")
    p.add_argument("--work-dir", default="bench/out/peers", help="checkpoint, GGUF, logs, JSON (default %(default)s)")
    args = p.parse_args(argv)
    if min(args.rounds, args.output_tokens, args.prompt_words) < 1:
        p.error("--rounds, --output-tokens and --prompt-words must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.llama_server or not Path(args.llama_server).exists():
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    try:
        import gguf  # noqa: F401
    except ImportError:
        print("bench.peers writes llama.cpp's file with the gguf package: pip install -e '.[peers]'", file=sys.stderr)
        return 2
    from bench.generate import SHAPES
    from bench.gguf_export import GGUF_TYPES, write_gguf
    from bench.timing import memory_bandwidth
    from model.demo import write_checkpoint
    from model.tokenizer import Tokenizer

    import torch

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else work / f"{args.shape}-{args.dtype}"
    if not args.model and not (model_dir / "config.json").exists():
        write_checkpoint(model_dir, SHAPES[args.shape] | {"dtype": args.dtype}, seed=0)
    theirs_format = "Q8_0" if args.quantization else GGUF_TYPES[args.dtype]
    gguf_path = work / f"{model_dir.name}-{theirs_format}.gguf"
    if not gguf_path.exists():
        print(f"writing {gguf_path} ...", file=sys.stderr)
        write_gguf(model_dir, gguf_path, theirs_format)
    config = json.loads((model_dir / "config.json").read_text())
    ours_format = args.quantization or args.dtype
    bandwidth = memory_bandwidth(torch.device("cpu"))
    floors = {fmt: floor_bytes(config, FORMAT_BYTES[fmt]) / bandwidth for fmt in (theirs_format, ours_format)}
    theirs, ours = f"llama.cpp {theirs_format}", f"nanoserve {ours_format}"
    context = 8 * 1024
    ports = {theirs: free_port(), ours: free_port()}
    commands = {
        theirs: [args.llama_server, "-m", str(gguf_path), "--host", "127.0.0.1", "--port", str(ports[theirs]),
                 "-t", str(args.threads), "-np", "8", "-c", str(context), "--alias", "peer"],
        ours: [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--dtype", args.dtype,
               "--port", str(ports[ours]), "--served-model-name", "peer", "--max-num-seqs", "8",
               "--max-model-len", "1024"] + (["--quantization", args.quantization] if args.quantization else []),
    }
    tokenizer = Tokenizer(model_dir)
    processes = {}
    logs = {side: work / f"{side.replace(' ', '-')}.log" for side in commands}
    rounds = []
    failure = None
    try:
        for side, command in commands.items():
            print(f"starting {side} ...", file=sys.stderr)
            processes[side] = _start(command, f"http://127.0.0.1:{ports[side]}", logs[side], 900)
        for index in range(args.rounds):
            rng = random.Random(index)
            prompts = [" ".join(rng.choice(WORDS) for _ in range(args.prompt_words)) for _ in range(9)]
            prompt_tokens = len(tokenizer.encode(prompts[0]))
            order = [theirs, ours] if index % 2 == 0 else [ours, theirs]
            figures = {}
            for side in order:
                print(f"round {index + 1}: {side} ...", file=sys.stderr)
                fmt = theirs_format if side == theirs else ours_format
                try:
                    one, eight = asyncio.run(_measure(f"http://127.0.0.1:{ports[side]}", "peer", prompts, args.output_tokens))
                except (httpx.HTTPError, RuntimeError) as err:
                    status = processes[side].poll()
                    state = "is still running" if status is None else f"exited with status {status}"
                    failure = (f"bench.peers: {side} failed in round {index + 1} ({type(err).__name__}: {err}); its server "
                               f"{state}, log: {logs[side]}")
                    break
                figures[side] = round_metrics(one, eight, args.output_tokens, prompt_tokens, floors[fmt])
            if failure:
                break
            rounds.append({side: figures[side] for side in (theirs, ours)})
    finally:
        for process in processes.values():
            process.terminate()
            process.wait(timeout=30)
    if failure:
        print(failure, file=sys.stderr)
        if not rounds:
            return 1
        print(f"the {len(rounds)} round(s) that finished:", file=sys.stderr)
    medians = median_table(rounds)
    print(f"\n{model_dir.name}: memory bandwidth {bandwidth / 1e9:.1f} GB/s, {args.threads} threads, "
          f"{args.output_tokens} tokens per request, {prompt_tokens}-token prompts")
    print(format_table(medians, len(rounds), ours, theirs))
    (work / "peers.json").write_text(json.dumps({"rounds": rounds, "medians": medians}, indent=1) + "\n")
    return 1 if failure else 0


if __name__ == "__main__":
    sys.exit(main())
