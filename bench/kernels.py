"""Each Triton kernel vs its torch reference (eager, and torch.compile'd) at Qwen3-8B shapes, on a GPU.

    python -m bench.kernels [--out bench/out/kernels.json] [--dtype bfloat16] [--no-compile]

Qwen3-8B: hidden 4096, 32 query heads over 8 kv heads, head_dim 128. RMSNorm (plain, fused
residual add, per-head q norm), RoPE and store_kv run over 4096 tokens; paged decode attention
over batches 1-256 and contexts 512-32k (block size 16, shuffled block tables), each case that
fits in the GPU's free memory.

Every time is the median of `triton.testing.do_bench`. Bandwidth is the bytes a perfect kernel
must move (read once, write once) over that time, and is given as a share of the copy bandwidth
measured first on the same GPU (a 1 GiB device-to-device copy: bytes read + written per second).
Without CUDA it says so and exits with status 2 (`python -m kernels.report` needs no GPU).
"""

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

import kernels
from bench.timing import memory_bandwidth
from kernels.decode_attention import paged_decode_attention_reference
from kernels.rms_norm import fused_add_rms_norm_reference, rms_norm_reference
from kernels.rope import apply_rope_reference, build_cos_sin_cache
from kernels.store_kv import store_kv_reference

HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM, TOKENS, BLOCK_SIZE = 4096, 32, 8, 128, 4096, 16
BATCHES = (1, 8, 64, 256)
CONTEXTS = (512, 2048, 8192, 32768)
EPS = 1e-6
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Case:
    kernel: str
    shape: str
    bytes: int  # what a perfect kernel reads and writes once
    triton: Callable[[], object]
    reference: Callable[[], object] | None  # None: the reference would not fit in memory


def row_cases(dtype: torch.dtype) -> Iterator[Case]:
    """RMSNorm, fused add + RMSNorm, per-head q norm, RoPE and store_kv over TOKENS tokens."""
    x, residual = _randn(TOKENS, HIDDEN, dtype=dtype), _randn(TOKENS, HIDDEN, dtype=dtype)
    weight, head_weight = _randn(HIDDEN, dtype=dtype), _randn(HEAD_DIM, dtype=dtype)
    size = x.numel() * x.element_size()
    shape = f"{TOKENS}x{HIDDEN}"
    yield Case("rms_norm", shape, 2 * size, lambda: kernels.rms_norm(x, weight, EPS),
               lambda: rms_norm_reference(x, weight, EPS))
    yield Case("fused_add_rms_norm", shape, 4 * size, lambda: kernels.fused_add_rms_norm(x, residual, weight, EPS),
               lambda: fused_add_rms_norm_reference(x, residual, weight, EPS))
    qkv = _randn(TOKENS, (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=dtype)
    q_view = qkv[:, : Q_HEADS * HEAD_DIM].view(TOKENS, Q_HEADS, HEAD_DIM)  # as the model norms it
    q_bytes = q_view.numel() * q_view.element_size()
    yield Case("rms_norm (q heads)", f"{TOKENS}x{Q_HEADS}x{HEAD_DIM}", 2 * q_bytes,
               lambda: kernels.rms_norm(q_view, head_weight, EPS), lambda: rms_norm_reference(q_view, head_weight, EPS))
    q, k = q_view.contiguous(), _randn(TOKENS, KV_HEADS, HEAD_DIM, dtype=dtype)
    positions = torch.randint(0, 40960, (TOKENS,), device="cuda")
    cos_sin = build_cos_sin_cache(40960, HEAD_DIM, 1e6, "cuda")
    kv_bytes = k.numel() * k.element_size()
    yield Case("apply_rope", f"{TOKENS}x({Q_HEADS}+{KV_HEADS})x{HEAD_DIM}", 2 * (q_bytes + kv_bytes) + TOKENS * HEAD_DIM * 4,
               lambda: kernels.apply_rope(q, k, positions, cos_sin), lambda: apply_rope_reference(q, k, positions, cos_sin))
    v = qkv[:, (Q_HEADS + KV_HEADS) * HEAD_DIM :].view(TOKENS, KV_HEADS, HEAD_DIM)  # strided, as the model passes it
    k_cache = torch.empty(2 * TOKENS // BLOCK_SIZE, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype, device="cuda")
    v_cache = torch.empty_like(k_cache)
    slots = torch.randperm(2 * TOKENS, device="cuda")[:TOKENS]
    yield Case("store_kv", f"{TOKENS}x{KV_HEADS}x{HEAD_DIM}", 4 * kv_bytes + TOKENS * 8,
               lambda: kernels.store_kv(k, v, k_cache, v_cache, slots),
               lambda: store_kv_reference(k, v, k_cache, v_cache, slots))


def decode_case(dtype: torch.dtype, batch: int, context: int) -> Case | None:
    """Decode attention for `batch` sequences of `context` tokens; None if the cache does not fit."""
    blocks_per_seq = context // BLOCK_SIZE
    element = torch.tensor([], dtype=dtype).element_size()
    cache_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * element  # K and V
    # The reference gathers every sequence's K and V and upcasts them: about 2.5x the cache again.
    if not _fits(1.1 * cache_bytes):
        return None
    k_cache = _randn(batch * blocks_per_seq, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype)
    v_cache = _randn(batch * blocks_per_seq, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=dtype)
    tables = torch.randperm(batch * blocks_per_seq, device="cuda").view(batch, blocks_per_seq).int()
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = _randn(batch, Q_HEADS, HEAD_DIM, dtype=dtype)
    scale = HEAD_DIM**-0.5
    moved = cache_bytes + 2 * q.numel() * element + tables.numel() * 4
    fits_reference = _fits(2.5 * cache_bytes)
    return Case("paged_decode_attention", f"B={batch} L={context}", moved,
                lambda: kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale),
                (lambda: paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, scale)) if fits_reference else None)


