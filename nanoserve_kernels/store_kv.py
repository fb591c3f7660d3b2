"""Write the new tokens' K and V rows into the paged cache.

The caches are `[num_blocks, block_size, kv_heads, head_dim]`; `slot_mapping[t]` is the flat slot
`block * block_size + offset` of token t, or -1 for a token that must not be stored (padding).

A program copies all kv heads, K and V, of TOKENS tokens. The new K/V may be strided views
(V comes straight out of the fused QKV projection); cache offsets are computed in int64, since a
large cache holds more than 2^31 elements (slot numbers themselves fit in int32).

Launch heuristic (first principles; still to be measured on a GPU with
`python -m bench.kernels --sweep`): one token per program, with warps sized so that each thread
moves eight 16-bit elements (one 128-bit access) of the [heads, head_dim] tile. At Qwen3-8B's
8 x 128 that is 4 warps and 4 KB in + 4 KB out per program, 16 programs resident per SM.
"""

import torch

from nanoserve_kernels._triton import Launch, cdiv, jit, next_power_of_2, tl
from nanoserve_kernels.backend import use_triton


@jit(do_not_specialize=("num_tokens",))
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, num_tokens,
    k_stride_token, k_stride_head, v_stride_token, v_stride_head,
    cache_stride_block, cache_stride_slot, cache_stride_head,
    HEADS: tl.constexpr, BLOCK_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TOKENS: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    dims = tl.arange(0, HEAD_DIM)[None, :]
    for i in tl.static_range(TOKENS):
        token = tl.program_id(0).to(tl.int64) * TOKENS + i
        if token < num_tokens:
            slot = tl.load(slot_mapping_ptr + token).to(tl.int32)
            # A padding token (slot -1) has no heads to store. (A scalar `slot >= 0` in the mask
            # instead trips an interpreter bug: bool tensor & bool scalar gives an int mask.)
            mask = (heads < tl.where(slot >= 0, HEADS, 0)) & (dims < HEAD_DIM)
            cache = (slot // BLOCK_SIZE).to(tl.int64) * cache_stride_block + (slot % BLOCK_SIZE) * cache_stride_slot
            cache += heads * cache_stride_head + dims
            k = tl.load(k_ptr + token * k_stride_token + heads * k_stride_head + dims, mask=mask)
            v = tl.load(v_ptr + token * v_stride_token + heads * v_stride_head + dims, mask=mask)
            tl.store(k_cache_ptr + cache, k, mask=mask)
            tl.store(v_cache_ptr + cache, v, mask=mask)


def store_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if bool((slot_mapping < 0).any()):  # padding present: drop those tokens first
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(num_slots, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(num_slots, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def store_kv_launch(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    tokens_per_program: int = 1, num_warps: int | None = None,
) -> Launch:
    """The launch that stores k and v; the caches must share one layout, head rows contiguous.
    `tokens_per_program` and `num_warps` override the heuristic (the sweep times candidates)."""
    head_dim = k.shape[-1]
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("store_kv needs k/v caches of one layout and a contiguous head dimension everywhere")
    if head_dim & (head_dim - 1):
        raise ValueError(f"store_kv needs a power-of-two head_dim, got {head_dim}")
    args = dict(
        k_ptr=k, v_ptr=v, k_cache_ptr=k_cache, v_cache_ptr=v_cache, slot_mapping_ptr=slot_mapping,
        num_tokens=k.shape[0], k_stride_token=k.stride(0), k_stride_head=k.stride(1), v_stride_token=v.stride(0),
        v_stride_head=v.stride(1), cache_stride_block=k_cache.stride(0), cache_stride_slot=k_cache.stride(1),
        cache_stride_head=k_cache.stride(2), HEADS=k.shape[1], BLOCK_HEADS=next_power_of_2(k.shape[1]),
        HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1], TOKENS=tokens_per_program,
    )
    # Eight 16-bit elements (one 128-bit access) per thread: fewer threads than the tile needs
    # would otherwise split it into narrower accesses.
    num_warps = num_warps or max(1, min(4, args["BLOCK_HEADS"] * head_dim // 256))
    return Launch(_store_kv_kernel, (cdiv(k.shape[0], tokens_per_program),), args, num_warps=num_warps)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [T, Hk, D] go to the cache slots in `slot_mapping` [T] (int64; -1 skips the token)."""
    if not use_triton(k, "store_kv"):
        store_kv_reference(k, v, k_cache, v_cache, slot_mapping)
        return
    store_kv_launch(k, v, k_cache, v_cache, slot_mapping)()
