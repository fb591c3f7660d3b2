"""What the kernel modules share: the optional triton import and the `Launch` record.

triton is a Linux-only dependency. Without it `jit` leaves the kernel functions as plain
(never called) Python functions and `kernels.backend.use_triton` is always False, so the torch
references serve every op.

A launcher builds a `Launch` (kernel, grid, every argument by name, launch options) before running
it, so that `kernels.aot` can compile exactly what the launcher would launch, with no GPU.
"""

import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:
    triton = None
    tl = SimpleNamespace(constexpr=None)  # what the kernels' annotations read at definition time

    def jit(fn):
        return fn


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


def interpreting() -> bool:
    """True when @triton.jit builds interpreter functions (CPU tensors, TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(a // -b)
