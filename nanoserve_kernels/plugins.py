"""The load-time check of kernel plug-ins: each against its op's torch reference, once.

A plug-in (`op=module:function` in a kernel spec, imported by `nanoserve_kernels.backend.set_backend`) must
keep the contract of the op's public function in `nanoserve_kernels` (same arguments, shapes, dtypes, the
same outputs and in-place writes); the torch reference is the specification. Before a model runs
it, `check_plugins` feeds the plug-in and the reference the same small random inputs, in the
model's dtype, device and head layout (so a plug-in written for one head size or block size is
checked at the one it will see), including the cases the model produces: a strided q/k view for
the norm, a padding slot (-1) for the K/V store, sequences of several lengths over shuffled blocks,
a prompt chunk over a cached prefix. Any output further from the reference than the dtype's
tolerance, or any exception, fails with one message naming the op, the output and the worst
difference. A check that passed is not repeated for the same plug-in, dtype, device and layout.
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanoserve_kernels.attention_frontend import attention_frontend_reference
from nanoserve_kernels.backend import PLUGINS, plugin_targets
from nanoserve_kernels.decode_attention import paged_decode_attention_reference
from nanoserve_kernels.prefill_attention import paged_prefill_attention_reference
from nanoserve_kernels.rms_norm import rms_norm_reference
from nanoserve_kernels.rope import apply_rope_reference, build_cos_sin_cache
from nanoserve_kernels.store_kv import store_kv_reference
from nanoserve_kernels.token_bitmask import apply_token_bitmask_reference

# |plug-in - reference| <= TOLERANCES[dtype] x max |reference|, per output: fp32 allows
# summation-order differences; fp16 and bf16 three ulps of the largest value, as the kernels' own
# tests (values are rounded up to three times, the interpreter truncates where the GPU rounds, and
# RoPE mixes two values per output, so an output near zero inherits its partner's error).
TOLERANCES = {torch.float32: 1e-5, torch.float16: 3 * 2**-10, torch.bfloat16: 3 * 2**-7}


@dataclass(frozen=True)
class HeadLayout:
    """The shapes a model gives its ops; the defaults are a small GQA layout."""

    hidden: int = 96
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    block_size: int = 16


class PluginCheckFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class PluginCheck:
    op: str
    target: str
    max_abs_diff: float  # worst |plug-in - reference| over every output of every case
    dtype: torch.dtype
    device: torch.device

    def describe(self) -> str:
        return (f"plug-in {self.op}={self.target} matches its torch reference "
                f"(max |Δ| {self.max_abs_diff:.2e} at {str(self.dtype).removeprefix('torch.')} on {self.device.type})")


Outputs = dict[str, torch.Tensor]  # what a call returned or wrote, by name
Case = Callable[[Callable], Outputs]  # runs an implementation on fresh copies of fixed inputs


def check_plugins(device: torch.device | str, dtype: torch.dtype, layout: HeadLayout = HeadLayout()) -> list[PluginCheck]:
    """Checks every plug-in in force against its reference; PluginCheckFailed on the first that differs."""
    return [check_plugin(op, target, PLUGINS[op], torch.device(device), dtype, layout)
            for op, target in sorted(plugin_targets().items())]


@functools.cache
def check_plugin(op: str, target: str, function: Callable, device: torch.device, dtype: torch.dtype,
                 layout: HeadLayout) -> PluginCheck:
    """One plug-in over every case of its op (cached: the check runs once per dtype, device, layout)."""
    worst = 0.0
    for case_name, case in CASES[op](device, dtype, layout).items():
        expected = case(REFERENCES[op])
        label = f"plug-in {op}={target} ({case_name}; {str(dtype).removeprefix('torch.')} on {device.type})"
        try:
            got = case(function)
        except Exception as err:
            raise PluginCheckFailed(f"{label} raised {type(err).__name__}: {err}") from err
        for name, want in expected.items():
            worst = max(worst, _max_abs_diff(label, name, got.get(name), want))
    return PluginCheck(op, target, worst, dtype, device)


def _max_abs_diff(label: str, name: str, got: object, want: torch.Tensor) -> float:
    """max |got - want|, or PluginCheckFailed when it is past the tolerance of want's dtype."""
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        what = f"shape {list(got.shape)}" if isinstance(got, torch.Tensor) else type(got).__name__
        raise PluginCheckFailed(f"{label}: {name} should be a tensor of shape {list(want.shape)}, got {what}")
    relative = TOLERANCES.get(want.dtype, TOLERANCES[torch.float32])
    got, want = got.float(), want.float()
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), finite) or not torch.equal(got[~finite], want[~finite]):
        raise PluginCheckFailed(f"{label}: {name} is infinite or NaN where the reference is not (or the other way round)")
    if not finite.any():
        return 0.0
    worst, largest = float((got[finite] - want[finite]).abs().max()), float(want[finite].abs().max())
    if worst > relative * largest:
        raise PluginCheckFailed(f"{label} does not match the torch reference: {name} differs by up to {worst:.3g} "
                                f"(tolerance {relative * largest:.3g}: {relative:.3g} x its largest value {largest:.3g})")
    return worst


