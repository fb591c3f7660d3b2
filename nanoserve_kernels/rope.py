"""Rotary position embeddings, NeoX style (rotate the two halves of each head), as in Qwen3.

The cos/sin table is fp32 `[max_position, head_dim]`: the first half of a row holds
`cos(pos * inv_freq)`, the second half `sin(pos * inv_freq)`, with
`inv_freq = theta ** (-arange(0, D, 2) / D)`. The rotation runs in fp32 and is cast back.

A program rotates TOKENS tokens: for each it reads the cos/sin row once and rotates all of its q
heads and then all of its k heads in place. Heads and tokens may have any strides (q and k may
be views of a fused QKV output); the head dimension must be contiguous.

Launch heuristic (first principles; still to be measured on a GPU with
`python -m bench.kernels --sweep`): one token per program, with warps sized so that the smaller
(k) half-head tile gives each thread eight 16-bit elements (128-bit accesses).
"""

import torch

from nanoserve_kernels._triton import Launch, cdiv, jit, next_power_of_2, tl
from nanoserve_kernels.backend import use_triton


@jit
def _rotate_heads(x_ptr, stride_head, cos, sin, HEADS: tl.constexpr, BLOCK_HEADS: tl.constexpr, HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    first = x_ptr + heads * stride_head + tl.arange(0, HALF)[None, :]
    mask = heads < HEADS
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, x1 * cos - x2 * sin, mask=mask)
    tl.store(first + HALF, x2 * cos + x1 * sin, mask=mask)


@jit(do_not_specialize=("num_tokens",))
def _rope_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr, num_tokens, q_stride_token, q_stride_head, k_stride_token,
    k_stride_head, cos_sin_stride, Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, BLOCK_Q_HEADS: tl.constexpr,
    BLOCK_K_HEADS: tl.constexpr, HALF: tl.constexpr, TOKENS: tl.constexpr,
):
    for i in tl.static_range(TOKENS):
        token = tl.program_id(0).to(tl.int64) * TOKENS + i
        if token < num_tokens:
            row = cos_sin_ptr + tl.load(positions_ptr + token) * cos_sin_stride
            cos = tl.load(row + tl.arange(0, HALF))[None, :]
            sin = tl.load(row + HALF + tl.arange(0, HALF))[None, :]
            _rotate_heads(q_ptr + token * q_stride_token, q_stride_head, cos, sin, Q_HEADS, BLOCK_Q_HEADS, HALF)
            _rotate_heads(k_ptr + token * k_stride_token, k_stride_head, cos, sin, K_HEADS, BLOCK_K_HEADS, HALF)


def build_cos_sin_cache(max_position: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    # Computed like HF's default rope init (1 / theta**(i/D) in fp32) so fp32 logits match bit-closely.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    positions = torch.arange(max_position, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotates x's two halves in place, in fp32 (fp32 x is updated directly: fewer ops on CPU)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    first = x1 * cos - x2 * sin
    if xf is x:
        x2.mul_(cos).addcmul_(x1, sin)
        x1.copy_(first)
    else:
        x.copy_(torch.cat((first, x2 * cos + x1 * sin), dim=-1))


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2] each
    _rotate_(q, cos, sin)
    _rotate_(k, cos, sin)
    return q, k


def apply_rope_launch(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    tokens_per_program: int = 1, num_warps: int | None = None,
) -> Launch:
    """The launch that rotates q and k in place; raises if a layout would need a copy.
    `tokens_per_program` and `num_warps` override the heuristic (the sweep times candidates)."""
    head_dim = q.shape[-1]
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("apply_rope rotates in place: q, k and cos_sin_cache need a contiguous last dimension")
    if head_dim < 2 or head_dim & (head_dim - 1) or cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"apply_rope needs a power-of-two head_dim (got {head_dim}) and an fp32 cos/sin cache")
    args = dict(
        q_ptr=q, k_ptr=k, positions_ptr=positions, cos_sin_ptr=cos_sin_cache, num_tokens=q.shape[0],
        q_stride_token=q.stride(0), q_stride_head=q.stride(1), k_stride_token=k.stride(0), k_stride_head=k.stride(1),
        cos_sin_stride=cos_sin_cache.stride(0), Q_HEADS=q.shape[1], K_HEADS=k.shape[1],
        BLOCK_Q_HEADS=next_power_of_2(q.shape[1]), BLOCK_K_HEADS=next_power_of_2(k.shape[1]), HALF=head_dim // 2,
        TOKENS=tokens_per_program,
    )
    num_warps = num_warps or max(1, min(4, args["BLOCK_K_HEADS"] * head_dim // 2 // 256))
    return Launch(_rope_kernel, (cdiv(q.shape[0], tokens_per_program),), args, num_warps=num_warps)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq, D] and k [T, Hk, D] in place at `positions` [T]; returns (q, k)."""
    if not use_triton(q, "rope"):
        return apply_rope_reference(q, k, positions, cos_sin_cache)
    apply_rope_launch(q, k, positions, cos_sin_cache)()
    return q, k
