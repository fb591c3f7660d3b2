"""What launching kernels costs the host in one decode step, op by op.

    python -m bench.launch_overhead [--device auto|cpu|cuda] [--layers 36] [--repeats 200]

One decode step (batch 1, a 512-token context) of a model with Qwen3-8B's layer structure (36
layers, 32 query and 8 kv heads of 128, narrow hidden and MLP sizes: the host's work does not
depend on them) runs once with every Triton-backed op wrapped, so that each call's arguments are
recorded. Then, per op, median over `--repeats`:

- build: what the op does on the host before it launches: its output allocation and its
  launcher's argument dict (`*_launch`), the `Launch` records, no launch. Measured on any device,
  CPU included: the Python-side cost of our launchers.
- launch (CUDA only): the whole op as the model calls it, Triton launch included.

Per step: launches and host microseconds over all recorded calls. On CUDA also: one bare Triton
launch of a kernel that does nothing (the floor of any launch), one tiny torch op, the whole eager
decode step's host time (kernels this small finish before the host launches the next one, so wall
time is host time) and the same step replayed from a CUDA graph, each until the GPU is done.
JSON to `--out`. `--kernels SPEC` runs the op column and the whole step with that spec, so a
plug-in that wraps a built-in shows what plugging costs beside the built-in's own row.
"""

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from bench.report import run_and_report
from bench.timing import on_own_thread, synchronize
from nanoserve_kernels import set_backend
from nanoserve_kernels._triton import HAVE_TRITON, Launch, jit, tl
from nanoserve_kernels.attention_frontend import attention_frontend_launch
from nanoserve_kernels.decode_attention import _sm_count, choose_num_splits, paged_decode_attention_launches
from nanoserve_kernels.rms_norm import _out_like, rms_norm_launch
from model import qwen3
from model.batch import SequenceStep, make_batch
from model.config import parse_config
from model.demo import hf_config
from model.load import resolve_device

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
             vocab_size=4096, tie_word_embeddings=False)
CONTEXT, BLOCK_SIZE = 512, 16


def _frontend_launch(qkv, q_norm_weight, k_norm_weight, eps, positions, cos_sin_cache, k_cache, v_cache,
                     slot_mapping) -> Launch:
    head_dim, kv_heads = k_cache.shape[-1], k_cache.shape[2]
    q = torch.empty(qkv.shape[0], qkv.shape[1] // head_dim - 2 * kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    return attention_frontend_launch(qkv, q_norm_weight, k_norm_weight, eps, positions, cos_sin_cache, k_cache,
                                     v_cache, slot_mapping, q)


def _decode_attention_launches(q, k_cache, v_cache, block_tables, context_lens, scale) -> list[Launch]:
    max_context = block_tables.shape[1] * k_cache.shape[1]
    num_splits = choose_num_splits(q.shape[0], k_cache.shape[2], q.shape[2], max_context, _sm_count(q.device))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    return paged_decode_attention_launches(q, k_cache, v_cache, block_tables, context_lens, scale, out, num_splits)


# Per op the model calls: what it builds on the host before launching, as the op itself does it.
BUILDERS: dict[str, Callable[..., Launch | list[Launch]]] = {
    "rms_norm": lambda x, weight, eps: rms_norm_launch(x, None, weight, eps, _out_like(x, weight), None),
    "fused_add_rms_norm": lambda x, residual, weight, eps: rms_norm_launch(
        x, residual, weight, eps, _out_like(x, weight), torch.empty_like(x, memory_format=torch.contiguous_format)),
    "attention_frontend": _frontend_launch,
    "paged_decode_attention": _decode_attention_launches,
}


def build_model(layers: int, device: torch.device) -> qwen3.Qwen3Model:
    torch.manual_seed(0)
    model = qwen3.Qwen3Model(parse_config(hf_config(SHAPE | {"num_hidden_layers": layers})), torch.bfloat16, device)
    for param in model.parameters():
        param.data.normal_(0, 0.02)
    return model


