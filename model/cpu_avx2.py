"""The project's CPU kernels for x86-64 with AVX2 and FMA (`cpu_avx2.c`), candidates of the CPU plan.

- `gemv_linear`: bf16 (or fp32) weights times a few rows of the same dtype. On a processor without
  native bf16 dot products (AVX2-only: most laptops and many cloud VMs), ATen's bf16 `F.linear` is
  not limited by memory: on an AVX2-only EPYC it read one row's weights at ~18 GB/s where this
  kernel streams 22-26 GB/s, and took 4x as long for 8 rows as this kernel does. It computes from
  the plain weight, so it costs no memory.
- `int8_linear`: int8 weights with a scale per row (`--quantization int8`, `model.quant`) times
  bf16 or fp32 rows, weight-only (the activations are not rounded): ATen's weight-only int8 kernel
  is vectorised for AVX-512 only.
- `int8_dot_linear`: the same weights times rows rounded to int8 at their own scale, summed in
  integers (maddubs/madd): a third of the instructions per weight of widening each to fp32, so one
  row runs at the memory's speed.
- `add_rms_norm` and `attention_front`: a layer's small ops (RMSNorm with the residual add; the
  q/k head norms, rotation and cache write before attention), one C pass each in the torch
  references' arithmetic, where ATen runs 5 and about 15 ops, each a dispatch and a wake-up of its
  thread pool (26 ms of a 120 ms bf16 batch-1 step on an AVX2-only EPYC).
- `decode_attention`: one query token per sequence over the paged KV cache (bf16 or fp32), read in
  place from its blocks; ATen's candidates gather the blocks into new tensors and run a handful of
  small ops per layer.
The plan times them beside ATen's candidates on the model's own shapes and keeps them only where
they win (`model.cpu_plan`).

The C source is compiled on first use with the system's C compiler (`$CC`, else `cc`, `gcc` or
`clang`) into `$NANOSERVE_CACHE/cpu_avx2/` (default `~/.cache/nanoserve`), named by a hash of the
source and the compiler, and loaded with ctypes. It runs on OpenMP threads, as many as torch's
intra-op pool; linked against libgomp it shares torch's OpenMP runtime when torch brings one.

It is unavailable, and then named in the plan's skipped candidates, when the machine is not
x86-64, no compiler builds it, the processor lacks AVX2 or FMA (the library asks the processor
before running an AVX2 instruction), or ATen was told to run below AVX2
(`ATEN_CPU_CAPABILITY=default`, how the tests emulate an older processor).
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from model.demo import cache_dir

SOURCE = Path(__file__).with_name("cpu_avx2.c")
# Tried in order: with OpenMP, then (a compiler without an OpenMP runtime) on one thread.
# -ffp-contract=off: the small ops round each product as the torch references do (no FMA merges them).
FLAG_SETS = (["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"], ["-O3", "-ffp-contract=off", "-shared", "-fPIC"])


class Avx2Unavailable(RuntimeError):
    """The kernel cannot run here; the message says why."""


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _build(compiler: str) -> Path:
    """The compiled library for this source and compiler, built now unless an earlier build is cached."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + compiler.encode()).hexdigest()[:16]
    library = cache_dir() / "cpu_avx2" / f"cpu_avx2-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in FLAG_SETS:
        # built beside its final name and renamed into it, so that processes building at once never see half a file
        fd, partial = tempfile.mkstemp(dir=library.parent, suffix=".so.partial")
        os.close(fd)
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", partial, "-lm"], capture_output=True, text=True)
        if result.returncode == 0:
            os.replace(partial, library)
            return library
        os.unlink(partial)
        errors.append((result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1])
    raise Avx2Unavailable(f"{Path(compiler).name} could not build {SOURCE.name}: {errors[-1][:200]}")


