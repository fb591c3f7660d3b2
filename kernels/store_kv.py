"""Write the new tokens' K and V rows into the paged cache.

The caches are `[num_blocks, block_size, kv_heads, head_dim]`; `slot_mapping[t]` is the flat slot
`block * block_size + offset` of token t, or -1 for a token that must not be stored (padding).
"""

import torch


def store_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(num_slots, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(num_slots, *v_cache.shape[2:])[slots] = v[keep]


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [T, Hk, D] go to the cache slots in `slot_mapping` [T] (int64; -1 skips the token)."""
    store_kv_reference(k, v, k_cache, v_cache, slot_mapping)
