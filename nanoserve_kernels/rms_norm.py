"""RMSNorm, plain and fused with the residual add, with HF Qwen3 numerics.

Statistics in fp32, normalised values cast back to the input dtype, then multiplied by the
weight (in the weight's dtype), exactly as `Qwen3RMSNorm` does it. The fused variant adds the
residual in the input dtype first (as HF's decoder layer does) and returns both results.

The kernel sees its input as rows of H elements indexed `[outer, inner]` with one stride each,
so Qwen3's q/k norm runs on the `[T, heads, D]` view of the fused QKV output without a copy.

Launch heuristic (first principles; the numbers are still to be measured on a GPU with
`python -m bench.kernels --sweep`, which times the candidates and prints the winner): a program
normalises ROWS rows, ELEMENTS_PER_PROGRAM elements in all (one 4096-wide hidden row, 16
128-wide head rows), with one warp per 512 elements, so each thread holds 16 16-bit values:
two 128-bit loads per tensor, and 8 KB per program in flight to cover DRAM latency.
"""

import torch
import torch.nn.functional as F

from nanoserve_kernels._triton import Launch, jit, next_power_of_2, tl
from nanoserve_kernels.backend import use_triton

ELEMENTS_PER_PROGRAM = 2048  # enough per program to hide latency, small enough to stay in registers


@jit(do_not_specialize=("num_rows",))  # the step's token count
def _rms_norm_kernel(
    x_ptr, residual_ptr, out_ptr, residual_out_ptr, weight_ptr,
    num_rows, x_stride_outer, x_stride_inner, res_stride_outer, res_stride_inner, eps,
    H: tl.constexpr, BLOCK_H: tl.constexpr, ROWS: tl.constexpr, INNER_ROWS: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_H)
    # The weight first: its load then overlaps the row's instead of waiting for the reduction.
    weight = tl.load(weight_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    mask = (rows < num_rows)[:, None] & (cols < H)[None, :]
    # Row indices fit in int32, and dividing by a constant is a multiply; offsets need int64.
    outer, inner = (rows // INNER_ROWS).to(tl.int64), (rows % INNER_ROWS).to(tl.int64)
    x_rows = outer * x_stride_outer + inner * x_stride_inner
    x = tl.load(x_ptr + x_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out_offsets = rows.to(tl.int64)[:, None] * H + cols[None, :]
    if ADD_RESIDUAL:
        res_rows = outer * res_stride_outer + inner * res_stride_inner
        residual = tl.load(residual_ptr + res_rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # HF adds in the input dtype, and the norm sees that rounded sum.
        x = (x + residual).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + out_offsets, x, mask=mask)
        x = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / H + eps)
    normed = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + out_offsets, normed * weight[None, :], mask=mask)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """x as [outer, inner, H] with unit stride along H, without a copy where the layout allows.

    Leading dimensions that flatten give inner = 1; the [T, heads, D] view of a fused QKV output
    keeps its two strides.
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
    rows_per_program: int | None = None, num_warps: int | None = None,
) -> Launch:
    """The launch that writes rms_norm(x [+ residual]) to `out` (and the sum to `residual_out`).

    `out` and `residual_out` are contiguous tensors of x's shape; `residual` has x's shape, any layout.
    `rows_per_program` and `num_warps` override the heuristic (the sweep times candidates).
    """
    hidden = x.shape[-1]
    rows = _as_rows(x)
    res_rows = rows
    if residual is not None:  # indexed like x's rows, whatever its own layout
        res_rows = (residual if residual.stride(-1) == 1 else residual.contiguous()).reshape(rows.shape)
    block_h = next_power_of_2(hidden)
    rows_per_program = rows_per_program or max(1, min(16, ELEMENTS_PER_PROGRAM // block_h))
    num_warps = num_warps or min(16, max(4, block_h * rows_per_program // 512))
    num_rows = rows.shape[0] * rows.shape[1]
    args = dict(
        x_ptr=rows, residual_ptr=res_rows, out_ptr=out,
        residual_out_ptr=residual_out if residual_out is not None else out, weight_ptr=weight,
        num_rows=num_rows, x_stride_outer=rows.stride(0), x_stride_inner=rows.stride(1),
        res_stride_outer=res_rows.stride(0), res_stride_inner=res_rows.stride(1), eps=eps,
        H=hidden, BLOCK_H=block_h, ROWS=rows_per_program, INNER_ROWS=rows.shape[1], ADD_RESIDUAL=residual is not None,
    )
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