def _fits(nbytes: float) -> bool:
    return nbytes < 0.8 * torch.cuda.mem_get_info()[0]


def _randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device="cuda").to(dtype)


def measure(case: Case, copy_gbps: float, compile_reference: bool) -> list[dict]:
    """One row per implementation: the Triton kernel, the eager reference, the compiled reference."""
    import triton.testing

    impls = {"triton": case.triton}
    if case.reference is not None:
        impls["torch eager"] = case.reference
        if compile_reference:
            torch.compiler.reset()  # a fresh compile per case: dynamo's recompile limit would fall back to eager
            impls["torch.compile"] = torch.compile(case.reference)
    rows = []
    for impl, fn in impls.items():
        try:
            ms = triton.testing.do_bench(fn, return_mode="median")
        except Exception as err:  # torch.compile does not take every reference; say why and go on
            rows.append(dict(kernel=case.kernel, shape=case.shape, impl=impl, error=f"{type(err).__name__}: {err}"[:200]))
            continue
        gbps = case.bytes / ms / 1e6
        rows.append(dict(kernel=case.kernel, shape=case.shape, impl=impl, ms=ms, gbps=gbps,
                         pct_copy=100 * gbps / copy_gbps))
    triton_ms = rows[0].get("ms")
    for row in rows[1:]:
        if triton_ms and "ms" in row:
            row["triton_speedup"] = row["ms"] / triton_ms
    return rows


def format_row(row: dict) -> str:
    head = f"{row['kernel']:<24} {row['shape']:<26} {row['impl']:<14}"
    if "error" in row:
        return f"{head} failed: {row['error']}"
    speedup = f"  triton speedup {row['triton_speedup']:.2f}x" if "triton_speedup" in row else ""
    return f"{head} {row['ms'] * 1e3:>10.1f} us {row['gbps']:>8.0f} GB/s {row['pct_copy']:>5.1f}% of copy{speedup}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out/kernels.json", help="JSON output (default %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="default %(default)s")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the references")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.kernels needs a CUDA GPU: none is visible to torch. (On CPU the kernels run "
              "through the Triton interpreter, which says nothing about speed; `python -m kernels.report` "
              "shows what they compile to for sm_90/sm_80 without a GPU.)", file=sys.stderr)
        return 2
    kernels.set_backend("triton")
    dtype = DTYPES[args.dtype]
    copy_gbps = memory_bandwidth(torch.device("cuda")) / 1e9
    device = torch.cuda.get_device_name()
    print(f"{device}: device-to-device copy {copy_gbps:.0f} GB/s; {args.dtype}; medians of triton.testing.do_bench")
    rows = []
    for case in _cases(dtype):
        if isinstance(case, str):
            print(case, flush=True)
            continue
        for row in measure(case, copy_gbps, not args.no_compile):
            print(format_row(row), flush=True)
            rows.append(row)
        del case  # the decode caches are large: free each before the next is built
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=device, dtype=args.dtype, copy_gbps=copy_gbps, rows=rows), indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def _cases(dtype: torch.dtype) -> Iterator[Case | str]:
    """The cases in order, or for a decode case whose cache does not fit, a line saying so."""
    yield from row_cases(dtype)
    for batch in BATCHES:
        for context in CONTEXTS:
            case = decode_case(dtype, batch, context)
            yield case or f"{'paged_decode_attention':<24} B={batch} L={context}: skipped, the cache does not fit"
            del case


if __name__ == "__main__":
    sys.exit(main())
