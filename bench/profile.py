"""Where a model step's time goes, kernel by kernel, on a GPU (on a CPU, part by part: `--device cpu`).

    python -m bench.profile [--model DIR | --shape qwen3-8b] [--batch 1] [--context 512] [--steps 16]
                            [--kernels triton,decode_attention=torch] [--out-dir bench/out]

Runs one prefill (`--batch` prompts of `--context` tokens) and then `--steps` decode steps of the
real model (a checkpoint, or random weights of a named shape as in `bench.generate`) under
`torch.profiler`, after a warm-up that compiles every kernel. For each phase it prints every GPU
kernel's time per step and share of the step's wall time, grouped into our Triton kernels, GEMMs
and everything else, plus the time the GPU sat idle (waiting for the host). Kernels whose traffic
is known from the shapes (our Triton kernels; the GEMMs as a group: weights plus activations)
also get the GB/s they achieved against the bytes they must move, and its share of the copy
bandwidth measured first. Chrome traces go to `--out-dir`/profile-{prefill,decode}.json (open
them in chrome://tracing or Perfetto) and the tables to profile.json. `--kernels` picks the
backends as the CLI flag does, for A/B runs. Without CUDA it says so and exits with status 2.
"""

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.report import comma_ints
from model.config import Qwen3Config

GROUPS = ("triton", "gemm", "other")
# Our Triton kernels by function name (as the profiler names them) -> what moves their bytes.
TRITON_KERNELS = {
    "_rms_norm_kernel": "rms_norm",
    "_attention_frontend_kernel": "attention_frontend",
    "_decode_split_kernel": "decode_attention",
    "_merge_splits_kernel": "decode_attention merge",
    "_prefill_kernel": "prefill_attention",
    "_rope_kernel": "rope",
    "_store_kv_kernel": "store_kv",
}
_GEMM_NAME = re.compile(r"gemm|gemv|xmma|cutlass|nvjet|cublas", re.IGNORECASE)


@dataclass
class KernelEvent:
    name: str
    duration_us: float


@dataclass
class Row:
    group: str
    name: str
    calls_per_step: float
    us_per_step: float
    pct_of_step: float
    gbps: float | None  # None: bytes unknown
    pct_copy: float | None


def kernel_group(name: str) -> str:
    if name in TRITON_KERNELS:
        return "triton"
    return "gemm" if _GEMM_NAME.search(name) else "other"


def build_table(events: list[KernelEvent], steps: int, step_us: float, bytes_per_step: dict[str, float],
                copy_gbps: float) -> list[Row]:
    """Rows per kernel, grouped and slowest first, then a total row per group, then the GPU's idle time.

    `bytes_per_step` maps a kernel name, or a group name ("gemm"), to the bytes it must move in one
    step; the group's bytes give its total row a bandwidth.
    """
    time_by_name, calls_by_name = defaultdict(float), defaultdict(int)
    for event in events:
        time_by_name[event.name] += event.duration_us / steps
        calls_by_name[event.name] += 1

    def row(group: str, name: str, calls: float, us: float) -> Row:
        moved = bytes_per_step.get(name)
        gbps = moved / us / 1e3 if moved and us else None
        return Row(group, name, calls, us, 100 * us / step_us, gbps, 100 * gbps / copy_gbps if gbps else None)

    rows = []
    for group in GROUPS:
        names = sorted((n for n in time_by_name if kernel_group(n) == group), key=lambda n: -time_by_name[n])
        rows += [row(group, n, calls_by_name[n] / steps, time_by_name[n]) for n in names]
        total = sum(time_by_name[n] for n in names)
        rows.append(row(group, group, sum(calls_by_name[n] for n in names) / steps, total))
    busy = sum(time_by_name.values())
    rows.append(Row("idle", "GPU idle (waiting for the host)", 0, max(0.0, step_us - busy),
                    100 * max(0.0, step_us - busy) / step_us, None, None))
    return rows


