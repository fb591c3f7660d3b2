"""Which implementation each CPU op uses, chosen by running and timing the candidates when a model loads.

The fastest way to run an op on a CPU depends on the processor, the torch build and the shapes,
and no rule carries over: for one bf16 row, `torch.mv` read the weights 35% faster than
`F.linear` on an AVX-512 Xeon with AMX and 1.5-1.9x slower on an AMD EPYC; SDPA's CPU kernel for
a single query token lost to two grouped matmuls by 11x at 160 tokens on the EPYC and won at
1,024. So the candidates are timed here, on the model's own weights and head shapes, on this
machine, and the choice is logged in one line (`CpuPlan.describe`).

Whether a candidate can run at all is found the same way: each is first run once on the model's
shapes inside a guard, and its result checked against a plain fp32 computation. One that raises
(oneDNN's bf16 packing needs AVX-512 or AVX-NE-CONVERT, which AVX2-only processors lack) or
computes something else is dropped and named in the startup line, so nothing the plan keeps can
fail later, and availability is never read from build or ISA flags.

Timing is interleaved (every round runs each candidate once) and the fastest round of each is
compared: on a machine shared with other work, that work only ever adds time, and medians of 7
rounds on a 2-core EPYC shared by four sessions swung 2-3x between two plans of the same weight
(so one plan chose plain fp32 weights that took 4x the packed layout's time for 9 rows). A
candidate replaces the default only when it is faster by `MARGIN`, so noise keeps the default.
Each timed call reads its operands from memory, as a decode step does (it reads every layer's
weights once): the calls rotate over copies of the weight (and of the attention's caches) that
together exceed twice the last-level cache. Timing one weight again and again measured a
cache-resident matmul instead: on an AVX2-only EPYC (32 MiB L3) the plan so chose plain fp32
weights for shapes that fit in L3, which then ran 8-row decode at 0.4 GB/s, a third of the
packed layout's speed.

The plain weight has functions for one row (`ONE_ROW_LINEARS`: `F.linear`, `torch.mv`) and for
several (`SEVERAL_ROW_LINEARS`: `F.linear`), and for bf16 and fp32 weights both have the
project's AVX2 kernel (`gemv`, `model.cpu_avx2`): on an AVX2-only EPYC it ran one bf16 row
1.15-1.4x, 8 rows 3.6-4x and a 128-row prompt chunk about 6x faster than ATen's bf16 `F.linear`. The several-row function is
chosen by its worst ratio at the timed row counts and at a prompt chunk's PREFILL_ROWS, for it
serves prompts too. Besides, a weight can be held in another layout, which then serves every
batch size (`HELD_LAYOUTS`):
- `packed`: prepacked once into oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`),
  which `F.linear` otherwise works from the plain layout on every call. For bf16 on an AVX-512
  EPYC it served one row 15-28% faster than `F.linear`, and 8 and 128 rows faster too; for fp32
  on an AVX2-only EPYC, 8 rows several times faster than MKL's small-batch path.
- `fp32`, `fp32 packed` (16-bit weights): upcast once (and packed) and multiplied in fp32, the
  activations upcast per call and the result rounded back to the model's dtype. A CPU without
  native bf16 dot products runs bf16 matmuls on slow conversion paths; fp32 reads twice the bytes
  but may still win. It costs the extra memory, which the startup line counts, and is refused for
  a shape whose copies would not fit in `MEMORY_SHARE` of the memory available.
- `int8`, `int8 dynamic`, `int8 avx2`, `int8 avx2 dynamic` (`--quantization int8` only, and then
  the only candidates): rows rounded to int8 with a scale each, multiplied by one of four kernels
  (`model.quant`).
Because a held layout serves every batch, layouts are compared at one row, at a speculative
verification step's rows and at a full batch, each by its worst ratio to the fastest there
(`_choose_linear`). The model then holds the winner in place of the plain weight
(`Qwen3Model.plan_cpu_ops`), a tied LM head as a copy beside the embedding table.

A shape may also keep its plain weight for one row and a held copy beside it for several rows
(`CpuPlan.batched_layout`, "split"), when that beats every single layout's worst ratio by MARGIN
and its copy fits the memory budget. On an AVX2-only EPYC, bf16 weights read 1.5x faster plain
than as fp32 packed copies for one row (ATen's bf16 GEMV, ~19 GB/s) while 8 plain rows took 2-3x
the packed copy's time, so any one layout lost a third of batch-1 or of batch-8 decode.

A verification window's attention (a few new tokens over a cached context) is timed the same way,
the SDPA reference against grouped matmuls (`WINDOW_ATTENTIONS`), at VERIFY_ROWS new tokens.
"""