def _library() -> ctypes.CDLL:
    """The loaded kernel; raises Avx2Unavailable (the same each time) when it cannot run here."""
    library, reason = _load()
    if library is None:
        raise Avx2Unavailable(reason)
    return library


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The loaded kernel, or None and why not: found once per process (a failed build is not retried)."""
    try:
        return _open(), ""
    except (Avx2Unavailable, OSError) as err:
        return None, str(err)


def _open() -> ctypes.CDLL:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise Avx2Unavailable(f"an x86-64 kernel, and this machine is {platform.machine()}")
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        raise Avx2Unavailable("ATen runs without AVX2 here (ATEN_CPU_CAPABILITY)")
    compiler = _compiler()
    if compiler is None:
        raise Avx2Unavailable("no C compiler ($CC, cc, gcc or clang) to build it")
    library = ctypes.CDLL(str(_build(compiler)))
    if not library.nanoserve_avx2_supported():
        raise Avx2Unavailable("the processor lacks AVX2 or FMA")
    library.nanoserve_linear.argtypes = ([ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_int]
                                         + [ctypes.c_int64] * 3 + [ctypes.c_int])
    library.nanoserve_linear.restype = ctypes.c_int
    library.nanoserve_decode_attention.argtypes = ([ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6
                                                   + [ctypes.c_float, ctypes.c_int, ctypes.c_int])
    library.nanoserve_decode_attention.restype = ctypes.c_int
    library.nanoserve_add_rms_norm.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2 + [ctypes.c_float] + [ctypes.c_int] * 2
    library.nanoserve_add_rms_norm.restype = ctypes.c_int
    library.nanoserve_attention_front.argtypes = ([ctypes.c_void_p] * 3 + [ctypes.c_float] + [ctypes.c_void_p] * 7
                                                  + [ctypes.c_int64] * 6 + [ctypes.c_int] * 2)
    library.nanoserve_attention_front.restype = ctypes.c_int
    return library


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here, or None when it can."""
    library, reason = _load()
    return None if library is not None else reason


# The weight element types of `nanoserve_linear` (cpu_avx2.c).
WEIGHT_KINDS = {torch.bfloat16: 0, torch.float32: 1, torch.int8: 2}
INT8_DOT_KIND = 3  # int8 weights, the activations rounded to int8 too


