"""What the kernel modules share: the optional triton import and the `Launch` record.

triton is a Linux-only dependency. Without it `jit` leaves the kernel functions as plain
(never called) Python functions and `nanoserve_kernels.backend.use_triton` is always False, so the torch
references serve every op.

A launcher builds a `Launch` (kernel, grid, every argument by name, launch options) before running
it, so that `nanoserve_kernels.aot` can compile exactly what the launcher would launch, with no GPU.
"""

import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = SimpleNamespace(constexpr=None)  # what the kernels' annotations read at definition time

# Per kernel name: (integer arguments not specialised on their value, pointer arguments not
# specialised on their alignment). See `jit`.
NOT_SPECIALISED: dict[str, tuple[frozenset[str], frozenset[str]]] = {}


def jit(fn=None, *, do_not_specialize: tuple[str, ...] = (), do_not_specialize_on_alignment: tuple[str, ...] = ()):
    """@triton.jit, recording what it leaves unspecialised (the interpreter keeps no such record).

    Triton compiles a variant per value class of every integer argument (equal to 1, divisible
    by 16, other) and per 16-byte alignment of every pointer. An argument that changes between
    steps (a row count, a block table's width, a split count, a view at an offset) would then
    compile new variants mid-serve, seconds each: those go in `do_not_specialize` and
    `do_not_specialize_on_alignment`. Strides fixed by the model (the cache's) stay specialised:
    their divisibility is what lets the compiler emit 128-bit loads.
    """
    def wrap(fn):
        NOT_SPECIALISED[fn.__name__] = (frozenset(do_not_specialize), frozenset(do_not_specialize_on_alignment))
        if triton is None:
            return fn
        return triton.jit(fn, do_not_specialize=do_not_specialize,
                          do_not_specialize_on_alignment=do_not_specialize_on_alignment)
    return wrap if fn is None else wrap(fn)


HAVE_TRITON = triton is not None


@dataclass
class Launch:
    kernel: Any  # a @triton.jit function
    grid: tuple[int, ...]
    args: dict[str, Any]  # every kernel parameter by name, constexprs included
    num_warps: int = 4
    num_stages: int = 3

    def __call__(self) -> None:
        if 0 in self.grid:  # nothing to do (an empty batch); CUDA rejects an empty grid
            return
        self.kernel[self.grid](**self.args, num_warps=self.num_warps, num_stages=self.num_stages)


def variant_key(launch: Launch) -> tuple:
    """What @triton.jit compiles a variant per, for this launch: every constexpr's value, every
    pointer's dtype (and 16-byte alignment), every integer's class (1, divisible by 16, other;
    32 or 64 bits), less what the kernel leaves unspecialised; and the launch options."""
    fn = getattr(launch.kernel, "fn", launch.kernel)
    name = fn.__name__
    by_value, by_alignment = NOT_SPECIALISED.get(name, (frozenset(), frozenset()))
    constexprs = {param for param, annotation in fn.__annotations__.items() if "constexpr" in str(annotation)}
    key: list = [name, launch.num_warps, launch.num_stages]
    for param, value in launch.args.items():
        if param in constexprs:
            key.append(value)
        elif hasattr(value, "data_ptr"):
            key.append((str(value.dtype), None if param in by_alignment else value.data_ptr() % 16 == 0))
        elif isinstance(value, bool) or not isinstance(value, int):
            key.append(type(value).__name__)
        else:
            bits = 32 if -(2**31) <= value < 2**31 else 64
            key.append((bits, None) if param in by_value else (bits, 1 if value == 1 else value % 16 == 0))
    return tuple(key)


def interpreting() -> bool:
    """True when @triton.jit builds interpreter functions (CPU tensors, TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(a // -b)
