"""The attention front-end in one launch: from the fused QKV projection to q and the KV cache.

Per token: Qwen3's per-head RMSNorm of q and of k (`q_norm`, `k_norm`), NeoX rotary embedding of
both, then q is written out and k and v go to the token's cache slot (slot -1: not stored). That
is one read of the QKV row, one write of q and one write into the cache, where the unfused ops
(two `rms_norm`, `apply_rope`, `store_kv`) read and write q and k two or three times over four
launches. Numerics are exactly the unfused references': the norm in fp32, cast to the input
dtype, times the weight (rounded to the dtype); the rotation in fp32 on that, rounded again.

qkv is `[T, (Hq + 2 Hk) * D]` (rows may be strided, columns contiguous); the caches
`[num_blocks, block_size, Hk, D]` give Hk and D. The kernel runs one program per token; it reads
the token's cos/sin row once for all heads and keeps each head as its two rotary halves.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from nanoserve_kernels._triton import Launch, jit, next_power_of_2, tl
from nanoserve_kernels.backend import use_triton
from nanoserve_kernels.rms_norm import rms_norm_reference
from nanoserve_kernels.rope import _rotate_, apply_rope_reference
from nanoserve_kernels.store_kv import store_kv_reference


@jit
def _norm_rope_heads(x_ptr, weight_ptr, cos, sin, eps, HEADS: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                     HALF: tl.constexpr):
    """The (first, second) rotary halves [BLOCK_HEADS, HALF] of HEADS normed, rotated heads at x_ptr."""
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    halves = tl.arange(0, HALF)[None, :]
    first = x_ptr + heads * (2 * HALF) + halves
    mask = heads < HEADS
    x1 = tl.load(first, mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
    # Small rows are loaded 1-d and broadcast: a [1, HALF] load gets a layout of its own, and the
    # compiler would then move the whole tile into it through shared memory.
    w1 = tl.load(weight_ptr + tl.arange(0, HALF)).to(tl.float32)[None, :]
    w2 = tl.load(weight_ptr + HALF + tl.arange(0, HALF)).to(tl.float32)[None, :]
    # As the references round: normalised value to the dtype, times the weight to the dtype.
    y1 = ((x1 * rstd).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
    y2 = ((x2 * rstd).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    return y1 * cos - y2 * sin, y2 * cos + y1 * sin


@jit
def _attention_frontend_kernel(
    qkv_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, q_weight_ptr, k_weight_ptr, positions_ptr, cos_sin_ptr,
    slot_mapping_ptr, qkv_stride_token, cos_sin_stride, cache_stride_block, cache_stride_slot, cache_stride_head,
    eps, BLOCK_SIZE: tl.constexpr,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, BLOCK_Q_HEADS: tl.constexpr, BLOCK_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    token = tl.program_id(0).to(tl.int64)
    q_row = qkv_ptr + token * qkv_stride_token
    k_row = q_row + Q_HEADS * HEAD_DIM
    v_row = k_row + KV_HEADS * HEAD_DIM
    halves = tl.arange(0, HALF)[None, :]

    # v first, straight into the cache: nothing else needs it.
    slot = tl.load(slot_mapping_ptr + token).to(tl.int32)  # a cache holds fewer than 2^31 slots
    kv_heads = tl.arange(0, BLOCK_KV_HEADS)[:, None]
    # A padding token (slot -1) stores no head. (A scalar `slot >= 0` in the mask trips an
    # interpreter bug: bool tensor & bool scalar gives an int mask.)
    stored = kv_heads < tl.where(slot >= 0, KV_HEADS, 0)
    cache = (slot // BLOCK_SIZE).to(tl.int64) * cache_stride_block + (slot % BLOCK_SIZE) * cache_stride_slot
    cache += kv_heads * cache_stride_head + halves
    v = v_row + kv_heads * HEAD_DIM + halves
    tl.store(v_cache_ptr + cache, tl.load(v, mask=stored), mask=stored)
    tl.store(v_cache_ptr + cache + HALF, tl.load(v + HALF, mask=stored), mask=stored)

    cos_sin = cos_sin_ptr + tl.load(positions_ptr + token) * cos_sin_stride
    cos = tl.load(cos_sin + tl.arange(0, HALF))[None, :]
    sin = tl.load(cos_sin + HALF + tl.arange(0, HALF))[None, :]
    k1, k2 = _norm_rope_heads(k_row, k_weight_ptr, cos, sin, eps, KV_HEADS, BLOCK_KV_HEADS, HALF)
    tl.store(k_cache_ptr + cache, k1, mask=stored)
    tl.store(k_cache_ptr + cache + HALF, k2, mask=stored)

    q1, q2 = _norm_rope_heads(q_row, q_weight_ptr, cos, sin, eps, Q_HEADS, BLOCK_Q_HEADS, HALF)
    q_heads = tl.arange(0, BLOCK_Q_HEADS)[:, None]
    q_out = q_out_ptr + token * (Q_HEADS * HEAD_DIM) + q_heads * HEAD_DIM + halves
    tl.store(q_out, q1, mask=q_heads < Q_HEADS)
    tl.store(q_out + HALF, q2, mask=q_heads < Q_HEADS)


def attention_frontend_reference(
    qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, eps: float,
    positions: torch.Tensor, cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unfused references in sequence; returns (q, k, v), k and v as stored."""
    return unfused_attention_frontend(rms_norm_reference, apply_rope_reference, store_kv_reference, qkv,
                                      q_norm_weight, k_norm_weight, eps, positions, cos_sin_cache, k_cache, v_cache,
                                      slot_mapping)