def format_table(title: str, rows: list[Row]) -> str:
    lines = [title, f"{'group':<7} {'kernel':<52} {'calls':>6} {'us/step':>10} {'% step':>7} {'GB/s':>8} {'% copy':>7}"]
    for r in rows:
        name = r.name if len(r.name) <= 52 else r.name[:49] + "..."
        total = r.name in GROUPS
        gbps = f"{r.gbps:8.0f}" if r.gbps else f"{'-':>8}"
        pct = f"{r.pct_copy:7.1f}" if r.pct_copy else f"{'-':>7}"
        label = f"= all {name}" if total else name
        lines.append(f"{r.group:<7} {label:<52} {r.calls_per_step:>6.1f} {r.us_per_step:>10.1f} "
                     f"{r.pct_of_step:>7.1f} {gbps} {pct}")
    return "\n".join(lines)


def bytes_per_step(c: Qwen3Config, element: int, num_tokens: int, logit_rows: int, contexts: list[float],
                   decode: bool) -> dict[str, float]:
    """The bytes each kernel (and the GEMMs as a group) must move in one step: read once, write once.

    `contexts`: each sequence's tokens in the cache after the step. Norm and GEMM weights are
    counted once per launch (they come from L2 on later rows).
    """
    t, h, layers, d = num_tokens, c.hidden_size, c.num_layers, c.head_dim
    kv_row = c.num_kv_heads * d * element  # one token's K (or V) for one layer
    # The first layer's plain norm, then fused add + norm twice a layer (but once before the first
    # attention), then the final norm on the rows that need logits.
    norms = 2 * t * h * element + (2 * layers - 1) * 4 * t * h * element + 4 * logit_rows * h * element
    qkv = (c.q_size + 2 * c.kv_size) * element
    frontend = layers * t * (qkv + c.q_size * element + 2 * kv_row + 16 + d * 4)
    attention = layers * (sum(contexts) * 2 * kv_row + 2 * t * c.q_size * element)
    # Per layer: qkv, o, gate_up and down projections; then the LM head on the logit rows.
    shapes = [(c.hidden_size, c.q_size + 2 * c.kv_size), (c.q_size, h), (h, 2 * c.intermediate_size),
              (c.intermediate_size, h)]
    gemm = layers * sum((k * n + t * (k + n)) * element for k, n in shapes)
    gemm += (c.vocab_size * h + logit_rows * h) * element + logit_rows * c.vocab_size * 4
    return {"_rms_norm_kernel": norms, "_attention_frontend_kernel": frontend,
            "_decode_split_kernel" if decode else "_prefill_kernel": attention, "gemm": gemm}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bench.generate import DTYPES, SHAPES

    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="Qwen3 checkpoint directory (default: random weights, --shape)")
    src.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b", help="random weights of this shape (default %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="default %(default)s")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cuda: kernels under torch.profiler; cpu: every part of a decode step beside HF's, timed "
                   "around it (see bench.cpu_profile) (default %(default)s)")
    p.add_argument("--batch", default="1", help="sequences per step; on CPU a comma-separated list (default %(default)s)")
    p.add_argument("--context", type=int, default=512, help="prompt tokens per sequence (default %(default)s)")
    p.add_argument("--steps", type=int, default=16, help="decode steps profiled (default %(default)s)")
    p.add_argument("--quantization", choices=["int8"], default=None, help="(CPU) as the CLI's --quantization")
    p.add_argument("--kernels", default="auto", help="kernel backends, as the CLI's --kernels (default %(default)s)")
    p.add_argument("--out-dir", default="bench/out", help="traces and profile.json go here (default %(default)s)")
    args = p.parse_args(argv)
    args.batches = comma_ints(p, "--batch", args.batch, "an integer (on CPU: comma-separated integers)")
    if args.device == "cuda" and len(args.batches) > 1:
        p.error("--batch takes one size on CUDA")
    args.batch = args.batches[0]
    if min(*args.batches, args.context, args.steps) < 1:
        p.error("--batch, --context and --steps must be positive")
    return args