def record_decode_step(model: qwen3.Qwen3Model) -> tuple[list[tuple[str, tuple]], Callable[[], torch.Tensor]]:
    """Every op call of one decode step, (op name, arguments), and a function that runs the step."""
    blocks = list(range(CONTEXT // BLOCK_SIZE))
    cache = model.allocate_kv_cache(len(blocks), BLOCK_SIZE)
    for k_cache, v_cache in cache:
        k_cache.normal_()
        v_cache.normal_()
    batch = make_batch([SequenceStep([1], CONTEXT - 1, blocks)], BLOCK_SIZE, model.device)
    calls: list[tuple[str, tuple]] = []
    originals = {name: getattr(qwen3, name) for name in BUILDERS}

    def recording(name: str, op: Callable) -> Callable:
        def call(*args):
            calls.append((name, args))
            return op(*args)
        return call

    try:
        for name, op in originals.items():
            setattr(qwen3, name, recording(name, op))
        model.forward(batch, cache)
    finally:
        for name, op in originals.items():
            setattr(qwen3, name, op)
    return calls, lambda: model.forward(batch, cache)


def median_us(fn: Callable[[], object], repeats: int, device: torch.device, per_call: int = 1,
              to_the_end: bool = False) -> float:
    """Median host time of `fn()` over `repeats` runs (after one), per each of its `per_call`
    calls; with `to_the_end`, until the device has finished it too."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if to_the_end:
            synchronize(device)
        times.append(time.perf_counter() - start)
    synchronize(device)
    return statistics.median(times) / per_call * 1e6


@jit
def _noop_kernel(x_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) + 1)


def cuda_floors(repeats: int, device: torch.device) -> dict[str, float]:
    """Host microseconds of one bare Triton launch and of one tiny torch op, each over 100 in a row."""
    x = torch.zeros(16, device=device)

    def triton_launches():
        for _ in range(100):
            _noop_kernel[(1,)](x, BLOCK=16)

    def torch_ops():
        for _ in range(100):
            x.add_(1)

    return {"triton_launch_us": median_us(triton_launches, repeats, device, 100),
            "torch_op_us": median_us(torch_ops, repeats, device, 100)}


def graph_replay_us(step: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> float:
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()  # warm-up on the capture stream
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        step()
    return median_us(graph.replay, repeats, device, to_the_end=True)


def run(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    if device.type == "cuda" and not HAVE_TRITON:
        raise RuntimeError("on CUDA this benchmark times Triton launches: the triton package is missing")
    model = build_model(args.layers, device)
    calls, step = record_decode_step(model)
    ops: dict[str, dict] = {}
    for name, call_args in calls:
        row = ops.setdefault(name, {"calls": 0, "launches": 0, "build_us": 0.0, "launch_us": 0.0})
        built = BUILDERS[name](*call_args)
        row["calls"] += 1
        row["launches"] += len(built) if isinstance(built, list) else 1
        row["build_us"] += median_us(lambda: BUILDERS[name](*call_args), args.repeats, device)
        if device.type == "cuda":
            op = getattr(qwen3, name)
            row["launch_us"] += median_us(lambda: op(*call_args), args.repeats, device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "layers": args.layers,
        "kernels": args.kernels,
        "context": CONTEXT,
        "ops": ops,
        "launches_per_step": sum(row["launches"] for row in ops.values()),
        "build_us_per_step": sum(row["build_us"] for row in ops.values()),
    }
    if device.type == "cuda":
        result |= cuda_floors(args.repeats, device)
        result["triton_ops_us_per_step"] = sum(row["launch_us"] for row in ops.values())
        with torch.inference_mode():
            result["eager_step_us"] = median_us(step, args.repeats, device, to_the_end=True)
            result["graph_replay_step_us"] = graph_replay_us(step, args.repeats, device)
    return result


def print_table(r: dict) -> None:
    cuda = "triton_launch_us" in r
    print(f"\nhost cost of one decode step's Triton ops: Qwen3-8B layer structure ({r['layers']} layers), batch 1, "
          f"context {r['context']}, on {r['device']}; medians, microseconds")
    print(f"{'op':<24} {'calls':>6} {'launches':>9} {'build/call':>11}" + (f" {'op/call':>9}" if cuda else ""))
    for name, row in r["ops"].items():
        line = f"{name:<24} {row['calls']:>6} {row['launches']:>9} {row['build_us'] / row['calls']:>11.1f}"
        print(line + (f" {row['launch_us'] / row['calls']:>9.1f}" if cuda else ""))
    print(f"per step: {r['launches_per_step']} Triton launches, {r['build_us_per_step']:.0f} us building them")
    if cuda:
        print(f"per step: {r['triton_ops_us_per_step']:.0f} us in the Triton ops, launches included; "
              f"one bare Triton launch {r['triton_launch_us']:.1f} us, one torch op {r['torch_op_us']:.1f} us")
        print(f"whole decode step: eager {r['eager_step_us']:.0f} us of host time, "
              f"CUDA graph replay {r['graph_replay_step_us']:.0f} us")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default %(default)s")
    p.add_argument("--layers", type=int, default=36, help="decoder layers (default %(default)s: Qwen3-8B)")
    p.add_argument("--repeats", type=int, default=200, help="timed runs per figure; medians (default %(default)s)")
    p.add_argument("--kernels", default="auto", metavar="SPEC",
                   help="kernel spec, plug-ins included: the op/call column and the whole step then run them "
                   "(the build column is the built-in launchers'; default %(default)s)")
    p.add_argument("--out", default="bench/out/launch_overhead.json", help="JSON output (default %(default)s)")
    args = p.parse_args(argv)
    if args.layers < 1 or args.repeats < 1:
        p.error("--layers and --repeats must be positive")
    try:
        set_backend(args.kernels)
    except (ValueError, RuntimeError) as err:
        p.error(f"--kernels: {err}")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_and_report("bench.launch_overhead", parse_args(argv), lambda a: on_own_thread(run, a), print_table)


if __name__ == "__main__":
    sys.exit(main())
