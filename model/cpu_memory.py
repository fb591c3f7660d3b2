"""Memory a CPU step frees stays with the process: glibc malloc's two thresholds, raised at load.

A decode step on CPU allocates and frees tens of tensors of 0.1-2 MB per layer (decode attention's
gathered K/V and transposed keys, the MLP's activations, the logits). glibc's malloc serves a block
above its mmap threshold with a fresh mapping and unmaps it on free, and hands the top of its heap
(or of a thread's arena) back to the kernel once more than the trim threshold is free there. Either
way the next step's tensors land on fresh pages, and the first touch of every 4 KiB page is a fault
that the kernel serves by zeroing it. On a 2-core AMD EPYC (AVX-512), bf16, 28 layers of decode
attention over 512 cached tokens took 31-38 ms a step with glibc's defaults and 5.6-6.4 ms with both
thresholds raised (medians of 30); a whole batch-1 decode step of the Qwen3-0.6B shape, 67 against
50 ms (`bench/RESULTS.md`).

This is not timed at load as the CPU plan's op choices are: raising a threshold cannot be undone
(glibc stops adapting one set by hand, so "as before" cannot be restored after trying), and page
faults only ever add time. What it costs is memory: what a step freed stays in the process, so its
resident size no longer shrinks after a long prompt (by at most one step's activations plus 1 GiB
of free heap). So it is applied when glibc is the C library, the environment sets none of glibc's
malloc variables (they are the way to keep glibc's behaviour, e.g. `MALLOC_TRIM_THRESHOLD_=131072`),
and at least MIN_AVAILABLE of memory is available; the CPU plan's startup line says which
(`freed memory kept` / `returned (why)`).
"""

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
KEPT = {M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 2**30}
MIN_AVAILABLE = 4 * 2**30  # memory available at load below which freed memory goes back
GLIBC_MALLOC_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


@functools.cache
def _mallopt() -> ctypes._CFuncPtr | None:
    """glibc's mallopt, or None on another C library (musl has a stub, macOS none)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt


def available() -> bool:
    return _mallopt() is not None


def _set(values: dict[int, int]) -> None:
    mallopt = _mallopt()
    for parameter, value in values.items():
        if mallopt(parameter, value) != 1:
            raise OSError(f"mallopt({parameter}, {value}) refused")


_kept = False


def kept() -> bool:
    """Whether `keep_freed_memory` is in force (an earlier model's plan may have set it)."""
    return _kept


def keep_freed_memory() -> None:
    """Freed blocks up to 32 MiB stay in malloc's heap, and up to 1 GiB of free heap stays mapped."""
    global _kept
    _set(KEPT)
    _kept = True


def keep_freed_memory_if_possible(available_bytes: int) -> str:
    """Keep freed memory in the process where glibc, the environment and `available_bytes` allow;
    returns what the startup line says."""
    if _kept:
        return "kept"
    if not available():
        return "returned (the C library is not glibc)"
    environment = [name for name in GLIBC_MALLOC_VARIABLES if name in os.environ]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        environment.append("GLIBC_TUNABLES")
    if environment:
        return f"returned as {', '.join(environment)} set{'s' if len(environment) == 1 else ''} it"
    if available_bytes < MIN_AVAILABLE:
        return (f"returned (only {available_bytes / 2**30:.1f} GiB available, under "
                f"{MIN_AVAILABLE / 2**30:.0f} GiB)")
    keep_freed_memory()
    return "kept"