# Inputs. Every case builds its tensors once from a fixed seed; each run gets fresh copies, so
# in-place writes (RoPE, the K/V store, the bitmask) cannot leak from one implementation to the other.


def _randn(generator: torch.Generator, *shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Random values bounded away from zero, so that an implementation writing zeros cannot pass."""
    x = torch.randn(*shape, generator=generator)
    return (x + x.sign() * 0.1).to(dtype=dtype, device=device)


def _fresh(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.clone() for t in tensors]


def _norm_cases(device: torch.device, dtype: torch.dtype, layout: HeadLayout) -> dict[str, Case]:
    g, L = torch.Generator().manual_seed(0), layout
    x, weight = _randn(g, 5, L.hidden, dtype=dtype, device=device), _randn(g, L.hidden, dtype=dtype, device=device)
    qkv = _randn(g, 5, (L.q_heads + 2 * L.kv_heads) * L.head_dim, dtype=dtype, device=device)
    q_view = qkv[:, : L.q_heads * L.head_dim].view(5, L.q_heads, L.head_dim)  # strided, as the unfused front-end passes it
    head_weight = _randn(g, L.head_dim, dtype=dtype, device=device)
    return {
        "hidden rows [5, hidden]": lambda fn: {"out": fn(x.clone(), weight, 1e-6)},
        "q heads, a strided [5, Hq, D] view": lambda fn: {"out": fn(qkv.clone()[:, : q_view.shape[1] * L.head_dim]
                                                                      .view(q_view.shape), head_weight, 1e-6)},
    }


def _rope_cases(device: torch.device, dtype: torch.dtype, layout: HeadLayout) -> dict[str, Case]:
    g, L = torch.Generator().manual_seed(1), layout
    q = _randn(g, 7, L.q_heads, L.head_dim, dtype=dtype, device=device)
    k = _randn(g, 7, L.kv_heads, L.head_dim, dtype=dtype, device=device)
    positions = torch.randint(0, 300, (7,), generator=g).to(device)
    cos_sin = build_cos_sin_cache(300, L.head_dim, 1e6, device)

    def case(fn: Callable) -> Outputs:
        q_out, k_out = fn(*_fresh(q, k), positions, cos_sin)
        return {"q": q_out, "k": k_out}

    return {"7 tokens at random positions": case}


def _caches(g: torch.Generator, num_blocks: int, device: torch.device, dtype: torch.dtype, layout: HeadLayout):
    """K and V caches full of stale values (never zeros)."""
    shape = (num_blocks, layout.block_size, layout.kv_heads, layout.head_dim)
    return _randn(g, *shape, dtype=dtype, device=device), _randn(g, *shape, dtype=dtype, device=device)


def _slots(g: torch.Generator, tokens: int, num_blocks: int, block_size: int, device: torch.device) -> torch.Tensor:
    """Distinct random slots, the last token a padding row (-1: not stored), as CUDA-graph padding is."""
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    slots[-1] = -1
    return slots.to(device)


def _store_cases(device: torch.device, dtype: torch.dtype, layout: HeadLayout) -> dict[str, Case]:
    g, L = torch.Generator().manual_seed(2), layout
    kv = _randn(g, 6, 2 * L.kv_heads * L.head_dim, dtype=dtype, device=device)
    k = kv[:, : L.kv_heads * L.head_dim].view(6, L.kv_heads, L.head_dim).contiguous()
    v = kv[:, L.kv_heads * L.head_dim :].view(6, L.kv_heads, L.head_dim)  # strided, as v comes out of qkv
    k_cache, v_cache = _caches(g, 3, device, dtype, L)
    slots = _slots(g, 6, 3, L.block_size, device)

    def case(fn: Callable) -> Outputs:
        k_out, v_out = _fresh(k_cache, v_cache)
        fn(k, v, k_out, v_out, slots)
        return {"k_cache": k_out, "v_cache": v_out}

    return {"6 tokens into shuffled slots, one padding": case}


def _frontend_cases(device: torch.device, dtype: torch.dtype, layout: HeadLayout) -> dict[str, Case]:
    g, L = torch.Generator().manual_seed(3), layout
    qkv = _randn(g, 6, (L.q_heads + 2 * L.kv_heads) * L.head_dim, dtype=dtype, device=device)
    q_weight, k_weight = (_randn(g, L.head_dim, dtype=dtype, device=device) for _ in range(2))
    positions = torch.randint(0, 300, (6,), generator=g).to(device)
    cos_sin = build_cos_sin_cache(300, L.head_dim, 1e6, device)
    k_cache, v_cache = _caches(g, 3, device, dtype, L)
    slots = _slots(g, 6, 3, L.block_size, device)

    def case(fn: Callable) -> Outputs:
        k_out, v_out = _fresh(k_cache, v_cache)
        q, _, _ = fn(qkv, q_weight, k_weight, 1e-6, positions, cos_sin, k_out, v_out, slots)
        return {"q": q, "k_cache": k_out, "v_cache": v_out}

    return {"6 tokens, one padding": case}


def _table(g: torch.Generator, lengths: list[int], block_size: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """Block tables [S, W] int32 over shuffled blocks (rows padded with block 0), and the blocks in all."""
    per_seq = [-(-n // block_size) for n in lengths]
    blocks = torch.randperm(sum(per_seq) + 2, generator=g).tolist()
    width, rows, start = max(per_seq), [], 0
    for n in per_seq:
        rows.append(blocks[start : start + n] + [0] * (width - n))
        start += n
    return torch.tensor(rows, dtype=torch.int32, device=device), len(blocks)


def _decode_cases(device: torch.device, dtype: torch.dtype, layout: HeadLayout) -> dict[str, Case]:
    g, L = torch.Generator().manual_seed(4), layout
    lengths = [1, L.block_size + 1, 3 * L.block_size - 5]  # one token (a padding row's), across blocks
    tables, num_blocks = _table(g, lengths, L.block_size, device)
    k_cache, v_cache = _caches(g, num_blocks, device, dtype, L)
    q = _randn(g, len(lengths), L.q_heads, L.head_dim, dtype=dtype, device=device)
    context_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    scale = L.head_dim**-0.5
    return {f"{len(lengths)} sequences of {lengths} tokens": lambda fn: {
        "out": fn(q, k_cache, v_cache, tables, context_lens, scale)}}


def _prefill_cases(device: torch.device, dtype: torch.dtype, layout: HeadLayout) -> dict[str, Case]:
    g, L = torch.Generator().manual_seed(5), layout
    query_lens, cached = [7, 5], [0, L.block_size + 3]  # a fresh prompt, then a chunk over a cached prefix
    lengths = [n + c for n, c in zip(query_lens, cached)]
    tables, num_blocks = _table(g, lengths, L.block_size, device)
    k_cache, v_cache = _caches(g, num_blocks, device, dtype, L)
    tokens = sum(query_lens)
    q = _randn(g, tokens, L.q_heads, L.head_dim, dtype=dtype, device=device)
    k, v = (_randn(g, tokens, L.kv_heads, L.head_dim, dtype=dtype, device=device) for _ in range(2))
    positions = [p for n, c in zip(query_lens, cached) for p in range(c, c + n)]
    seqs = [s for s, n in enumerate(query_lens) for _ in range(n)]
    slots = torch.tensor([int(tables[s, p // L.block_size]) * L.block_size + p % L.block_size
                          for s, p in zip(seqs, positions)], device=device)
    store_kv_reference(k, v, k_cache, v_cache, slots)  # attention runs after the front-end stored them
    starts = torch.tensor([0, query_lens[0], tokens], dtype=torch.int32, device=device)
    context_lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    args = (k_cache, v_cache, tables, starts, context_lens, max(query_lens), L.head_dim**-0.5)
    return {
        "a fresh prompt and a chunk over a cached prefix": lambda fn: {"out": fn(q, k, v, *args)},
        "the same, k and v only in the cache (None)": lambda fn: {"out": fn(q, None, None, *args)},
    }


def _bitmask_cases(device: torch.device, dtype: torch.dtype, layout: HeadLayout) -> dict[str, Case]:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 100, generator=g).to(device)  # fp32 whatever the model's dtype, as the sampler has them
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, 4), generator=g, dtype=torch.int64).to(torch.int32).to(device)
    rows = torch.tensor([2, 0], device=device)

    def case(fn: Callable) -> Outputs:
        out = logits.clone()
        fn(out, bitmask, rows)
        return {"logits": out}

    return {"2 of 3 rows masked": case}


CASES: dict[str, Callable[[torch.device, torch.dtype, HeadLayout], dict[str, Case]]] = {
    "attention_frontend": _frontend_cases,
    "decode_attention": _decode_cases,
    "prefill_attention": _prefill_cases,
    "rms_norm": _norm_cases,
    "rope": _rope_cases,
    "store_kv": _store_cases,
    "token_bitmask": _bitmask_cases,
}
REFERENCES: dict[str, Callable] = {
    "attention_frontend": attention_frontend_reference,
    "decode_attention": paged_decode_attention_reference,
    "prefill_attention": paged_prefill_attention_reference,
    "rms_norm": rms_norm_reference,
    "rope": apply_rope_reference,
    "store_kv": store_kv_reference,
    "token_bitmask": apply_token_bitmask_reference,
}
