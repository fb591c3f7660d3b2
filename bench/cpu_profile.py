"""Where a CPU decode step goes, part by part, for nanoserve and HF side by side (`bench.profile --device cpu`).

On a CPU every op runs on the calling thread, so wall time taken around each part of the forward
pass is exact (no profiler, no asynchrony): nanoserve's projections by weight (qkv, o, gate_up,
down, the LM head), its decode attention, the attention front (q/k norm, RoPE, cache write), the
norms, and what is left of the forward pass (embedding, SiLU x up, reshapes, the Python between
ops). HF's `Qwen3ForCausalLM` is timed by module hooks in the same way (its q/k/v and gate/up
projections summed to match nanoserve's fused ones). Each projection gets the GB/s at which it
read its weight (as held: an fp32 copy of a bf16 weight reads 4 bytes an element) against the
memory bandwidth (a 1 GiB reduction, `bench.timing.memory_bandwidth`'s) sampled between the
steps. The greedy sampler (argmax over the logits) is timed too; the engine's host work beyond the
forward pass is `bench.step_overhead`'s to measure. The two models and the bandwidth sample
alternate step by step, and each figure is a median over the steps: on a shared machine whose
speed drifts, neither side gains by it.
"""

import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

# nanoserve's weight attribute -> the part it is reported as (HF's module names map onto these).
PROJECTIONS = {"qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "gate_up", "down_proj": "down", "lm_head": "lm_head"}
HF_PROJECTIONS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gate_up",
                  "up_proj": "gate_up", "down_proj": "down", "lm_head": "lm_head"}
PARTS = ("qkv", "o", "gate_up", "down", "lm_head", "attention", "attention front", "norms", "rest of forward")


@dataclass
class PartTime:
    name: str
    ms: float  # per step (median over steps)
    bytes_read: float | None  # weight bytes per step, for projections

    def gbps(self) -> float | None:
        return self.bytes_read / self.ms / 1e6 if self.bytes_read and self.ms else None


class StepClock:
    """Seconds spent in named parts during one step; `timed(name, fn)` wraps `fn` to add to its part."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.bytes: dict[str, float] = defaultdict(float)

    def timed(self, name: str, fn: Callable, nbytes: float = 0.0) -> Callable:
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.bytes[name] += nbytes
        return run

    def reset(self) -> None:
        self.seconds.clear()
        self.bytes.clear()


def weight_bytes(weight: torch.Tensor) -> int:
    """Bytes a matmul reads of `weight` as held (packed oneDNN tensors have no storage to ask)."""
    return weight.shape.numel() * weight.dtype.itemsize


def median_parts(steps: list[tuple[float, dict[str, float], dict[str, float]]]) -> list[PartTime]:
    """Per part, the median over steps of (forward seconds, part seconds, part bytes); the rest of the
    forward pass is the step's time minus its named parts. Times in ms."""
    rows = []
    for name in PARTS[:-1]:
        ms = statistics.median(parts.get(name, 0.0) for _, parts, _ in steps) * 1e3
        read = statistics.median(moved.get(name, 0.0) for _, _, moved in steps)
        rows.append(PartTime(name, ms, read or None))
    rest = statistics.median(total - sum(parts.values()) for total, parts, _ in steps) * 1e3
    rows.append(PartTime(PARTS[-1], rest, None))
    return rows


@contextmanager
def instrument_nanoserve(model, clock: StepClock):
    """Time nanoserve's parts: its matmuls by weight, decode attention, the attention front, norms."""
    import model.qwen3 as qwen3

    names = {id(getattr(owner, attr)): PROJECTIONS[attr] for owner, attr in model._matmul_weights()}
    linear, decode_attention = model._linear, model.decode_attention_for
    patched = {name: getattr(qwen3, name) for name in ("attention_frontend", "rms_norm", "fused_add_rms_norm")}

    def timed_linear(x, weight):
        return clock.timed(names.get(id(weight), "rest of forward"), linear, weight_bytes(weight))(x, weight)

    model._linear = timed_linear
    model.decode_attention_for = lambda *args: clock.timed("attention", decode_attention(*args))
    qwen3.attention_frontend = clock.timed("attention front", patched["attention_frontend"])
    qwen3.rms_norm = clock.timed("norms", patched["rms_norm"])
    qwen3.fused_add_rms_norm = clock.timed("norms", patched["fused_add_rms_norm"])
    # the plan's C passes for the same ops, when it chose them (`CpuPlan.small_ops`)
    c_passes = {name: getattr(qwen3.cpu_avx2, name) for name in ("attention_front", "add_rms_norm")}
    qwen3.cpu_avx2.attention_front = clock.timed("attention front", c_passes["attention_front"])
    qwen3.cpu_avx2.add_rms_norm = clock.timed("norms", c_passes["add_rms_norm"])
    try:
        yield
    finally:
        del model._linear, model.decode_attention_for
        for name, fn in patched.items():
            setattr(qwen3, name, fn)
        for name, fn in c_passes.items():
            setattr(qwen3.cpu_avx2, name, fn)


