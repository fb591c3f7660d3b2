"""Prefill attention over a paged KV cache: several sequences' new tokens at once, each attending
causally to its cached prefix and to itself.

The new tokens of S sequences are concatenated: sequence s owns query rows
`query_start_loc[s]:query_start_loc[s + 1]` of q `[T, Hq, D]`. Its K/V are already stored in the
cache (`store_kv` ran first), so the whole context of sequence s is its first `context_lens[s]`
cache slots through `block_tables[s]`; its new tokens are the last of them, and new token i sits at
position `context_lens[s] - query_len + i`, seeing every position up to its own. Query head h reads
kv head `h // (Hq // Hk)`. `k` and `v` are the new tokens' rows (`[T, Hk, D]`, as stored) when the
caller has them: the torch reference then needs no cache read for a sequence with nothing cached.
None means they exist only in the cache (the fused attention front-end writes them nowhere else).
Softmax and accumulation run in fp32.

The Triton kernel is flash attention over the paged cache, varlen and causal, for any number of
sequences in one launch. A program owns one tile of BLOCK_Q new tokens of one sequence for one kv
head, with every query head of that GQA group packed into the rows of the tile (row r is token
r // GROUP, head r % GROUP, as in vLLM's unified Triton attention), so each K/V tile is read once
per group. It walks the context in BLOCK_N-token tiles straight through the block table: first
the tiles every row sees whole (no mask), then the few around the diagonal, masked. The grid
(query tiles of the longest sequence, sequences, kv heads) comes from host integers; programs
past their sequence's new tokens exit at once, and the last (most expensive, causally) query
tiles are scheduled first.
"""

import math

import torch
import torch.nn.functional as F

from nanoserve_kernels._attention import attend_tile, check_layout
from nanoserve_kernels._triton import Launch, cdiv, interpreting, jit, next_power_of_2, tl
from nanoserve_kernels.backend import use_triton

BLOCK_M = 128  # rows of a query tile: BLOCK_M // GROUP tokens times the GROUP heads of a kv head


# The table's width follows the step's longest context; a mixed step passes the tables and lengths
# of its prompt chunks as views past its decode rows, at any offset.
@jit(do_not_specialize=("table_stride",), do_not_specialize_on_alignment=("block_tables_ptr", "context_lens_ptr"))
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, context_lens_ptr, out_ptr,
    scale_log2, q_stride_token, q_stride_head, out_stride_token, out_stride_head,
    cache_stride_block, cache_stride_slot, cache_stride_head, table_stride,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):
    q_tile = tl.num_programs(0) - 1 - tl.program_id(0)  # the costliest (last) tiles start first
    seq, kv_head = tl.program_id(1), tl.program_id(2)
    first_row = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - first_row
    if q_tile * BLOCK_Q >= query_len:  # this sequence has fewer new tokens
        return
    num_cached = tl.load(context_lens_ptr + seq) - query_len
    rows = tl.arange(0, BLOCK_M)
    tokens = q_tile * BLOCK_Q + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    valid = (rows < BLOCK_Q * GROUP) & (tokens < query_len)
    positions = num_cached + tokens
    dims = tl.arange(0, HEAD_DIM)
    # int64 only in the sequence's base: row offsets within one sequence fit in int32, and an
    # int64 vector kept live across the loop would cost registers.
    q_rows = tokens * q_stride_token + heads * q_stride_head
    q = tl.load(q_ptr + first_row.to(tl.int64) * q_stride_token + q_rows[:, None] + dims[None, :],
                mask=valid[:, None], other=0.0)
    if FP32_DOT:
        q = q.to(tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * table_stride
    head_offset = kv_head * cache_stride_head
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the scores (log2 units)
    l = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Every row sees every key before the tile's first position; its last row sees up to kv_end.
    first_position = num_cached + q_tile * BLOCK_Q
    kv_end = num_cached + tl.minimum(q_tile * BLOCK_Q + BLOCK_Q, query_len)
    unmasked_end = (first_position + 1) // BLOCK_N * BLOCK_N
    for tile in range(0, unmasked_end, BLOCK_N):
        acc, m, l = attend_tile(q, acc, m, l, tile, positions, kv_end, table, k_cache_ptr, v_cache_ptr,
                                 head_offset, cache_stride_block, cache_stride_slot, scale_log2,
                                 False, HEAD_DIM, BLOCK_SIZE, BLOCK_N, FP32_DOT)
    for tile in range(unmasked_end, kv_end, BLOCK_N):
        acc, m, l = attend_tile(q, acc, m, l, tile, positions, kv_end, table, k_cache_ptr, v_cache_ptr,
                                 head_offset, cache_stride_block, cache_stride_slot, scale_log2,
                                 True, HEAD_DIM, BLOCK_SIZE, BLOCK_N, FP32_DOT)
    out_rows = tokens * out_stride_token + heads * out_stride_head
    out = out_ptr + first_row.to(tl.int64) * out_stride_token
    tl.store(out + out_rows[:, None] + dims[None, :], acc / l[:, None], mask=valid[:, None])


def paged_prefill_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
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
        if num_cached == 0 and k is not None:
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
            enable_gqa=q.shape[1] != k_cache.shape[2],
        ).transpose(0, 1)
    return out


