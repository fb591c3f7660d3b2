"""Tolerances and inputs shared by the kernel tests.

Tolerances are per dtype. bf16 allows two ulps (2^-6 relative): the interpreter truncates fp32
to bf16 where the GPU and torch round, and a kernel may round twice (normalised value, then
times the weight). fp16 allows two fp16 ulps; fp32 allows summation-order differences.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch

import nanoserve_kernels

TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
DTYPES = list(TOLERANCES)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the default device of every kernel test
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within the dtype's tolerance; a NaN anywhere (an element never written) fails."""
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(actual, expected, **TOLERANCES[expected.dtype])


def randn(*shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Random values bounded away from zero, so that a kernel writing zeros cannot pass."""
    x = torch.randn(*shape) * scale
    return (x + x.sign() * 0.1 * scale).to(dtype)


def nan_like(x: torch.Tensor) -> torch.Tensor:
    return torch.full_like(x, float("nan"), memory_format=torch.contiguous_format)


@contextmanager
def kernel_backend(name: str) -> Iterator[None]:
    """Runs the block on one kernel backend (on CPU, `triton` is the interpreter), then restores it."""
    before = nanoserve_kernels.get_backend()
    nanoserve_kernels.set_backend(name)
    try:
        yield
    finally:
        nanoserve_kernels.set_backend(before)