@contextmanager
def instrument_hf(hf, clock: StepClock):
    """Time HF's parts with module hooks: projections, the attention modules less their projections
    and norms (SDPA or eager attention, RoPE, the cache update), and the RMSNorms outside attention."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RMSNorm

    starts: dict[int, float] = {}
    handles = []

    def watch(module, part: str, subtract_from_parent: str | None, nbytes: float = 0.0):
        def pre(mod, args):
            starts[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            seconds = time.perf_counter() - starts.pop(id(mod))
            clock.seconds[part] += seconds
            clock.bytes[part] += nbytes
            if subtract_from_parent:
                clock.seconds[subtract_from_parent] -= seconds
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    for name, module in hf.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        in_attention = ".self_attn." in name
        if isinstance(module, torch.nn.Linear) and leaf in HF_PROJECTIONS:
            watch(module, HF_PROJECTIONS[leaf], "attention" if in_attention else None, weight_bytes(module.weight))
        elif isinstance(module, Qwen3Attention):
            watch(module, "attention", None)
        elif isinstance(module, Qwen3RMSNorm):
            watch(module, "attention front" if in_attention else "norms", "attention" if in_attention else None)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def format_profile(title: str, sides: dict[str, list[PartTime]], step_ms: dict[str, float], copy_gbps: float,
                   extra: dict[str, dict[str, float]]) -> str:
    """One table: a row per part, per side its ms per step, share of the step and (projections) GB/s
    and % of the copy bandwidth; then `extra` rows (ms per step: the sampler, the engine)."""
    names = list(sides)
    head = f"{'part':<26}" + "".join(f" {n + ' ms':>12} {'%':>5} {'GB/s':>6} {'%bw':>4}" for n in names)
    lines = [title, head]
    by_side = {n: {p.name: p for p in parts} for n, parts in sides.items()}
    for part in PARTS:
        cells = ""
        for n in names:
            p = by_side[n].get(part)
            gbps = p.gbps() if p else None
            cells += (f" {p.ms:>12.2f} {100 * p.ms / step_ms[n]:>5.1f}" if p else f" {'-':>12} {'-':>5}")
            cells += f" {gbps:>6.1f} {100 * gbps / copy_gbps:>4.0f}" if gbps else f" {'-':>6} {'-':>4}"
        lines.append(f"{part:<26}{cells}")
    lines.append(f"{'forward pass':<26}" + "".join(f" {step_ms[n]:>12.2f} {100.0:>5.1f} {'':>6} {'':>4}" for n in names))
    for label, values in extra.items():
        lines.append(f"{label:<26}" + "".join(
            f" {values[n]:>12.2f} {'':>5} {'':>6} {'':>4}" if n in values else f" {'-':>12} {'':>5} {'':>6} {'':>4}"
            for n in names))
    return "\n".join(lines)


def _decode_batches(model, batch: int, context: int, steps: int, block_size: int = 16):
    """A KV cache and `steps` decode batches of `batch` sequences after a `context`-token prompt each."""
    from model.batch import SequenceStep, make_batch

    width = -(-(context + steps + 1) // block_size)
    cache = model.allocate_kv_cache(width * batch, block_size)
    tables = [list(range(b * width, (b + 1) * width)) for b in range(batch)]
    prompts = torch.randint(0, min(model.config.vocab_size, 151643), (batch, context)).tolist()
    model.forward(make_batch([SequenceStep(p, 0, t) for p, t in zip(prompts, tables)], block_size, "cpu"), cache)
    steps_in = [make_batch([SequenceStep([1], context + i, t) for t in tables], block_size, "cpu") for i in range(steps)]
    return cache, steps_in, prompts


def _timed_step(fn: Callable[[], object], clock: StepClock) -> tuple[float, dict[str, float], dict[str, float]]:
    clock.reset()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start, dict(clock.seconds), dict(clock.bytes)


def profile_decode(hf, ours, batch: int, context: int, steps: int) -> dict:
    """nanoserve's and HF's decode steps at `batch` x `context`, alternating, each part timed."""
    from transformers import DynamicCache

    cache, ours_steps, prompts = _decode_batches(ours, batch, context, steps + 1)
    hf_cache = DynamicCache()
    with torch.inference_mode():
        hf(torch.tensor(prompts), past_key_values=hf_cache, use_cache=True, logits_to_keep=1)
    next_ids = torch.ones(batch, 1, dtype=torch.long)
    clock = StepClock()
    results: dict[str, list] = {"nanoserve": [], "HF": []}
    logits = ours.forward(ours_steps[0], cache)  # warm-up
    buffer = torch.randn(256 << 20)  # 1 GiB of fp32: far beyond any cache
    bandwidth = []
    with instrument_nanoserve(ours, clock), instrument_hf(hf, clock), torch.inference_mode():
        for step in ours_steps[1:]:
            results["nanoserve"].append(_timed_step(lambda: ours.forward(step, cache), clock))
            results["HF"].append(_timed_step(
                lambda: hf(next_ids, past_key_values=hf_cache, use_cache=True, logits_to_keep=1), clock))
            bandwidth.append(buffer.numel() * 4 / _timed_step(buffer.sum, clock)[0] / 1e9)
        argmax = [_timed_step(lambda: logits.argmax(-1), clock)[0] for _ in range(steps)]
    return {side: dict(step_ms=statistics.median(s[0] for s in runs) * 1e3, parts=median_parts(runs))
            for side, runs in results.items()} | {"argmax_ms": statistics.median(argmax) * 1e3,
                                                   "copy_gbps": statistics.median(bandwidth)}


def run_cpu_profile(args) -> int:
    """`bench.profile --device cpu`: the tables for each of `--batch` (comma-separated batch sizes)."""
    import json
    from dataclasses import asdict
    from pathlib import Path

    from bench.generate import DTYPES, build_models
    from bench.timing import on_own_thread

    device = torch.device("cpu")
    args.device = "cpu"
    batches = args.batches
    hf, ours, tokenizer_dir = on_own_thread(build_models, args, device, DTYPES[args.dtype])
    block_size = 16
    plan = on_own_thread(ours.plan_cpu_ops, max(batches), -(-(args.context + 2 * args.steps + 4) // block_size) * block_size,
                         args.quantization)
    print(plan.describe())
    import platform
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    print(f"{cpu}, {torch.get_num_threads()} threads, ATen {torch.backends.cpu.get_cpu_capability()}: "
          f"{args.model or args.shape} {args.dtype}{' int8' if args.quantization else ''}, context {args.context}, "
          f"{args.steps} steps per side, alternating")
    report = {"cpu": cpu, "plan": plan.describe(), "batches": {}}
    for batch in batches:
        profile = on_own_thread(profile_decode, hf, ours, batch, args.context, args.steps)
        step_ms = {side: profile[side]["step_ms"] for side in ("nanoserve", "HF")}
        extra = {"greedy argmax (sampler)": {"nanoserve": profile["argmax_ms"]}}
        sides = {side: profile[side]["parts"] for side in ("nanoserve", "HF")}
        title = (f"decode, batch {batch}: ms per step (medians); memory bandwidth {profile['copy_gbps']:.1f} GB/s "
                 f"(median of samples between the steps)")
        print("\n" + format_profile(title, sides, step_ms, profile["copy_gbps"], extra))
        report["batches"][batch] = {side: dict(step_ms=step_ms[side], parts=[asdict(p) for p in sides[side]])
                                    for side in sides} | {"extra": extra, "copy_gbps": profile["copy_gbps"]}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu_profile.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}/cpu_profile.json")
    return 0
