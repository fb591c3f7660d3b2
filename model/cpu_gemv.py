"""The project's bf16 matmul for a few rows on x86-64 CPUs with AVX2 and FMA (`cpu_gemv.c`), a candidate of the CPU plan.

On a processor without native bf16 dot products (AVX2-only: most laptops and many cloud VMs),
ATen's bf16 `F.linear` is not limited by memory: on an AVX2-only EPYC it read one row's weights at
~18 GB/s where this kernel streams 22-26 GB/s, and took 4x as long for 8 rows as this kernel does.
The plan times it beside ATen's kernels on the model's own weights and keeps it only where it wins
(`model.cpu_plan`); it computes from the plain weight, so it costs no memory.

The C source is compiled on first use with the system's C compiler (`$CC`, else `cc`, `gcc` or
`clang`) into `$NANOSERVE_CACHE/cpu_gemv/` (default `~/.cache/nanoserve`), named by a hash of the
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

SOURCE = Path(__file__).with_name("cpu_gemv.c")
# Tried in order: with OpenMP, then (a compiler without an OpenMP runtime) on one thread.
FLAG_SETS = (["-O3", "-fopenmp", "-shared", "-fPIC"], ["-O3", "-shared", "-fPIC"])


class GemvUnavailable(RuntimeError):
    """The kernel cannot run here; the message says why."""


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _cache_dir() -> Path:
    return Path(os.environ.get("NANOSERVE_CACHE") or Path.home() / ".cache" / "nanoserve") / "cpu_gemv"


def _build(compiler: str) -> Path:
    """The compiled library for this source and compiler, built now unless an earlier build is cached."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + compiler.encode()).hexdigest()[:16]
    library = _cache_dir() / f"cpu_gemv-{key}.so"
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags in FLAG_SETS:
        # built beside its final name and renamed into it, so that processes building at once never see half a file
        fd, partial = tempfile.mkstemp(dir=library.parent, suffix=".so.partial")
        os.close(fd)
        result = subprocess.run([compiler, *flags, str(SOURCE), "-o", partial], capture_output=True, text=True)
        if result.returncode == 0:
            os.replace(partial, library)
            return library
        os.unlink(partial)
        errors.append((result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1])
    raise GemvUnavailable(f"{Path(compiler).name} could not build {SOURCE.name}: {errors[-1][:200]}")


def _library() -> ctypes.CDLL:
    """The loaded kernel; raises GemvUnavailable (the same each time) when it cannot run here."""
    library, reason = _load()
    if library is None:
        raise GemvUnavailable(reason)
    return library


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """The loaded kernel, or None and why not: found once per process (a failed build is not retried)."""
    try:
        return _open(), ""
    except (GemvUnavailable, OSError) as err:
        return None, str(err)


def _open() -> ctypes.CDLL:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise GemvUnavailable(f"an x86-64 kernel, and this machine is {platform.machine()}")
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        raise GemvUnavailable("ATen runs without AVX2 here (ATEN_CPU_CAPABILITY)")
    compiler = _compiler()
    if compiler is None:
        raise GemvUnavailable("no C compiler ($CC, cc, gcc or clang) to build it")
    library = ctypes.CDLL(str(_build(compiler)))
    if not library.nanoserve_gemv_supported():
        raise GemvUnavailable("the processor lacks AVX2 or FMA")
    library.nanoserve_gemv_bf16.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    library.nanoserve_gemv_bf16.restype = ctypes.c_int
    return library


def unavailable_reason() -> str | None:
    """Why the kernel cannot run here, or None when it can."""
    library, reason = _load()
    return None if library is not None else reason


def gemv_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for bf16 `x` [rows, in] and `weight` [out, in], accumulated in fp32, in bf16."""
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.dim() != 2 or weight.dim() != 2:
        raise GemvUnavailable(f"bf16 matrices only, not {x.dtype} {tuple(x.shape)} by {weight.dtype} {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"shapes {tuple(x.shape)} and {tuple(weight.shape)} cannot be multiplied")
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.bfloat16)
    status = _library().nanoserve_gemv_bf16(weight.data_ptr(), x.data_ptr(), out.data_ptr(), x.shape[0],
                                            weight.shape[0], weight.shape[1], torch.get_num_threads())
    if status != 0:
        raise GemvUnavailable("the processor lacks AVX2 or FMA" if status == 1 else "no memory for its scratch rows")
    return out
