"""Tensor parallelism on a multi-GPU machine: the batch-1 decode step of the Qwen3-8B shape (random
bf16 weights) at TP=1 on one GPU and at TP=2 on two, side by side in one run.

    python -m bench.tp [--shape qwen3-8b] [--context 512] [--steps 100] [--repeats 5] [--out bench/out/tp.json]

Each size runs in fresh processes (one per rank, as `nanoserve serve --tensor-parallel-size`
starts them): the rank's shard (`model.parallel`), its KV cache, and the decode step captured in a
CUDA graph per rank with the all-reduces (NCCL) inside, as the engine's `DecodeGraphRunner` does.
A step is timed as `--steps` back-to-back replays behind one synchronisation; the figure is the
median over `--repeats` on rank 0. The engine adds the step's header and input broadcasts to this
(two small broadcasts per step). `bench.gpu` runs it as its last step and reads `step_ratio`.
"""

import argparse
import json
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

TARGET_RATIO = 0.65  # TP=2 step time over TP=1's, at most (issue 22)


def _rank(rank: int, size: int, port: int, args: argparse.Namespace, results) -> None:
    import torch
    import torch.distributed as dist

    from bench.generate import SHAPES
    from model.config import parse_config
    from model.demo import hf_config
    from model.parallel import shard_of
    from model.qwen3 import Qwen3Model
    from server.engine.cuda_graph import DecodeGraphRunner, StaticInputs
    from server.engine.distributed import collectives

    torch.cuda.set_device(rank)
    if size > 1:
        store = dist.TCPStore("127.0.0.1", port, size, is_master=rank == 0, timeout=timedelta(minutes=5))
        dist.init_process_group("nccl", store=store, rank=rank, world_size=size, timeout=timedelta(minutes=5))
    config = parse_config(hf_config(SHAPES[args.shape] | {"dtype": "bfloat16"}))
    model = Qwen3Model(config, torch.bfloat16, "cuda", shard_of(config, rank, size), collectives(size) if size > 1 else None)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    block_size = 16
    width = -(-args.context // block_size)
    kv_cache = model.allocate_kv_cache(width, block_size)
    device = model.device
    inputs = StaticInputs(*(torch.zeros(1, dtype=torch.int64, device=device) for _ in range(3)),
                          torch.zeros(1, dtype=torch.int32, device=device),
                          torch.zeros(width, dtype=torch.int32, device=device), width)
    graphs = DecodeGraphRunner(model, kv_cache, inputs, [1])
    graphs.capture()  # over padding rows; then the step of one sequence with `context` tokens cached
    inputs.token_ids.fill_(42)
    inputs.positions.fill_(args.context - 1)
    inputs.slot_mapping.fill_(args.context - 1)
    inputs.context_lens.fill_(args.context)
    inputs.block_tables.copy_(torch.arange(width, dtype=torch.int32, device=device))
    for _ in range(10):
        graphs.replay(1, 1)
    torch.cuda.synchronize()
    times = []
    for _ in range(args.repeats):
        if size > 1:
            dist.barrier()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(args.steps):
            graphs.replay(1, 1)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - started) / args.steps * 1e3)
    if rank == 0:
        results.put(statistics.median(times))
    if size > 1:
        dist.destroy_process_group()


def _step_ms(size: int, args: argparse.Namespace) -> float:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_rank, args=(rank, size, port, args, results)) for rank in range(size)]
    for process in processes:
        process.start()
    ms = results.get(timeout=600)
    for process in processes:
        process.join(timeout=60)
    return ms


def step_ratio(report: dict) -> tuple[float, str] | None:
    """bench.gpu's reading of the report: TP=2 step time over TP=1's, and how it is shown."""
    if "tp1_ms" not in report or "tp2_ms" not in report:
        return None
    ratio = report["tp2_ms"] / report["tp1_ms"]
    return ratio, f"{ratio:.2f}x ({report['tp2_ms']:.2f} vs {report['tp1_ms']:.2f} ms, {report['shape']} batch 1)"


def command(out: Path, quick: bool) -> list[str]:
    """bench.gpu's step: this module as a subprocess, writing `out`."""
    return [sys.executable, "-m", "bench.tp", "--out", str(out), *(["--repeats", "3", "--steps", "50"] if quick else [])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-8b")
    parser.add_argument("--context", type=int, default=512, help="tokens in the cache (default %(default)s)")
    parser.add_argument("--steps", type=int, default=100, help="replays per timing (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timings, of which the median (default %(default)s)")
    parser.add_argument("--out", default="bench/out/tp.json")
    args = parser.parse_args(argv)
    import torch

    if torch.cuda.device_count() < 2:
        print(f"bench.tp needs 2 GPUs: {torch.cuda.device_count()} visible to torch.", file=sys.stderr)
        return 2
    report = {"shape": args.shape, "context": args.context, "device": torch.cuda.get_device_name(),
              "tp1_ms": _step_ms(1, args), "tp2_ms": _step_ms(2, args)}
    print(f"{args.shape} batch 1, context {args.context}: TP=1 {report['tp1_ms']:.3f} ms/step, "
          f"TP=2 {report['tp2_ms']:.3f} ms/step ({step_ratio(report)[1]})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
