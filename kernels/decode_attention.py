"""Decode attention over a paged KV cache: one new query token per sequence.

q is `[B, Hq, D]`; sequence b attends to the first `context_lens[b]` tokens stored in the blocks
`block_tables[b]` of `k_cache`/`v_cache` (`[num_blocks, block_size, Hk, D]`). Query head h reads
kv head `h // (Hq // Hk)` (grouped-query attention). Softmax and accumulation run in fp32.
"""

import torch


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    batch, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    group = q_heads // kv_heads
    max_len = block_tables.shape[1] * block_size
    # Gather every block in the table (padding entries are valid block ids) and mask past the end.
    keys = k_cache[block_tables.long()].view(batch, max_len, kv_heads, head_dim).float()
    values = v_cache[block_tables.long()].view(batch, max_len, kv_heads, head_dim).float()
    qg = q.float().view(batch, kv_heads, group, head_dim)
    scores = torch.einsum("bhgd,bshd->bhgs", qg, keys) * scale
    past_end = torch.arange(max_len, device=q.device)[None, :] >= context_lens[:, None]
    scores.masked_fill_(past_end[:, None, None, :], float("-inf"))
    # Slots past the end hold whatever the cache held; 0 * NaN would still poison the sum.
    values.masked_fill_(past_end[:, :, None, None], 0.0)
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgs,bshd->bhgd", probs, values)
    return out.reshape(batch, q_heads, head_dim).to(q.dtype)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Returns out [B, Hq, D]: softmax(q·K * scale)·V over each sequence's cached tokens."""
    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale)