def paged_prefill_attention_grouped(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
) -> torch.Tensor:
    """The same attention as two matmuls per sequence, every query head of a kv head's group and
    every new token stacked as rows, in fp32 whatever the input dtype, as the reference's SDPA
    accumulates (with bf16 scores and probabilities, a Qwen3-0.6B-shaped model's verification
    windows accepted only 72% of a prediction equal to its plain output). For a few new tokens
    over a cached context (a speculative verification window) this was 1.4-5x faster than the
    SDPA reference on an AMD EPYC (AVX-512); `model.cpu_plan` times both."""
    block_size, kv_heads, head_dim = k_cache.shape[1:]
    q_heads = q.shape[1]
    group = q_heads // kv_heads
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    # Lengths read back to the host: free on CPU, where this runs.
    starts, contexts = query_start_loc.tolist(), context_lens.tolist()
    for seq, context in enumerate(contexts):
        start, end = starts[seq], starts[seq + 1]
        num_new = end - start
        num_cached = context - num_new
        if num_cached == 0 and k is not None:
            keys, values = k[start:end], v[start:end]
        else:
            blocks = block_tables[seq, : cdiv(context, block_size)].long()
            keys = k_cache.index_select(0, blocks).flatten(0, 1)[:context]
            values = v_cache.index_select(0, blocks).flatten(0, 1)[:context]
        # [Hk, new tokens x group, D]: row r is new token r // group, query head r % group of the kv head
        rows = q[start:end].float().view(num_new, kv_heads, group, head_dim).transpose(0, 1).reshape(kv_heads, -1, head_dim)
        scores = torch.matmul(rows, keys.float().transpose(0, 1).transpose(-1, -2)).mul_(scale)  # [Hk, rows, context]
        if num_new > 1:  # causal: new token i sits at num_cached + i and sees keys up to there
            positions = torch.arange(num_cached, context, device=q.device)
            future = torch.arange(context, device=q.device)[None, :] > positions[:, None]
            scores.masked_fill_(future.repeat_interleave(group, 0), float("-inf"))
        attended = torch.matmul(scores.softmax(-1), values.float().transpose(0, 1))  # [Hk, rows, D]
        out[start:end] = attended.view(kv_heads, num_new, group, head_dim).transpose(0, 1).reshape(num_new, q_heads, head_dim)
    return out


def paged_prefill_attention_launch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    query_start_loc: torch.Tensor, context_lens: torch.Tensor, max_query_len: int, scale: float, out: torch.Tensor,
) -> Launch:
    """The launch that writes prefill attention to `out` ([T, Hq, D]); the grid uses host ints only."""
    check_layout("paged_prefill_attention", q, k_cache, v_cache, out)
    _, block_size, kv_heads, head_dim = k_cache.shape
    group = q.shape[1] // kv_heads
    block_m = max(BLOCK_M, next_power_of_2(group))
    block_q = block_m // group
    args = dict(
        q_ptr=q, k_cache_ptr=k_cache, v_cache_ptr=v_cache, block_tables_ptr=block_tables,
        query_start_loc_ptr=query_start_loc, context_lens_ptr=context_lens, out_ptr=out,
        scale_log2=scale * math.log2(math.e), q_stride_token=q.stride(0), q_stride_head=q.stride(1),
        out_stride_token=out.stride(0), out_stride_head=out.stride(1), cache_stride_block=k_cache.stride(0),
        cache_stride_slot=k_cache.stride(1), cache_stride_head=k_cache.stride(2), table_stride=block_tables.stride(0),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        # A group that is not a power of two (Qwen3-14B's 5) costs registers in the row -> (token,
        # head) arithmetic: 64-key tiles then spill on sm_80 at head_dim 128, 32-key tiles do not.
        BLOCK_N=64 if group & (group - 1) == 0 else 32,
        FP32_DOT=q.dtype == torch.float32 or (interpreting() and q.dtype == torch.bfloat16),
    )
    grid = (cdiv(max_query_len, block_q), block_tables.shape[0], kv_heads)
    return Launch(_prefill_kernel, grid, args, num_warps=8, num_stages=2)


def paged_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
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
    a kernel grid without reading the device). `k`/`v` may be None (see the module docstring);
    the Triton kernel reads every key and value from the cache either way.
    """
    if not use_triton(q, "prefill_attention"):
        return paged_prefill_attention_reference(
            q, k, v, k_cache, v_cache, block_tables, query_start_loc, context_lens, max_query_len, scale
        )
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    paged_prefill_attention_launch(
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, max_query_len, scale, out
    )()
    return out
