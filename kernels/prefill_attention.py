"""Prefill attention over a paged KV cache: several sequences' new tokens at once, each attending
causally to its cached prefix and to itself.

The new tokens of S sequences are concatenated: sequence s owns query rows
`query_start_loc[s]:query_start_loc[s + 1]` of q `[T, Hq, D]`. Its K/V are already stored in the
cache (`store_kv` ran first), so the whole context of sequence s is its first `context_lens[s]`
cache slots through `block_tables[s]`; its new tokens are the last of them, and new token i sits at
position `context_lens[s] - query_len + i`, seeing every position up to its own. Query head h reads
kv head `h // (Hq // Hk)`. `k` and `v` are the new tokens' rows (`[T, Hk, D]`, as stored): a
sequence with nothing cached needs no cache read at all. Softmax and accumulation run in fp32.
"""

import torch
import torch.nn.functional as F

from kernels._triton import cdiv


def paged_prefill_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
) -> torch.Tensor:
    block_size = k_cache.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    # Lengths read back to the host: free on CPU, where this reference runs.
    starts, contexts = query_start_loc.tolist(), context_lens.tolist()
    for seq, context in enumerate(contexts):
        start, end = starts[seq], starts[seq + 1]
        num_cached = context - (end - start)
        if num_cached == 0:
            keys, values, mask, causal = k[start:end], v[start:end], None, True
        else:
            blocks = block_tables[seq, : cdiv(context, block_size)].long()
            keys = k_cache.index_select(0, blocks).flatten(0, 1)[:context]
            values = v_cache.index_select(0, blocks).flatten(0, 1)[:context]
            query_positions = torch.arange(num_cached, context, device=q.device)
            mask = query_positions[:, None] >= torch.arange(context, device=q.device)[None, :]
            causal = False
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1),
            keys.transpose(0, 1),
            values.transpose(0, 1),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        ).transpose(0, 1)
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
) -> torch.Tensor:
    """Returns out [T, Hq, D]: causal attention of each sequence's new tokens over its whole context.

    `block_tables` [S, W] int32, `query_start_loc` [S + 1] int32 (from 0), `context_lens` [S] int32
    (cached + new tokens), `max_query_len` the longest sequence's new tokens (host int: it sizes
    a kernel grid without reading the device).
    """
    return paged_prefill_attention_reference(
        q, k, v, k_cache, v_cache, block_tables, query_start_loc, context_lens, max_query_len, scale
    )