def build_model(args: argparse.Namespace):
    from bench.generate import DTYPES, SHAPES
    from model.config import parse_config
    from model.demo import hf_config
    from model.load import load_model
    from model.qwen3 import Qwen3Model

    if args.model:
        return load_model(args.model, "cuda", args.dtype)
    model = Qwen3Model(parse_config(hf_config(SHAPES[args.shape] | {"dtype": args.dtype})), DTYPES[args.dtype], "cuda")
    torch.manual_seed(0)
    for param in model.parameters():  # speed does not depend on the values; NaN-free ones keep it honest
        param.normal_(0.0, 0.02)
    return model


def profile_phase(model, batches, cache, steps_name: str, out_dir: Path) -> tuple[list[KernelEvent], float]:
    """Kernel events of running `batches` once under the profiler, and the wall time per step unprofiled."""
    from torch.profiler import ProfilerActivity, profile

    def run() -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            model.forward(batch, cache)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / len(batches)

    step_s = min(run() for _ in range(3))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
    prof.export_chrome_trace(str(out_dir / f"profile-{steps_name}.json"))
    cuda = torch.autograd.DeviceType.CUDA
    events = [KernelEvent(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == cuda]
    return events, step_s * 1e6


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        from bench.cpu_profile import run_cpu_profile

        return run_cpu_profile(args)
    if not torch.cuda.is_available():
        print("bench.profile needs a CUDA GPU: none is visible to torch. (`--device cpu` profiles a CPU "
              "decode step beside HF's.)", file=sys.stderr)
        return 2
    import nanoserve_kernels
    from bench.timing import memory_bandwidth
    from model.batch import SequenceStep, make_batch

    nanoserve_kernels.set_backend(args.kernels)
    model = build_model(args)
    c = model.config
    block_size = 16
    blocks_per_seq = -(-(args.context + args.steps) // block_size)
    cache = model.allocate_kv_cache(blocks_per_seq * args.batch, block_size)
    tables = [list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq)) for b in range(args.batch)]
    prompts = torch.randint(0, min(c.vocab_size, 151643), (args.batch, args.context)).tolist()
    prefill = make_batch([SequenceStep(p, 0, t) for p, t in zip(prompts, tables)], block_size, "cuda")
    decodes = [make_batch([SequenceStep([1], args.context + i, t) for t in tables], block_size, "cuda")
               for i in range(args.steps)]
    model.forward(prefill, cache)  # warm-up: every kernel compiles here, not in the profile
    model.forward(decodes[0], cache)
    copy_gbps = memory_bandwidth(torch.device("cuda")) / 1e9
    element = torch.tensor([], dtype=model.dtype).element_size()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = args.model or args.shape
    print(f"{torch.cuda.get_device_name()}: copy {copy_gbps:.0f} GB/s; {source} {args.dtype}, batch {args.batch}, "
          f"context {args.context}, kernels {nanoserve_kernels.get_backend()}")
    report = {}
    phases = {
        "prefill": ([prefill], args.batch * args.context, args.batch, [args.context] * args.batch, False),
        # Decode step i attends to context + i + 1 tokens: the mean over the steps.
        "decode": (decodes, args.batch, args.batch, [args.context + (args.steps + 1) / 2] * args.batch, True),
    }
    for name, (batches, tokens, logit_rows, contexts, decode) in phases.items():
        events, step_us = profile_phase(model, batches, cache, name, out_dir)
        moved = bytes_per_step(c, element, tokens, logit_rows, contexts, decode)
        rows = build_table(events, len(batches), step_us, moved, copy_gbps)
        print("\n" + format_table(f"{name}: {step_us / 1e3:.3f} ms per step ({len(batches)} profiled)", rows))
        report[name] = dict(step_us=step_us, rows=[asdict(r) for r in rows])
    (out_dir / "profile.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out_dir}/profile-prefill.json, profile-decode.json (Chrome traces) and profile.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
