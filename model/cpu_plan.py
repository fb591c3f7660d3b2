"""Which implementation each CPU op uses, chosen by timing the candidates when a model loads.

The fastest way to run an op on a CPU depends on the processor, the torch build and the shapes,
and no rule carries over: for one bf16 row, `torch.mv` read the weights 35% faster than
`F.linear` on an AVX-512 Xeon with AMX and 1.5-1.9x slower on an AMD EPYC; SDPA's CPU kernel for
a single query token lost to two grouped matmuls by 11x at 160 tokens on the EPYC and won at
1,024. So the candidates are timed here, on the model's own weights and head shapes, on this
machine, and the choice is logged in one line (`CpuPlan.describe`).

Timing is interleaved (every round runs each candidate once) and the median of each is compared;
a candidate replaces the default only when it is faster by `MARGIN`, so noise keeps the default.

For bf16 weights there is a third candidate: the weight prepacked once into oneDNN's blocked
layout (`torch.ops.mkldnn._reorder_linear_weight`), which `F.linear` otherwise works from the
plain layout on every call. It served one row 15-28% faster than `F.linear` on the EPYC, and 8
and 128 rows faster too, with bit-identical results there (bf16 `F.linear` runs oneDNN itself).
A packed weight serves every batch size, so it is kept only if a full batch is no slower with it;
the model then holds it in place of the plain weight (`Qwen3Model.plan_cpu_ops`).
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.decode_attention import paged_decode_attention_grouped, paged_decode_attention_reference

LinearFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AttentionFn = Callable[..., torch.Tensor]

MARGIN = 0.05  # a challenger must beat the default by 5%
ROUNDS = 7
BLOCK_SIZE = 16  # of the scratch caches that attention candidates are timed on
SHORT_CONTEXT = 128


def _linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


def _mv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.mv(weight, x[0]).unsqueeze(0)


def packing_available(dtype: torch.dtype) -> bool:
    """Whether weights of `dtype` may be prepacked: bf16, where `F.linear` runs oneDNN's kernels too."""
    return dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` ([out, in]) in oneDNN's blocked layout, as an opaque mkldnn tensor."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


# The first candidate is the default.
ONE_ROW_LINEARS: dict[str, LinearFn] = {"linear": _linear, "mv": _mv}
PACKED = "packed"  # a weight shape whose weights are held packed (for every batch size)
DECODE_ATTENTIONS: dict[str, AttentionFn] = {
    "sdpa": paged_decode_attention_reference,
    "grouped": paged_decode_attention_grouped,
}


@dataclass
class AttentionChoice:
    batch: int
    context: int
    name: str  # the winner at this (batch, context)


@dataclass
class CpuPlan:
    one_row_linear: dict[tuple[int, int], str]  # weight shape -> winner for a single row, or PACKED
    decode_attention: list[AttentionChoice]  # measured points
    seconds: float  # what measuring took
    extra_bytes: int = 0  # memory the plan added (a packed copy of a tied LM head)

    def __post_init__(self) -> None:
        self._one_row = {shape: ONE_ROW_LINEARS[name] for shape, name in self.one_row_linear.items()
                         if name in ONE_ROW_LINEARS}

    @property
    def packed_shapes(self) -> set[tuple[int, int]]:
        return {shape for shape, name in self.one_row_linear.items() if name == PACKED}

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if weight.is_mkldnn:  # packed by the plan
            return packed_linear(x, weight)
        if x.shape[0] == 1:
            return self._one_row.get(weight.shape, _linear)(x, weight)
        return F.linear(x, weight)

    def attention_for(self, batch: int, context: int) -> AttentionFn:
        """The winner at the measured point nearest to (batch, context), on log scales."""
        nearest = min(self.decode_attention, key=lambda c: abs(math.log(c.batch / batch)) + abs(math.log(c.context / context)))
        return DECODE_ATTENTIONS[nearest.name]

    def describe(self) -> str:
        linears = ", ".join(f"{o}x{i} {name}" for (o, i), name in self.one_row_linear.items())
        attention = ", ".join(f"B={c.batch} L={c.context} {c.name}" for c in self.decode_attention)
        extra = f"; the tied LM head packed as a copy (+{self.extra_bytes / 2**20:.0f} MiB)" if self.extra_bytes else ""
        return (f"CPU ops chosen by timing them here ({self.seconds:.1f} s, {torch.get_num_threads()} threads): "
                f"one-row matmul: {linears}; decode attention: {attention}{extra}")


def _median_seconds(candidates: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():  # warm-up: first-call allocations and dispatch caches
        fn()
    for _ in range(rounds):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(samples)[len(samples) // 2] for name, samples in times.items()}


def fastest(candidates: dict[str, Callable[[], object]], rounds: int = ROUNDS) -> str:
    """The candidate with the lowest median time, if it beats the first (the default) by MARGIN."""
    medians = _median_seconds(candidates, rounds)
    default = next(iter(candidates))
    best = min(medians, key=medians.get)
    return best if medians[best] < medians[default] * (1 - MARGIN) else default


@torch.inference_mode()
def measure_cpu_plan(
    weights: list[torch.Tensor], num_heads: int, num_kv_heads: int, head_dim: int, max_batch: int, max_context: int,
) -> CpuPlan:
    """Time the candidates on `weights` (one of each projection shape) and on decode attention over
    scratch caches at batch 1 and `max_batch`, contexts SHORT_CONTEXT and `max_context`."""
    started = time.perf_counter()
    one_row = {}
    for weight in weights:
        shape = tuple(weight.shape)
        if shape in one_row:
            continue
        if weight.is_mkldnn:  # packed by an earlier plan: it stays so
            one_row[shape] = PACKED
            continue
        x = torch.randn(1, weight.shape[1], dtype=weight.dtype)
        candidates = {name: (lambda fn=fn: fn(x, weight)) for name, fn in ONE_ROW_LINEARS.items()}
        if packing_available(weight.dtype):
            packed = pack_weight(weight)
            one_row[shape] = fastest(candidates | {PACKED: lambda: packed_linear(x, packed)})
            if one_row[shape] == PACKED and max_batch > 1 and not _packed_serves_a_batch(weight, packed, max_batch):
                one_row[shape] = fastest(candidates)
            del packed
        else:
            one_row[shape] = fastest(candidates)
    dtype = weights[0].dtype
    attention = []
    for batch in sorted({1, max_batch}):
        for context in sorted({min(SHORT_CONTEXT, max_context), max_context}):
            args = _attention_inputs(batch, context, num_heads, num_kv_heads, head_dim, dtype)
            candidates = {name: (lambda fn=fn: fn(*args)) for name, fn in DECODE_ATTENTIONS.items()}
            attention.append(AttentionChoice(batch, context, fastest(candidates)))
    return CpuPlan(one_row, attention, time.perf_counter() - started)


def _packed_serves_a_batch(weight: torch.Tensor, packed: torch.Tensor, batch: int) -> bool:
    """Whether `batch` rows through the packed weight are no slower than `F.linear` (by MARGIN)."""
    x = torch.randn(batch, weight.shape[1], dtype=weight.dtype)
    return fastest({PACKED: lambda: packed_linear(x, packed), "linear": lambda: F.linear(x, weight)}) == PACKED


def _attention_inputs(batch: int, context: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
    """Random decode-attention arguments: `batch` sequences of `context` tokens in a shuffled cache."""
    width = -(-context // BLOCK_SIZE)
    shape = (batch * width, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    block_tables = torch.randperm(batch * width, dtype=torch.int32).view(batch, width)
    context_lens = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, num_heads, head_dim, dtype=dtype)
    return q, k_cache, v_cache, block_tables, context_lens, head_dim**-0.5
