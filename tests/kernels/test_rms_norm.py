"""The Triton RMSNorm kernels against their torch references (through the interpreter on CPU)."""

import pytest
import torch

import nanoserve_kernels
from nanoserve_kernels.rms_norm import fused_add_rms_norm_reference, rms_norm_launch, rms_norm_reference
from tests.kernels.common import DTYPE_IDS, DTYPES, assert_close, nan_like, randn

EPS = 1e-6


def _qkv_view(tokens: int, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The q part of a fused QKV output, [T, Hq, D], as the model norms it (rows strided)."""
    qkv = randn(tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, scale=3)
    return qkv[:, : q_heads * head_dim].view(tokens, q_heads, head_dim)


# (name, x maker): one row; odd token counts; H not a power of two; Qwen3-32B's 5120;
# per-head rows (contiguous, strided out of QKV, 4-d); several rows per program and a partial last one.
INPUTS = {
    "1x96": lambda dt: randn(1, 96, dtype=dt, scale=3),
    "37x1024": lambda dt: randn(37, 1024, dtype=dt, scale=3),
    "3x5120": lambda dt: randn(3, 5120, dtype=dt, scale=3),
    "13x5x128": lambda dt: randn(13, 5, 128, dtype=dt, scale=3),
    "qkv-view-9x6x64": lambda dt: _qkv_view(9, 6, 2, 64, dt),
    "2x3x7x48": lambda dt: randn(2, 3, 7, 48, dtype=dt, scale=3),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(INPUTS))
def test_rms_norm_matches_reference(name, dtype):
    x = INPUTS[name](dtype)
    weight = randn(x.shape[-1], dtype=dtype)
    out = nan_like(x)
    rms_norm_launch(x, None, weight, EPS, out, None)()
    assert_close(out, rms_norm_reference(x, weight, EPS))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", ["1x96", "37x1024", "3x5120", "13x5x128"])
def test_fused_add_rms_norm_matches_reference(name, dtype):
    x = INPUTS[name](dtype)
    residual = randn(*x.shape, dtype=dtype, scale=3)
    weight = randn(x.shape[-1], dtype=dtype)
    out, residual_out = nan_like(x), nan_like(x)
    rms_norm_launch(x, residual, weight, EPS, out, residual_out)()
    assert_close(residual_out, fused_add_rms_norm_reference(x, residual, weight, EPS)[1])
    # The norm of the sum the kernel wrote: in bf16 the interpreter's truncated sum would
    # otherwise stack a third rounding on the two the tolerance allows.
    assert_close(out, rms_norm_reference(residual_out, weight, EPS))


def test_public_functions_dispatch_to_the_kernel(triton_backend):
    x, residual = randn(5, 3, 64, dtype=torch.bfloat16), randn(5, 3, 64, dtype=torch.bfloat16)
    weight = randn(64, dtype=torch.bfloat16)
    assert_close(nanoserve_kernels.rms_norm(x, weight, EPS), rms_norm_reference(x, weight, EPS))
    out, residual_out = nanoserve_kernels.fused_add_rms_norm(x, residual, weight, EPS)
    assert_close(residual_out, fused_add_rms_norm_reference(x, residual, weight, EPS)[1])
    assert_close(out, rms_norm_reference(residual_out, weight, EPS))


def test_cpu_tensors_use_the_reference_by_default():
    x, weight = randn(4, 32, dtype=torch.float32).cpu(), randn(32, dtype=torch.float32).cpu()
    assert nanoserve_kernels.get_backend() == "auto"
    assert torch.equal(nanoserve_kernels.rms_norm(x, weight, EPS), rms_norm_reference(x, weight, EPS))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rms_norm_at_qwen3_8b_shapes(dtype):
    for x in (randn(257, 4096, dtype=dtype, scale=3), _qkv_view(257, 32, 8, 128, dtype)):
        weight = randn(x.shape[-1], dtype=dtype)
        out = nan_like(x)
        rms_norm_launch(x, None, weight, EPS, out, None)()
        assert_close(out, rms_norm_reference(x, weight, EPS))


@pytest.mark.parametrize("rows_per_program,num_warps", [(2, 1), (4, 8)])
def test_rms_norm_in_other_launch_configurations(rows_per_program, num_warps):
    """The configurations `bench.kernels --sweep` times: several rows per program, a partial last
    program, any warp count."""
    for x in (INPUTS["37x1024"](torch.bfloat16), INPUTS["qkv-view-9x6x64"](torch.bfloat16)):
        weight, residual = randn(x.shape[-1], dtype=torch.bfloat16), randn(*x.shape, dtype=torch.bfloat16)
        out, residual_out = nan_like(x), nan_like(x)
        rms_norm_launch(x, residual, weight, EPS, out, residual_out, rows_per_program, num_warps)()
        assert_close(residual_out, fused_add_rms_norm_reference(x, residual, weight, EPS)[1])
        assert_close(out, rms_norm_reference(residual_out, weight, EPS))