import itertools
import math
import os
import time
from pathlib import Path
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from nanoserve_kernels.attention_frontend import attention_frontend_torch
from nanoserve_kernels.decode_attention import paged_decode_attention_grouped, paged_decode_attention_reference
from nanoserve_kernels.prefill_attention import paged_prefill_attention_grouped, paged_prefill_attention_reference
from nanoserve_kernels.rms_norm import fused_add_rms_norm_reference
from nanoserve_kernels.rope import build_cos_sin_cache
from model import cpu_memory
from model.cpu_avx2 import add_rms_norm, attention_front, decode_attention as avx2_decode_attention, gemv_linear
from model.quant import (INT8, INT8_AVX2, INT8_AVX2_DYNAMIC, INT8_DYNAMIC, dequantize, hold_int8, hold_int8_avx2,
                         hold_int8_avx2_dynamic, hold_int8_dynamic, int8_linear)

LinearFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AttentionFn = Callable[..., torch.Tensor]

MARGIN = 0.05  # a challenger must beat the default by 5%
ROUNDS = 7
BLOCK_SIZE = 16  # of the scratch caches that attention candidates are timed on
SHORT_CONTEXT = 128
# The longest context attention candidates are timed at: longer contexts use the choice made here
# (the nearest measured point). Timing at a 40,960-token context would take seconds and gigabytes.
LONG_CONTEXT = 2048
# The rows of a speculative verification step of one sequence: its token and 8 drafts (a chat
# prediction's default window). Held layouts are timed at this size too: on an AMD EPYC (AVX-512)
# fp32 `F.linear` of the plain weight took 3-8x as long for 9 rows as for 1, where a packed
# weight took 1.5-2x, so a plan timed at 1 row alone made verification cost twice a decode step.
VERIFY_ROWS = 9
MEMORY_SHARE = 0.5  # of the memory available at load time, what held fp32 copies may take
MAX_COPIES = 16  # of one operand, rotated through while timing (see `_copies`)
# A candidate's result may differ from the fp32 computation by this much, relative to its largest
# magnitude: rounding to a 16-bit type (2^-8) and summation order, well below what a wrong kernel gives.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}
# An int8 candidate against the fp32 product with its dequantized weight: `int8 dynamic` rounds the
# activations to 7 bits too (measured: ~2% of the largest output); a wrong kernel is off by ~100%.
INT8_TOLERANCE = 6e-2


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def _mv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.mv(weight, x[0]).unsqueeze(0)


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` ([out, in]) in oneDNN's blocked layout, as an opaque mkldnn tensor."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def held_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for a weight held packed, in fp32 or in int8; the result in `x`'s dtype."""
    if weight.dtype == torch.int8:
        return int8_linear(x, weight)
    compute = x if weight.dtype == x.dtype else x.to(weight.dtype)
    out = packed_linear(compute, weight) if weight.is_mkldnn else F.linear(compute, weight)
    return out.to(x.dtype)


# Functions of the plain weight, for one row and for several; the first of each is the default.
# `gemv`: the project's AVX2 kernel (`model.cpu_avx2`), timed for bf16 and fp32 weights.
GEMV = "gemv"
ONE_ROW_LINEARS: dict[str, LinearFn] = {"linear": _linear, "mv": _mv, GEMV: gemv_linear}
SEVERAL_ROW_LINEARS: dict[str, LinearFn] = {"linear": _linear, GEMV: gemv_linear}
# A prompt chunk's rows: the plain several-row functions are timed here too (not the held layouts,
# nor the LM head, which sees only the rows sampled from), for a function chosen at a few rows
# serves prefill as well. On an AVX2-only EPYC ATen's bf16 `F.linear` ran 128 rows at 20 GFLOP/s,
# the AVX2 kernel at ~120; on a processor with native bf16 matmuls the order may be the reverse.
GEMV_DTYPES = (torch.bfloat16, torch.float32)
PREFILL_ROWS = 128
PREFILL_ROUNDS = 2  # each ATen call there took 40-80 ms on an AVX2-only EPYC
PLAIN, PACKED, FP32, FP32_PACKED = "plain", "packed", "fp32", "fp32 packed"
HELD_LAYOUTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    PACKED: pack_weight,
    FP32: lambda w: w.float(),
    FP32_PACKED: lambda w: pack_weight(w.float()),
    INT8: hold_int8,
    INT8_DYNAMIC: hold_int8_dynamic,
    INT8_AVX2: hold_int8_avx2,
    INT8_AVX2_DYNAMIC: hold_int8_avx2_dynamic,
}
# bytes an element of a held layout takes; the others keep the model's dtype
HELD_ELEMENT_BYTES = {FP32: 4, FP32_PACKED: 4, INT8: 1, INT8_DYNAMIC: 1, INT8_AVX2: 1, INT8_AVX2_DYNAMIC: 1}
# The attribute of a plain weight (an nn.Parameter) that holds its copy for several rows, in a split plan.
BATCHED_COPY = "batched_copy"
DECODE_ATTENTIONS: dict[str, AttentionFn] = {
    "sdpa": paged_decode_attention_reference,
    "grouped": paged_decode_attention_grouped,
    # the project's AVX2 kernel (`model.cpu_avx2`): reads K/V in place from their blocks, once
    "avx2": avx2_decode_attention,
}

# Attention of a few new tokens over a cached context (a verification window): timed at VERIFY_ROWS
# new tokens, used for steps whose prompt chunks are all at most MAX_WINDOW_ROWS tokens (the
# longest window: 1 + 32 drafts); longer chunks take the kernels' prefill attention.
WINDOW_ATTENTIONS: dict[str, AttentionFn] = {
    "sdpa": paged_prefill_attention_reference,
    "grouped": paged_prefill_attention_grouped,
}
MAX_WINDOW_ROWS = 33


# A layer's RMSNorms and attention front-end (timed together, one choice for both), as
# (fused add + RMSNorm, front-end): torch's ops (the references), or one C pass each
# (`model.cpu_avx2`), which at decode sizes skips torch's per-op dispatch and thread-pool wake-ups.
SMALL_OPS: dict[str, tuple[Callable, Callable]] = {
    "torch": (fused_add_rms_norm_reference, attention_frontend_torch),
    "avx2": (add_rms_norm, attention_front),
}


def run_small_ops(ops: tuple[Callable, Callable], x, residual, norm_weight, eps, *front_args) -> torch.Tensor:
    """The norm of `x` + `residual`, then the front-end on `front_args` (qkv, q/k norm weights, eps
    and the rest of `attention_frontend`'s arguments), by `ops` (a SMALL_OPS entry); what they
    computed, flat, in fp32, for the plan's check."""
    norm, front = ops
    normed, summed = norm(x, residual, norm_weight, eps)
    q, k, _ = front(*front_args)
    return torch.cat([t.flatten().float() for t in (normed, summed, q, k)])


def plain_linears(candidates: dict[str, LinearFn], dtype: torch.dtype) -> dict[str, LinearFn]:
    """The functions of `candidates` offered for a plain weight of `dtype` (whether they run is found by running them)."""
    return {name: fn for name, fn in candidates.items() if name != GEMV or dtype in GEMV_DTYPES}


def held_layouts(dtype: torch.dtype, quantization: str | None = None) -> list[str]:
    """The layouts a weight of `dtype` may be offered in (whether they run here is found by running them)."""
    if quantization == "int8":
        return [INT8, INT8_DYNAMIC, INT8_AVX2, INT8_AVX2_DYNAMIC]
    return [PACKED] if dtype == torch.float32 else [PACKED, FP32, FP32_PACKED]


def layout_of(weight: torch.Tensor, dtype: torch.dtype) -> str | None:
    """The held layout `weight` is in, for a model of `dtype`, or None when it is plain."""
    if weight.dtype == torch.int8:
        return weight.int8_layout
    upcast = weight.dtype != dtype
    if weight.is_mkldnn:
        return FP32_PACKED if upcast else PACKED
    return FP32 if upcast else None


def probe_packing(dtype: torch.dtype) -> str | None:
    """Why weights of `dtype` cannot be packed here, or None when a small packed matmul runs and is right."""
    weight, x = torch.randn(48, 32, dtype=dtype), torch.randn(3, 32, dtype=dtype)
    problem = _run_problem(lambda: packed_linear(x, pack_weight(weight)), _reference_linear(x, weight), dtype)
    return None if problem is None else f"packed: {problem}"


@dataclass
class PlannedWeight:
    """One weight shape of the model, for the plan: a sample to time, and what holding it costs."""

    sample: torch.Tensor  # a weight of this shape (plain, or held by an earlier plan)
    replaced: int  # weights of this shape that a held layout replaces
    copied: int = 0  # weights of this shape that stay plain beside a held copy (a tied LM head's table)
    prefill: bool = True  # whether prompt chunks' rows go through it (not the LM head's: it sees sampled rows)


class LinearChoice(NamedTuple):
    """The plan for one weight shape (see `_choose_linear`)."""

    one_row: str  # a one-row function of the plain weight, or the held layout that serves every row count
    split: str | None  # the held layout of a copy for several rows, beside the plain weight for one
    cost: int  # bytes that holding adds
    several_rows: str = "linear"  # the plain weight's function for several rows (without a split copy)


@dataclass
class AttentionChoice:
    batch: int
    context: int
    name: str  # the winner at this (batch, context)


@dataclass
class CpuPlan:
    one_row_linear: dict[tuple[int, int], str]  # weight shape -> winner for a single row, or a held layout
    decode_attention: list[AttentionChoice]  # measured points
    seconds: float  # what measuring took
    extra_bytes: int = 0  # memory the held layouts add (fp32 copies, a tied LM head's copy)
    skipped: dict[str, str] = field(default_factory=dict)  # candidate -> why it was dropped (the first reason)
    # measured points of a verification window's attention (`batch`: its new tokens); none: the kernels' op
    window_attention: list[AttentionChoice] = field(default_factory=list)
    freed_memory: str = ""  # whether freed memory stays in the process, or why not (`model.cpu_memory`)
    # weight shape -> the held layout of a copy that serves several rows, where the plain weight stays for one
    batched_layout: dict[tuple[int, int], str] = field(default_factory=dict)
    # weight shape -> the plain weight's function for several rows, where not F.linear
    several_rows_linear: dict[tuple[int, int], str] = field(default_factory=dict)
    small_ops: str = "torch"  # the winner of SMALL_OPS (the norms and the attention front-end)

    def __post_init__(self) -> None:
        self._one_row = {shape: ONE_ROW_LINEARS[name] for shape, name in self.one_row_linear.items()
                         if name in ONE_ROW_LINEARS}
        self._several = {shape: SEVERAL_ROW_LINEARS[name] for shape, name in self.several_rows_linear.items()}

    def held_layout(self, shape: tuple[int, int]) -> str | None:
        name = self.one_row_linear.get(shape)
        return name if name in HELD_LAYOUTS else None

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if weight.is_mkldnn or weight.dtype != x.dtype:  # held by the plan
            return held_linear(x, weight)
        if x.shape[0] == 1:
            return self._one_row.get(weight.shape, _linear)(x, weight)
        batched = getattr(weight, BATCHED_COPY, None)
        return self._several.get(weight.shape, _linear)(x, weight) if batched is None else held_linear(x, batched)

    def attention_for(self, batch: int, context: int) -> AttentionFn:
        """The winner at the measured point nearest to (batch, context), on log scales."""
        nearest = min(self.decode_attention, key=lambda c: abs(math.log(c.batch / batch)) + abs(math.log(c.context / context)))
        return DECODE_ATTENTIONS[nearest.name]

    def window_attention_for(self, max_query_len: int, context: int) -> AttentionFn | None:
        """The prefill attention for a step whose prompt chunks bring at most `max_query_len` new
        tokens each: the winner at the nearest measured context, or None (the kernels' op) for
        chunks longer than a verification window, or when none was measured."""
        if max_query_len > MAX_WINDOW_ROWS or not self.window_attention:
            return None
        nearest = min(self.window_attention, key=lambda c: abs(math.log(c.context / max(context, 1))))
        return WINDOW_ATTENTIONS[nearest.name]

    def describe(self) -> str:
        def several(shape: tuple[int, int]) -> str:
            name = self.batched_layout.get(shape) or self.several_rows_linear.get(shape)
            return f" (several rows: {name})" if name else ""

        linears = ", ".join(f"{o}x{i} {name}{several((o, i))}" for (o, i), name in self.one_row_linear.items())
        attention = ", ".join(f"B={c.batch} L={c.context} {c.name}" for c in self.decode_attention)
        text = (f"CPU ops chosen by timing them here ({self.seconds:.1f} s, {torch.get_num_threads()} threads, "
                f"ATen {torch.backends.cpu.get_cpu_capability()}): "
                f"one-row matmul: {linears}; decode attention: {attention}")
        text += f"; norms and attention front-end: {self.small_ops}"
        if self.window_attention:
            text += "; verification window attention: " + ", ".join(
                f"Q={c.batch} L={c.context} {c.name}" for c in self.window_attention)
        if self.freed_memory:
            text += f"; freed memory {self.freed_memory}"
        if self.extra_bytes:
            change = "add" if self.extra_bytes > 0 else "save"
            text += f"; held weights {change} {abs(self.extra_bytes) / 2**20:.0f} MiB"
        if self.skipped:
            text += "; skipped: " + "; ".join(f"{reason}" for reason in self.skipped.values())
        return text


def _fastest_seconds(candidates: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():  # warm-up: first-call allocations and dispatch caches
        fn()
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(samples) for name, samples in times.items()}


def fastest(candidates: dict[str, Callable[[], object]], rounds: int = ROUNDS) -> str:
    """The candidate with the lowest time (fastest round), if it beats the first (the default) by MARGIN."""
    return _pick(_fastest_seconds(candidates, rounds))


def _pick(costs: dict[str, float]) -> str:
    """The lowest cost, if it beats the first entry's (the default) by MARGIN; else the default."""
    default = next(iter(costs))
    best = min(costs, key=costs.get)
    return best if costs[best] < costs[default] * (1 - MARGIN) else default


def _run_problem(fn: Callable[[], torch.Tensor], reference: torch.Tensor, dtype: torch.dtype,
                 tolerance: float | None = None) -> str | None:
    """Why `fn` cannot be used here: it raises, or its result is not `reference`'s; None when it is."""
    try:
        out = fn()
    except Exception as err:  # an op this processor or torch build lacks: whatever it raises
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"unavailable here ({first_line[:160]})"
    error = (out.float() - reference).abs().max().item()
    scale = reference.abs().max().item()
    if not error <= (tolerance or TOLERANCE[dtype]) * scale:  # NaN fails too
        return f"gives wrong results here (max |difference| {error:.3g} for values up to {scale:.3g})"
    return None


def runnable(candidates: dict[str, Callable[[], torch.Tensor]], reference: torch.Tensor, dtype: torch.dtype,
             skipped: dict[str, str], tolerance: float | None = None) -> dict[str, Callable[[], torch.Tensor]]:
    """The candidates that run and give `reference` (in order); the others go into `skipped`, by name."""
    kept = {}
    for name, fn in candidates.items():
        problem = _run_problem(fn, reference, dtype, tolerance)
        if problem is None:
            kept[name] = fn
        else:
            skipped.setdefault(name, f"{name}: {problem}")
    return kept


def _reference_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), weight.float())


class _MemoryBudget:
    """What held copies may still take: MEMORY_SHARE of the memory available when the plan starts."""

    def __init__(self) -> None:
        self.left = MEMORY_SHARE * available_memory_bytes()

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.left


def available_memory_bytes() -> int:
    """Memory the kernel says can be given to new allocations without swapping (Linux's MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def last_level_cache_bytes() -> int:
    """The largest CPU cache Linux reports (sysfs), or 64 MiB when it reports none."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        if text.rstrip("KMG").isdigit():
            sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=64 * 2**20)


def _copies(nbytes: int) -> int:
    """How many copies of an `nbytes` operand to rotate through so that each call reads from memory."""
    return max(1, min(MAX_COPIES, math.ceil(2 * last_level_cache_bytes() / max(nbytes, 1))))


def _rotating(fn: Callable, first: tuple, others: list[tuple]) -> Callable[[], torch.Tensor]:
    """A call of `fn` on `first`'s arguments, then on each of `others` in turn, round and round."""
    arguments = itertools.cycle([first, *others])
    return lambda: fn(*next(arguments))


def _holding_cost(weight: PlannedWeight, layout: str, dtype: torch.dtype) -> int:
    """Bytes that holding every weight of this shape in `layout` adds to a model of `dtype` (a
    packed weight keeps its element size)."""
    numel = math.prod(weight.sample.shape)
    plain = numel * dtype.itemsize
    held = numel * HELD_ELEMENT_BYTES.get(layout, dtype.itemsize)
    return weight.replaced * (held - plain) + weight.copied * held


def _split_cost(weight: PlannedWeight, layout: str, dtype: torch.dtype) -> int:
    """Bytes that a copy in `layout` beside every plain weight of this shape adds."""
    numel = math.prod(weight.sample.shape)
    return (weight.replaced + weight.copied) * numel * HELD_ELEMENT_BYTES.get(layout, dtype.itemsize)


def _choose_linear(weight: PlannedWeight, row_counts: list[int], budget: _MemoryBudget, skipped: dict[str, str],
                   quantization: str | None = None) -> LinearChoice:
    """The winner for this weight shape (a one-row function of the plain weight, or a held layout),
    the held layout of a copy for several rows when the plain weight stays for one (a split), the
    bytes it adds, and the plain weight's function for several rows.

    A held layout serves every batch size, so layouts are compared at each of `row_counts` (one
    row first, then the step sizes to serve: a verification window, a full batch), each by its
    worst ratio to the fastest at any of them: neither batch-1 decode, a verification step nor a
    full batch may pay much for another's gain. The plain weight's several-row function is chosen
    the same way among its candidates, at those row counts and at a prompt chunk's (PREFILL_ROWS).
    A split is compared like a layout and taken when it beats the best single layout by MARGIN.
    With a `quantization`, only its layouts compete."""
    sample = weight.sample
    one_row_fns = {} if quantization else plain_linears(ONE_ROW_LINEARS, sample.dtype)
    several_fns = {} if quantization else plain_linears(SEVERAL_ROW_LINEARS, sample.dtype)
    held: dict[str, torch.Tensor] = {}
    for layout in held_layouts(sample.dtype, quantization):
        cost = _holding_cost(weight, layout, sample.dtype)
        if not budget.fits(cost):
            skipped.setdefault(layout, f"{layout}: {tuple(sample.shape)} would need {cost / 2**30:.1f} GiB more, "
                                       f"over {MEMORY_SHARE:.0%} of the memory available")
            continue
        try:
            held[layout] = HELD_LAYOUTS[layout](sample)
        except Exception as err:
            skipped.setdefault(layout, f"{layout}: unavailable here ({str(err).strip().splitlines()[0][:160]})")
    operands = _Operands.of(sample, held)
    one_row = _times(operands, 1, one_row_fns, skipped)
    operands.held = {layout: copies for layout, copies in operands.held.items() if layout in one_row}
    if not one_row:
        raise RuntimeError(f"no matmul runs on this CPU for a {tuple(sample.shape)} {sample.dtype} weight: "
                           + "; ".join(skipped.values()))
    plain_fns = {name: one_row[name] for name in one_row_fns if name in one_row}
    plain_one_row = _pick(plain_fns) if plain_fns else None
    # Per option (a held layout; each plain several-row function): seconds at each row count.
    options: dict[str, list[float]] = {layout: [one_row[layout]] for layout in operands.held}
    plain_several: dict[str, list[float]] = {name: [] for name in several_fns}
    for rows in sorted(set(row_counts) - {1}):
        times = _times(operands, rows, several_fns, skipped)
        plain_several = {name: [*seconds, times[name]] for name, seconds in plain_several.items() if name in times}
        options = {name: [*seconds, times[name]] for name, seconds in options.items() if name in times}
    several_timed = plain_several
    if len(plain_several) > 1 and weight.prefill:  # a choice to make, for prompts too
        prefill = _times(_Operands(sample, operands.clones, {}), PREFILL_ROWS, several_fns, skipped, PREFILL_ROUNDS)
        several_timed = {name: [*seconds, prefill[name]] for name, seconds in plain_several.items() if name in prefill}
    several_rows = _pick(_worst_ratios(several_timed)) if several_timed else None
    if plain_one_row is not None and (several_rows is not None or len(row_counts) == 1):
        options = {PLAIN: [one_row[plain_one_row], *plain_several.get(several_rows, [])]} | options
    if not options:
        raise RuntimeError(f"no matmul runs on this CPU for {max(row_counts)} rows of a {tuple(sample.shape)} weight: "
                           + "; ".join(skipped.values()))
    singles = _worst_ratios(options)
    winner = _pick(singles)
    # The plain weight for one row and a held copy for several: the plain one-row time, the copy's others.
    fastest_at = [min(column) for column in zip(*options.values())]
    splits = {layout: _worst_ratio([options[PLAIN][0], *times[1:]], fastest_at) for layout, times in options.items()
              if PLAIN in options and layout != PLAIN and len(times) > 1
              and budget.fits(_split_cost(weight, layout, sample.dtype))}
    if splits and (split := min(splits, key=splits.get)) and splits[split] < singles[winner] * (1 - MARGIN):
        cost = _split_cost(weight, split, sample.dtype)
        budget.left -= cost
        return LinearChoice(plain_one_row, split, cost)
    if winner == PLAIN:
        return LinearChoice(plain_one_row, None, 0, several_rows or "linear")
    cost = _holding_cost(weight, winner, sample.dtype)
    budget.left -= cost
    return LinearChoice(winner, None, cost)


def _worst_ratio(times: list[float], fastest_at: list[float]) -> float:
    return max(t / best if best else 1.0 for t, best in zip(times, fastest_at))


def _worst_ratios(options: dict[str, list[float]]) -> dict[str, float]:
    """Per option, its worst ratio to the fastest option at any of the row counts (columns) they were timed at."""
    fastest_at = [min(column) for column in zip(*options.values())]
    return {name: _worst_ratio(times, fastest_at) for name, times in options.items()}


@dataclass
class _Operands:
    """A weight, the clones of it the timings rotate through (so that each call reads from memory),
    and each held layout's copies of those: built once per weight shape, read at every row count."""

    weight: torch.Tensor
    clones: list[torch.Tensor]
    held: dict[str, list[torch.Tensor]]  # layout -> [copy of the weight, copies of the clones]

    @classmethod
    def of(cls, weight: torch.Tensor, held: dict[str, torch.Tensor]) -> "_Operands":
        clones = [weight.clone() for _ in range(_copies(weight.numel() * weight.element_size()) - 1)]
        return cls(weight, clones, {layout: [copy] + [HELD_LAYOUTS[layout](clone) for clone in clones]
                                    for layout, copy in held.items()})


def _times(operands: _Operands, rows: int, plain: dict[str, LinearFn], skipped: dict[str, str],
           rounds: int = ROUNDS) -> dict[str, float]:
    """Seconds (fastest round) of `rows` random rows through each plain function of the weight and each held
    copy of it, for those that run and give the right result (the others go into `skipped`)."""
    weight = operands.weight
    x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)

    def rotating_held(layout: str) -> Callable[[], torch.Tensor]:
        first, *others = operands.held[layout]
        return _rotating(held_linear, (x, first), [(x, copy) for copy in others])

    candidates = {name: _rotating(fn, (x, weight), [(x, clone) for clone in operands.clones])
                  for name, fn in plain.items()}
    candidates |= {layout: rotating_held(layout) for layout, copies in operands.held.items()
                   if copies[0].dtype != torch.int8}
    candidates = runnable(candidates, _reference_linear(x, weight), weight.dtype, skipped)
    for layout, copies in operands.held.items():  # int8: against its own dequantized weight, at int8's tolerance
        if copies[0].dtype == torch.int8:
            candidates |= runnable({layout: rotating_held(layout)}, _reference_linear(x, dequantize(copies[0])),
                                   weight.dtype, skipped, INT8_TOLERANCE)
    return _fastest_seconds(candidates, rounds) if candidates else {}


@torch.inference_mode()
def measure_cpu_plan(
    weights: list[PlannedWeight], dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int,
    max_batch: int, max_context: int, quantization: str | None = None, verify_rows: int = VERIFY_ROWS,
    hidden_size: int | None = None,
) -> CpuPlan:
    """Time the candidates on `weights` (one per weight shape) at one row, `verify_rows` and
    `max_batch` rows, and on decode attention over scratch caches at batch 1 and `max_batch`,
    contexts SHORT_CONTEXT and `max_context` (at most LONG_CONTEXT); with `hidden_size`, a layer's
    small ops (SMALL_OPS) at one row and `max_batch` rows too."""
    started = time.perf_counter()
    long_context = min(max_context, LONG_CONTEXT)
    # first, so that every timing below runs under the allocator settings the model will run under
    freed_memory = cpu_memory.keep_freed_memory_if_possible(available_memory_bytes())
    one_row: dict[tuple[int, int], str] = {}
    batched: dict[tuple[int, int], str] = {}
    several: dict[tuple[int, int], str] = {}
    skipped: dict[str, str] = {}
    budget = _MemoryBudget()
    extra_bytes = 0
    for weight in weights:
        shape = tuple(weight.sample.shape)
        if (held := layout_of(weight.sample, dtype)) is not None:  # held by an earlier plan: it stays so
            one_row[shape] = held
            extra_bytes += _holding_cost(weight, held, dtype)
            continue
        if (copy := getattr(weight.sample, BATCHED_COPY, None)) is not None:  # split by an earlier plan: it stays so
            batched[shape] = layout_of(copy, dtype)
            one_row[shape] = _pick(_times(_Operands.of(weight.sample, {}), 1, plain_linears(ONE_ROW_LINEARS, dtype),
                                          skipped) or {"linear": 0.0})
            extra_bytes += _split_cost(weight, batched[shape], dtype)
            continue
        choice = _choose_linear(weight, [1, verify_rows, max_batch], budget, skipped, quantization)
        one_row[shape] = choice.one_row
        if choice.split is not None:
            batched[shape] = choice.split
        if choice.several_rows != "linear":
            several[shape] = choice.several_rows
        extra_bytes += choice.cost
    attention = []
    for batch in sorted({1, max_batch}):
        for context in sorted({min(SHORT_CONTEXT, long_context), long_context}):
            attention.append(AttentionChoice(batch, context, _choose_attention(
                _attention_inputs(batch, context, num_heads, num_kv_heads, head_dim, dtype), skipped)))
    window = [AttentionChoice(verify_rows, context, _choose_window_attention(
                  _window_inputs(verify_rows, context, num_heads, num_kv_heads, head_dim, dtype), skipped))
              # a window's context holds at least its own tokens
              for context in sorted({max(min(SHORT_CONTEXT, long_context), verify_rows), max(long_context, verify_rows)})]
    small_ops = "torch" if hidden_size is None else _choose_small_ops(
        hidden_size, num_heads, num_kv_heads, head_dim, dtype, sorted({1, max_batch}), skipped)
    return CpuPlan(one_row, attention, time.perf_counter() - started, extra_bytes, skipped, window, freed_memory,
                   batched, several, small_ops)


def _choose_small_ops(hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      row_counts: list[int], skipped: dict[str, str]) -> str:
    """The SMALL_OPS candidate with the best worst ratio over `row_counts` rows, among those that
    run and give the references' results at every row count (torch, the default, always does)."""
    times: dict[str, list[float]] = {name: [] for name in SMALL_OPS}
    for rows in row_counts:
        args = _small_ops_inputs(rows, hidden_size, num_heads, num_kv_heads, head_dim, dtype)
        candidates = {name: (lambda ops=ops: run_small_ops(ops, *args)) for name, ops in SMALL_OPS.items() if name in times}
        dropped: dict[str, str] = {}
        kept = runnable(candidates, run_small_ops(SMALL_OPS["torch"], *args), dtype, dropped)
        for name, reason in dropped.items():
            skipped.setdefault(f"small ops {name}", f"norms and attention front-end {reason}")
            times.pop(name, None)
        for name, seconds in _fastest_seconds(kept, ROUNDS).items():
            times[name].append(seconds)
    return _pick(_worst_ratios(times)) if len(times) > 1 else "torch"


def _small_ops_inputs(rows: int, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                      dtype: torch.dtype) -> tuple:
    """Random arguments of `run_small_ops` after its `ops`, for `rows` tokens: a hidden row and
    residual each, their QKV row, norm weights, positions and distinct cache slots over a scratch cache."""
    blocks = -(-rows // BLOCK_SIZE) + 1
    qkv = torch.randn(rows, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    x, residual = torch.randn(rows, hidden_size, dtype=dtype), torch.randn(rows, hidden_size, dtype=dtype)
    k_cache = torch.randn(blocks, BLOCK_SIZE, num_kv_heads, head_dim, dtype=dtype)
    return (x, residual, 1 + 0.1 * torch.randn(hidden_size, dtype=dtype), 1e-6, qkv,
            1 + 0.1 * torch.randn(head_dim, dtype=dtype), 1 + 0.1 * torch.randn(head_dim, dtype=dtype), 1e-6,
            torch.randint(0, LONG_CONTEXT, (rows,)), build_cos_sin_cache(LONG_CONTEXT, head_dim, 1e6),
            k_cache, torch.randn_like(k_cache), torch.randperm(blocks * BLOCK_SIZE)[:rows])


def _choose_attention(args: tuple, skipped: dict[str, str]) -> str:
    q, k_cache, v_cache = args[:3]
    reference = _attention_reference(*args)
    others = [(q, k_cache.clone(), v_cache.clone(), *args[3:])
              for _ in range(_copies(2 * k_cache.numel() * k_cache.element_size()) - 1)]
    candidates = {name: _rotating(fn, args, others) for name, fn in DECODE_ATTENTIONS.items()}
    candidates = runnable(candidates, reference, q.dtype, skipped)
    if not candidates:
        raise RuntimeError("no decode attention runs on this CPU: " + "; ".join(skipped.values()))
    return fastest(candidates) if len(candidates) > 1 else next(iter(candidates))


def _choose_window_attention(args: tuple, skipped: dict[str, str]) -> str:
    q, k, v, k_cache, v_cache = args[:5]
    reference = _window_reference(*args)
    others = [(q, k, v, k_cache.clone(), v_cache.clone(), *args[5:])
              for _ in range(_copies(2 * k_cache.numel() * k_cache.element_size()) - 1)]
    candidates = {name: _rotating(fn, args, others) for name, fn in WINDOW_ATTENTIONS.items()}
    dropped: dict[str, str] = {}
    candidates = runnable(candidates, reference, q.dtype, dropped)
    for name, reason in dropped.items():
        skipped.setdefault(f"window {name}", f"window attention {reason}")
    if not candidates:
        raise RuntimeError("no verification-window attention runs on this CPU: " + "; ".join(dropped.values()))
    return fastest(candidates) if len(candidates) > 1 else next(iter(candidates))


def _window_reference(q, k, v, k_cache, v_cache, block_tables, query_start_loc, context_lens, max_query_len,
                      scale) -> torch.Tensor:
    """Causal attention of one sequence's new tokens over its context in fp32, written out plainly."""
    _, block_size, kv_heads, head_dim = k_cache.shape
    group = q.shape[1] // kv_heads
    context, num_new = int(context_lens[0]), q.shape[0]
    blocks = block_tables[0, : -(-context // block_size)].long()
    keys = k_cache[blocks].reshape(-1, kv_heads, head_dim)[:context].float().repeat_interleave(group, 1)
    values = v_cache[blocks].reshape(-1, kv_heads, head_dim)[:context].float().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,lhd->hql", q.float(), keys) * scale
    future = torch.arange(context)[None, :] > torch.arange(context - num_new, context)[:, None]
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    return torch.einsum("hql,lhd->qhd", probs, values)


def _window_inputs(num_new: int, context: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
    """Random prefill-attention arguments: one sequence of `num_new` new tokens over a `context`-token
    context (theirs included) in a shuffled cache."""
    q, k_cache, v_cache, block_tables, context_lens, scale = _attention_inputs(
        1, context, num_heads, num_kv_heads, head_dim, dtype)
    q = torch.randn(num_new, num_heads, head_dim, dtype=dtype)
    query_start_loc = torch.tensor([0, num_new], dtype=torch.int32)
    return q, None, None, k_cache, v_cache, block_tables, query_start_loc, context_lens, num_new, scale


def _attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale) -> torch.Tensor:
    """Decode attention in fp32, written out plainly: what every candidate must give."""
    _, block_size, kv_heads, head_dim = k_cache.shape
    group = q.shape[1] // kv_heads
    out = torch.empty(q.shape, dtype=torch.float32)
    for b, length in enumerate(context_lens.tolist()):
        blocks = block_tables[b, : -(-length // block_size)].long()
        keys = k_cache[blocks].reshape(-1, kv_heads, head_dim)[:length].float().repeat_interleave(group, 1)
        values = v_cache[blocks].reshape(-1, kv_heads, head_dim)[:length].float().repeat_interleave(group, 1)
        probs = (torch.einsum("hd,lhd->hl", q[b].float(), keys) * scale).softmax(-1)
        out[b] = torch.einsum("hl,lhd->hd", probs, values)
    return out


def _attention_inputs(batch: int, context: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
    """Random decode-attention arguments: `batch` sequences of `context` tokens in a shuffled cache."""
    width = -(-context // BLOCK_SIZE)
    shape = (batch * width, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    block_tables = torch.randperm(batch * width, dtype=torch.int32).view(batch, width)
    context_lens = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, num_heads, head_dim, dtype=dtype)
    return q, k_cache, v_cache, block_tables, context_lens, head_dim**-0.5