def gemv_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for `x` [rows, in] and `weight` [out, in] both bf16 or both fp32, accumulated
    in fp32, in `x`'s dtype."""
    if x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float32):
        raise Avx2Unavailable(f"bf16 or fp32 matrices of one dtype only, not {x.dtype} {tuple(x.shape)} "
                              f"by {weight.dtype} {tuple(weight.shape)}")
    return _linear(x, weight, None)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x @ (weight * scale[:, None]).T` for int8 `weight` [out, in] and its rows' scales [out], and
    bf16 or fp32 `x` [rows, in]: fp32 arithmetic, the result in `x`'s dtype."""
    return _linear(x, weight, _int8_scale(x, weight, scale))


def int8_dot_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """As `int8_linear`, with each row of `x` first rounded to int8 at its own absmax / 127: the
    products summed exactly in int32, then scaled by the row's and the weight row's scales."""
    return _linear(x, weight, _int8_scale(x, weight, scale), INT8_DOT_KIND)


def _int8_scale(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The scales as the kernel takes them (fp32, contiguous); raises unless the operands are int8 weights with a
    scale per row and bf16 or fp32 rows."""
    if weight.dtype != torch.int8 or x.dtype not in (torch.bfloat16, torch.float32) or scale.shape != weight.shape[:1]:
        raise Avx2Unavailable(f"int8 weights with a scale per row times bf16 or fp32 rows only, not {x.dtype} "
                              f"{tuple(x.shape)} by {weight.dtype} {tuple(weight.shape)} (scales {tuple(scale.shape)})")
    return scale.to(torch.float32).contiguous()


def _linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, kind: int | None = None) -> torch.Tensor:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"shapes {tuple(x.shape)} and {tuple(weight.shape)} cannot be multiplied")
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    _check(_library().nanoserve_linear(
        weight.data_ptr(), WEIGHT_KINDS[weight.dtype] if kind is None else kind,
        None if scale is None else scale.data_ptr(), x.data_ptr(), out.data_ptr(), x.dtype == torch.bfloat16,
        x.shape[0], weight.shape[0], weight.shape[1], torch.get_num_threads()))
    return out


def _check(status: int) -> None:
    if status != 0:
        raise Avx2Unavailable("the processor lacks AVX2 or FMA" if status == 1 else "no memory for its scratch rows")


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention of `q` [B, H, D] over the paged caches [blocks, block_size, Hk, D] (the
    contract of `nanoserve_kernels.decode_attention`), read in place; bf16 or fp32, fp32 arithmetic."""
    batch, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if q.dtype not in (torch.bfloat16, torch.float32) or not q.dtype == k_cache.dtype == v_cache.dtype:
        raise Avx2Unavailable(f"bf16 or fp32 only, not q {q.dtype} with caches {k_cache.dtype}")
    if dim % 8 or heads % kv_heads or q.device.type != "cpu":
        raise Avx2Unavailable(f"head_dim a multiple of 8 and whole query groups on the CPU, not {tuple(q.shape)} "
                              f"over {kv_heads} kv heads")
    q, k_cache, v_cache = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty_like(q)
    _check(_library().nanoserve_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
        batch, heads, kv_heads, dim, block_size, tables.shape[1], scale, q.dtype == torch.bfloat16,
        torch.get_num_threads()))
    return out


def _small_ops_dtype(*tensors: torch.Tensor) -> bool:
    """Whether the small ops' tensors are bf16 (else fp32); raises unless they share one of the two."""
    dtype = tensors[0].dtype
    if (dtype is not torch.bfloat16 and dtype is not torch.float32) or any(t.dtype is not dtype for t in tensors):
        raise Avx2Unavailable(f"bf16 or fp32 tensors of one dtype only, not {sorted({str(t.dtype) for t in tensors})}")
    return dtype == torch.bfloat16


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * rms_norm(s), s) with s = x + residual, or x when `residual` is None, over the last
    dimension of `x` [..., H]; as `nanoserve_kernels.fused_add_rms_norm` (and `rms_norm`) compute them."""
    bf16 = _small_ops_dtype(x, weight, *([] if residual is None else [residual]))
    if x.shape[-1] % 8:
        raise Avx2Unavailable(f"a last dimension that is a multiple of 8 only, not {tuple(x.shape)}")
    if weight.shape != x.shape[-1:] or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"RMSNorm of {tuple(x.shape)} with a weight {tuple(weight.shape)}"
                         + ("" if residual is None else f" and a residual {tuple(residual.shape)}"))
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    summed = x if residual is None else torch.empty_like(x)
    _check(_library().nanoserve_add_rms_norm(
        x.data_ptr(), None if residual is None else residual.contiguous().data_ptr(), weight.data_ptr(),
        out.data_ptr(), summed.data_ptr(), x.numel() // max(x.shape[-1], 1), x.shape[-1], eps, bf16,
        torch.get_num_threads()))
    return out, summed


def attention_front(qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, eps: float,
                    positions: torch.Tensor, cos_sin_cache: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The contract of `nanoserve_kernels.attention_frontend` on CPU tensors: (q [T, Hq, D], k [T, Hk, D],
    v [T, Hk, D]) with k and v as stored in the caches at `slot_mapping` (negative slots skipped)."""
    tokens, (kv_heads, head_dim) = qkv.shape[0], k_cache.shape[2:]
    bf16 = _small_ops_dtype(qkv, q_norm_weight, k_norm_weight, k_cache, v_cache)
    q_heads = qkv.shape[1] // head_dim - 2 * kv_heads
    if (qkv.dim() != 2 or qkv.device.type != "cpu" or q_heads <= 0 or qkv.shape[1] != (q_heads + 2 * kv_heads) * head_dim or head_dim % 16
            or cos_sin_cache.dtype != torch.float32 or cos_sin_cache.shape[-1] != head_dim
            or not k_cache.is_contiguous() or not v_cache.is_contiguous()):
        raise Avx2Unavailable(f"CPU qkv {tuple(qkv.shape)} over contiguous caches {tuple(k_cache.shape)} (head_dim a multiple "
                              f"of 16) with an fp32 cos/sin cache of head_dim columns only")
    qkv, cos_sin = qkv.contiguous(), cos_sin_cache.contiguous()
    positions = (positions if positions.dtype == torch.int64 else positions.to(torch.int64)).contiguous()
    slots = (slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.to(torch.int64)).contiguous()
    q = torch.empty(tokens, q_heads, head_dim, dtype=qkv.dtype)
    k = torch.empty(tokens, kv_heads, head_dim, dtype=qkv.dtype)
    status = _library().nanoserve_attention_front(
        qkv.data_ptr(), q_norm_weight.contiguous().data_ptr(), k_norm_weight.contiguous().data_ptr(), eps,
        positions.data_ptr(), cos_sin.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(),
        q.data_ptr(), k.data_ptr(), tokens, q_heads, kv_heads, head_dim, cos_sin.shape[0],
        k_cache.shape[0] * k_cache.shape[1], bf16, torch.get_num_threads())
    if status == 4:
        raise IndexError(f"a position outside the cos/sin cache's {cos_sin.shape[0]} rows or a slot past the KV "
                         f"cache's {k_cache.shape[0] * k_cache.shape[1]}")
    _check(status)
    return q, k, qkv[:, (q_heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
