"""RMSNorm, plain and fused with the residual add, with HF Qwen3 numerics.

Statistics in fp32, normalised values cast back to the input dtype, then multiplied by the
weight (in the weight's dtype), exactly as `Qwen3RMSNorm` does it. The fused variant adds the
residual in the input dtype first (as HF's decoder layer does) and returns both results.

The kernel sees its input as rows of H elements indexed `[outer, inner]` with one stride each,
so Qwen3's q/k norm runs on the `[T, heads, D]` view of the fused QKV output without a copy.
A program normalises ROWS rows at once: one for wide hidden-size rows, up to 16 for the
128-wide head rows, so every program moves a few thousand elements.
"""

import torch
import torch.nn.functional as F

from kernels._triton import Launch, jit, next_power_of_2, tl
from kernels.backend import use_triton

ELEMENTS_PER_PROGRAM = 2048  # enough per program to hide latency, small enough to stay in registers


@jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, out_ptr, residual_out_ptr, weight_ptr,
    num_rows, inner_rows, x_stride_outer, x_stride_inner, res_stride_outer, res_stride_inner, eps,
    H: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < num_rows)[:, None] & (cols < H)[None, :]
    rows = rows.to(tl.int64)  # row * stride overflows int32 on long prompts
    outer, inner = rows // inner_rows, rows % inner_rows
    x_rows = outer * x_stride_outer + inner * x_stride_inner
    x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out_offsets = rows[:, None] * H + cols[None, :]
    if ADD_RESIDUAL:
        res_rows = outer * res_stride_outer + inner * res_stride_inner
        residual = tl.load(residual_ptr + res_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # HF adds in the input dtype, and the norm sees that rounded sum.
        x = (x + residual).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + out_offsets, x, mask=mask)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)
    normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offsets, normed * weight[None, :], mask=mask)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [outer, inner, H] with unit stride along H, without a copy where the layout allows.

    Leading dimensions that flatten give inner = 1 (the kernel then divides by a constant 1);
    the [T, heads, D] view of a fused QKV output keeps its two strides.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, 1, x.shape[-1])
    except RuntimeError:  # leading dimensions do not flatten without a copy
        return x.reshape(-1, x.shape[-2], x.shape[-1])


def rms_norm_launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
    out: torch.Tensor, residual_out: torch.Tensor | None,
) -> Launch:
    """The launch that writes rms_norm(x [+ residual]) to `out` (and the sum to `residual_out`).

    `out` and `residual_out` are contiguous tensors of x's shape; `residual` has x's shape.
    """
    hidden = x.shape[-1]
    rows = _as_rows(x)
    res_rows = _as_rows(residual) if residual is not None else rows
    block_h = next_power_of_2(hidden)
    rows_per_program = max(1, min(16, ELEMENTS_PER_PROGRAM // block_h))
    num_rows = rows.shape[0] * rows.shape[1]
    args = dict(
        x_ptr=rows, residual_ptr=res_rows, out_ptr=out,
        residual_out_ptr=residual_out if residual_out is not None else out, weight_ptr=weight,
        num_rows=num_rows, inner_rows=rows.shape[1],
        x_stride_outer=rows.stride(0), x_stride_inner=rows.stride(1),
        res_stride_outer=res_rows.stride(0), res_stride_inner=res_rows.stride(1), eps=eps,
        H=hidden, BLOCK_H=block_h, ROWS=rows_per_program, ADD_RESIDUAL=residual is not None,
    )
    num_warps = min(16, max(4, block_h * rows_per_program // 512))  # 16 bf16 (two 128-bit loads) per thread
    return Launch(_rms_norm_kernel, (-(num_rows // -rows_per_program),), args, num_warps=num_warps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # torch's fused rms_norm on the fp32 upcast: one op where the spelled-out formula takes five,
    # which is most of this op's cost on CPU at decode sizes.
    normed = F.rms_norm(x.float(), x.shape[-1:], eps=eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual_out = x + residual
    return rms_norm_reference(residual_out, weight, eps), residual_out


def _out_like(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of `x` ([..., H]); returns a new tensor."""
    if not use_triton(x, "rms_norm"):
        return rms_norm_reference(x, weight, eps)
    out = _out_like(x, weight)
    rms_norm_launch(x, None, weight, eps, out, None)()
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    if not use_triton(x, "rms_norm"):
        return fused_add_rms_norm_reference(x, residual, weight, eps)
    out, residual_out = _out_like(x, weight), torch.empty_like(x, memory_format=torch.contiguous_format)
    rms_norm_launch(x, residual, weight, eps, out, residual_out)()
    return out, residual_out
