"""int8 weights for the linear layers (`--quantization int8`), on CPU.

Each weight row (output channel) is rounded to int8 with its own scale, absmax / 127, so a
matmul reads one byte an element instead of two (bf16) or four (fp32), as llama.cpp's q8_0 does
(q8_0 scales blocks of 32 elements; a row scale costs less to apply and, on the random and real
weights measured here, loses little: see the README). Two ways to multiply by such a weight are
offered to the CPU plan, which runs and times them on the model's shapes and keeps the faster
(`model.cpu_plan`):

- `int8`: weight-only, the activations as they are (`torch.ops.aten._weight_int8pack_mm`): the
  closest to the unquantized model. ATen vectorises its kernel for AVX-512; elsewhere it is
  scalar code and slow (measured on an AVX2-only EPYC: a tenth of fbgemm's speed).
- `int8 dynamic`: fbgemm's int8 GEMM (`quantized::linear_dynamic`, AVX2 and AVX-512 kernels),
  which also rounds each step's activations to 8 bits (7, `reduce_range`, so that AVX2's 16-bit
  pair sums cannot saturate) with one scale for the whole input. Each row is divided by its own
  absmax first and multiplied back after, so that every row is quantized at (nearly) its own
  scale and a sequence's result hardly depends on the other rows of its step.
- `int8 avx2`: weight-only like `int8`, by the project's AVX2 kernel (`model.cpu_avx2`), which
  widens each chunk of 8 weights to fp32 in registers and applies the row's scale to the sum.
- `int8 avx2 dynamic`: the project's AVX2 kernel with each activation row rounded to int8 (8 bits,
  at the row's own scale, so a sequence's result never depends on the other rows), the products
  summed exactly in integers; at one row it reads the weights at about the memory's speed, where
  widening them to fp32 is bound by the instructions.

The LM head is quantized too (a tied one as a copy: the embedding lookup keeps its table). On
CUDA there is no int8 kernel here: the flag is refused there.
"""

import warnings

import torch

from model import cpu_avx2

QUANTIZATIONS = ("int8",)
INT8, INT8_DYNAMIC, INT8_AVX2, INT8_AVX2_DYNAMIC = "int8", "int8 dynamic", "int8 avx2", "int8 avx2 dynamic"


# Rows quantized at a time: a chunk's fp32 copy (4 MiB at 1,024 columns) stays in the cache
# through its passes (absmax, divide, round, clamp), where the whole LM head's (600 MiB) would be
# read from memory by each one.
QUANTIZE_CHUNK_ROWS = 1024


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 [out, in], fp32 scale [out]): each row rounded at absmax / 127 (an all-zero row at scale 1)."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], QUANTIZE_CHUNK_ROWS):
        rows = weight[start : start + QUANTIZE_CHUNK_ROWS].to(torch.float32, copy=True)  # divided in place below
        row_scale = rows.abs().amax(dim=1) / 127
        row_scale = torch.where(row_scale > 0, row_scale, torch.ones_like(row_scale))
        q[start : start + len(rows)] = rows.div_(row_scale[:, None]).round_().clamp_(-127, 127)
        scale[start : start + len(rows)] = row_scale
    return q, scale


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    """The fp32 weight an int8 weight held by this module stands for."""
    q, scale = unpacked(weight)
    return q.float() * scale[:, None]


def unpacked(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if weight.int8_layout == INT8_DYNAMIC:
        q = torch.ops.quantized.linear_unpack(weight.fbgemm)[0]
        return q.int_repr(), q.q_per_channel_scales().float()
    return weight, weight.int8_scale


def hold_int8(weight: torch.Tensor) -> torch.nn.Parameter:
    """`weight` as an int8 Parameter for `_weight_int8pack_mm`, its scales (in the model's dtype, as
    the kernel wants them) on the Parameter."""
    q, scale = quantize_rows(weight)
    held = torch.nn.Parameter(q, requires_grad=False)
    held.int8_layout, held.int8_scale = INT8, scale.to(weight.dtype)
    return held


def hold_int8_avx2(weight: torch.Tensor, layout: str = INT8_AVX2) -> torch.nn.Parameter:
    """`weight` as an int8 Parameter for the AVX2 kernels (`layout`: INT8_AVX2 or INT8_AVX2_DYNAMIC),
    its scales in fp32 on the Parameter."""
    q, scale = quantize_rows(weight)
    held = torch.nn.Parameter(q, requires_grad=False)
    held.int8_layout, held.int8_scale = layout, scale
    return held


def hold_int8_avx2_dynamic(weight: torch.Tensor) -> torch.nn.Parameter:
    return hold_int8_avx2(weight, INT8_AVX2_DYNAMIC)


def hold_int8_dynamic(weight: torch.Tensor) -> torch.nn.Parameter:
    """`weight` prepacked for fbgemm. The Parameter itself is a stride-0 int8 view of one byte with
    the weight's shape (what the model and the plan ask of it): the packed copy is the only one kept."""
    q, scale = quantize_rows(weight)
    with warnings.catch_warnings():  # quantized tensors are deprecated in torch, and still fbgemm's interface
        warnings.simplefilter("ignore")
        # the int8 values as they are (no round trip through fp32 and a second rounding)
        qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(qweight, None)
    held = torch.nn.Parameter(torch.zeros(1, 1, dtype=torch.int8).expand(weight.shape), requires_grad=False)
    held.int8_layout, held.fbgemm = INT8_DYNAMIC, packed
    return held


def int8_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ dequantize(weight).T` in `x`'s dtype, by the kernel the weight was held for."""
    if weight.int8_layout == INT8:
        return torch.ops.aten._weight_int8pack_mm(x, weight, weight.int8_scale.to(x.dtype))
    if weight.int8_layout == INT8_AVX2:
        return cpu_avx2.int8_linear(x, weight, weight.int8_scale)
    if weight.int8_layout == INT8_AVX2_DYNAMIC:
        return cpu_avx2.int8_dot_linear(x, weight, weight.int8_scale)
    rows = x.float()
    if rows.shape[0] == 1:
        return torch.ops.quantized.linear_dynamic(rows, weight.fbgemm, True).to(x.dtype)
    absmax = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)
    return (torch.ops.quantized.linear_dynamic(rows / absmax, weight.fbgemm, True) * absmax).to(x.dtype)