def attention_frontend_torch(
    qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, eps: float,
    positions: torch.Tensor, cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The references' results bit for bit in fewer torch ops, for CPU, where each op costs a
    dispatch and a wake-up of the thread pool: q's and k's heads, adjacent in a QKV row, are normed
    by one rms_norm and rotated by one rotation, then split (28 layers of a Qwen3-0.6B decode step
    on a 2-core EPYC: 1.4-1.9 ms against 2.0-2.4 ms for the references in sequence)."""
    tokens, (kv_heads, head_dim) = qkv.shape[0], k_cache.shape[2:]
    q_heads = qkv.shape[1] // head_dim - 2 * kv_heads
    qk_size = (q_heads + kv_heads) * head_dim
    qk = qkv[:, :qk_size].view(tokens, q_heads + kv_heads, head_dim)
    weight = torch.cat((q_norm_weight.expand(q_heads, head_dim), k_norm_weight.expand(kv_heads, head_dim)))
    # as rms_norm_reference: the norm in fp32, rounded to the dtype, times the weight in the dtype
    normed = weight * F.rms_norm(qk.float(), (head_dim,), eps=eps).to(qkv.dtype)
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)  # as apply_rope_reference
    _rotate_(normed, cos, sin)
    q, k = (part.contiguous() for part in normed.split([q_heads, kv_heads], dim=1))  # copies only when T > 1
    v = qkv[:, qk_size:].view(tokens, kv_heads, head_dim)
    store_kv_reference(k, v, k_cache, v_cache, slot_mapping)
    return q, k, v


def unfused_attention_frontend(
    norm: Callable, rope: Callable, store: Callable, qkv: torch.Tensor, q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor, eps: float, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The front-end as its three ops, `norm`, `rope` and `store`, one after another (the reference's
    and, with plug-ins among them, `nanoserve_kernels.ops`'); returns (q, k, v), k and v as stored."""
    tokens, (kv_heads, head_dim) = qkv.shape[0], k_cache.shape[2:]
    kv_size = kv_heads * head_dim
    q, k, v = qkv.split([qkv.shape[1] - 2 * kv_size, kv_size, kv_size], dim=-1)
    q = norm(q.view(tokens, -1, head_dim), q_norm_weight, eps)
    k = norm(k.view(tokens, kv_heads, head_dim), k_norm_weight, eps)
    v = v.view(tokens, kv_heads, head_dim)
    q, k = rope(q, k, positions, cos_sin_cache)
    store(k, v, k_cache, v_cache, slot_mapping)
    return q, k, v


def attention_frontend_launch(
    qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, eps: float,
    positions: torch.Tensor, cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, q_out: torch.Tensor,
) -> Launch:
    """The launch that writes q to `q_out` ([T, Hq, D], contiguous) and k, v into the caches."""
    _, _, kv_heads, head_dim = k_cache.shape
    q_heads = qkv.shape[1] // head_dim - 2 * kv_heads
    if head_dim < 2 or head_dim & (head_dim - 1) or q_heads < 1 or qkv.shape[1] != (q_heads + 2 * kv_heads) * head_dim:
        raise ValueError(f"attention_frontend needs a power-of-two head_dim (got {head_dim}) and qkv rows of "
                         f"(Hq + 2 * {kv_heads}) * {head_dim} elements (got {qkv.shape[1]})")
    if qkv.stride(1) != 1 or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or not q_out.is_contiguous():
        raise ValueError("attention_frontend needs contiguous qkv rows and q_out, and k/v caches of one layout")
    if cos_sin_cache.dtype != torch.float32 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("attention_frontend needs an fp32 cos/sin cache with contiguous rows")
    args = dict(
        qkv_ptr=qkv, q_out_ptr=q_out, k_cache_ptr=k_cache, v_cache_ptr=v_cache, q_weight_ptr=q_norm_weight,
        k_weight_ptr=k_norm_weight, positions_ptr=positions, cos_sin_ptr=cos_sin_cache, slot_mapping_ptr=slot_mapping,
        qkv_stride_token=qkv.stride(0), cos_sin_stride=cos_sin_cache.stride(0), cache_stride_block=k_cache.stride(0),
        cache_stride_slot=k_cache.stride(1), cache_stride_head=k_cache.stride(2), eps=eps, BLOCK_SIZE=k_cache.shape[1],
        Q_HEADS=q_heads, KV_HEADS=kv_heads, BLOCK_Q_HEADS=next_power_of_2(q_heads),
        BLOCK_KV_HEADS=next_power_of_2(kv_heads), HEAD_DIM=head_dim,
    )
    # Warps such that the k and v half-head tiles still give each thread eight 16-bit elements
    # (one 128-bit access); more threads would split them into narrower accesses.
    num_warps = max(1, min(4, args["BLOCK_KV_HEADS"] * head_dim // 2 // 256))
    return Launch(_attention_frontend_kernel, (qkv.shape[0],), args, num_warps=num_warps)


def attention_frontend(
    qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, eps: float,
    positions: torch.Tensor, cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """q-norm, k-norm, RoPE at `positions` and the K/V cache store for qkv [T, (Hq + 2Hk) * D].

    Returns (q, k, v): q [T, Hq, D] normed and rotated; k and v [T, Hk, D] as stored when the
    torch reference ran, None when the kernel ran (it writes them into the cache only).
    """
    if not use_triton(qkv, "attention_frontend"):
        return attention_frontend_torch(
            qkv, q_norm_weight, k_norm_weight, eps, positions, cos_sin_cache, k_cache, v_cache, slot_mapping
        )
    head_dim = k_cache.shape[-1]
    q = torch.empty(qkv.shape[0], qkv.shape[1] // head_dim - 2 * k_cache.shape[2], head_dim,
                    dtype=qkv.dtype, device=qkv.device)
    attention_frontend_launch(
        qkv, q_norm_weight, k_norm_weight, eps, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, q
    )()
    return q, None, None
