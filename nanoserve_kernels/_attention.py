"""What decode and prefill attention share: one step of the online softmax over a tile of keys
read through a block table, and the layout both kernels need."""

import torch

from nanoserve_kernels._triton import jit, tl


@jit
def attend_tile(
    q, acc, m, l, tile, positions, kv_end, table, k_cache_ptr, v_cache_ptr, head_offset,
    cache_stride_block, cache_stride_slot, scale_log2,
    MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    FP32_DOT: tl.constexpr,
):
    """Folds keys `tile .. tile + BLOCK_N` (those before `kv_end`) into (acc, m, l) of the rows of q.

    Scores are in log2 units (`scale_log2` = scale * log2(e)). Each key finds its cache block in
    the table, so tiles need not align with blocks. MASKED hides from each row the keys past its
    position (causality) and the keys from `kv_end` on; unmasked tiles must lie wholly before both.
    """
    keys = tile + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM)
    in_context = keys < kv_end
    blocks = tl.load(table + keys // BLOCK_SIZE, mask=in_context, other=0).to(tl.int64)
    slots = blocks * cache_stride_block + (keys % BLOCK_SIZE) * cache_stride_slot + head_offset
    kv_offsets = slots[:, None] + dims[None, :]
    # Slots past the context load as zeros: a stale NaN times a zero weight would still be NaN.
    k = tl.load(k_cache_ptr + kv_offsets, mask=in_context[:, None], other=0.0)
    v = tl.load(v_cache_ptr + kv_offsets, mask=in_context[:, None], other=0.0)
    if FP32_DOT:  # fp32 inputs, or bf16 in the interpreter, whose bf16 dot is wrong
        k, v = k.to(tl.float32), v.to(tl.float32)
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
    if MASKED:
        scores = tl.where(keys[None, :] <= positions[:, None], scores, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, axis=1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return acc, m_new, l


def check_layout(op: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor) -> None:
    """Raises unless the kernels can read this layout: power-of-two head_dim >= 16 (`tl.dot`),
    whole GQA groups, both caches alike, and every head row contiguous."""
    head_dim, q_heads, kv_heads = q.shape[-1], q.shape[-2], k_cache.shape[2]
    if head_dim < 16 or head_dim & (head_dim - 1) or q_heads % kv_heads:
        raise ValueError(f"{op} needs a power-of-two head_dim >= 16 (got {head_dim}) "
                         f"and query heads a multiple of kv heads (got {q_heads} over {kv_heads})")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError(f"{op} needs k/v caches of one layout and contiguous head rows")
