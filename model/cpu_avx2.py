"""The project's CPU kernels for x86-64 with AVX2 and FMA (`cpu_avx2.c`), candidates of the CPU plan.

- `gemv_linear`: bf16 (or fp32) weights times a few rows of the same dtype. On a processor without
  native bf16 dot products (AVX2-only: most laptops and many cloud VMs), ATen's bf16 `F.linear` is
  not limited by memory: on an AVX2-only EPYC it read one row's weights at ~18 GB/s where this
  kernel streams 22-26 GB/s, and took 4x as long for 8 rows as this kernel does. It computes from
  the plain weight, so it costs no memory.
- `int8_linear`: int8 weights with a scale per row (`--quantization int8`, `model.quant`) times
  bf16 or fp32 rows, weight-only (the activations are not rounded): ATen's weight-only int8 kernel
  is vectorised for AVX-512 only.
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
FLAG_SETS = (["-O3", "-fopenmp", "-shared", "-fPIC"], ["-O3", "-shared", "-fPIC"])


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
    return library


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here, or None when it can."""
    library, reason = _load()
    return None if library is not None else reason


# The weight element types of `nanoserve_linear` (cpu_avx2.c).
WEIGHT_KINDS = {torch.bfloat16: 0, torch.float32: 1, torch.int8: 2}


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
    if weight.dtype != torch.int8 or x.dtype not in (torch.bfloat16, torch.float32) or scale.shape != weight.shape[:1]:
        raise Avx2Unavailable(f"int8 weights with a scale per row times bf16 or fp32 rows only, not {x.dtype} "
                              f"{tuple(x.shape)} by {weight.dtype} {tuple(weight.shape)} (scales {tuple(scale.shape)})")
    return _linear(x, weight, scale.to(torch.float32).contiguous())


def _linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"shapes {tuple(x.shape)} and {tuple(weight.shape)} cannot be multiplied")
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype)
    _check(_library().nanoserve_linear(
        weight.data_ptr(), WEIGHT_KINDS[weight.dtype], None if scale is None else scale.data_ptr(), x.data_ptr(),
        out.data_ptr(), x.dtype == torch.bfloat16, x.shape[0], weight.shape[0], weight.shape[1],
        torch.get_num_threads()))
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
