"""Decode attention over a paged KV cache: one new query token per sequence.

q is `[B, Hq, D]`; sequence b attends to the first `context_lens[b]` tokens stored in the blocks
`block_tables[b]` of `k_cache`/`v_cache` (`[num_blocks, block_size, Hk, D]`). Query head h reads
kv head `h // (Hq // Hk)` (grouped-query attention). Softmax and accumulation run in fp32.

The Triton version is split-KV ("flash decoding"). Stage 1 runs one program per (sequence,
kv head, split): it reads its share of the sequence's K/V once for all query heads of the GQA
group (padded to 16 rows, the smallest `tl.dot` on the GPU), keeps an fp32 online softmax, and
writes the split's normalised output and log-sum-exp. Stage 2 merges the splits by their
log-sum-exp; with one split, stage 1 writes the output directly and stage 2 is skipped.

CUDA-graph safe: the grid and every non-tensor argument depend only on static shapes (batch,
heads, the block table's width, dtype) and the GPU, never on context lengths, so one captured
launch serves every later step. The number of splits is fixed from those shapes (enough
programs to fill the SMs when every sequence is long); each program computes on the device how
many tokens its own sequence gives a split (the context rounded up to whole tiles, over the
splits), and programs past their sequence's end exit at once. The merge recomputes how many
splits each sequence used the same way, as vLLM's and SGLang's Triton decode kernels do.
"""

import functools
import math

import torch
import torch.nn.functional as F

from nanoserve_kernels._attention import attend_tile, check_layout
from nanoserve_kernels._triton import Launch, cdiv, interpreting, jit, next_power_of_2, tl
from nanoserve_kernels.backend import use_triton

MAX_SPLITS = 128  # enough to fill any GPU at batch 1; more would make the merge the longer stage
SPLITS_CHUNK = 16  # the merge reads the splits' partials [16, D] at a time
PROGRAMS_PER_SM = 4  # registers and shared memory let an SM hold four stage-1 programs at once
INTERPRETER_SMS = 8  # the interpreter has no SMs; this keeps small test batches on several splits


@jit
def _tokens_per_split(context_len, num_splits, BLOCK_N: tl.constexpr):
    """Tokens of one split of a sequence: its context over the splits, rounded up to whole tiles."""
    return tl.cdiv(tl.cdiv(context_len, num_splits), BLOCK_N) * BLOCK_N


# Eager decode steps size the split count and the table's width from the batch.
@jit(do_not_specialize=("num_splits", "table_stride", "lse_stride_seq", "lse_stride_head"))
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, partial_out_ptr, partial_lse_ptr,
    scale_log2, num_splits, q_stride_seq, q_stride_head, cache_stride_block, cache_stride_slot, cache_stride_head,
    table_stride, out_stride_seq, out_stride_head, out_stride_split, lse_stride_seq, lse_stride_head,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr, FP32_DOT: tl.constexpr,
):
    seq, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    tokens_per_split = _tokens_per_split(context_len, num_splits, BLOCK_N)
    start = split * tokens_per_split
    if start >= context_len:  # past this sequence's end: the merge never reads this split
        return
    end = tl.minimum(start + tokens_per_split, context_len)
    rows = tl.arange(0, GROUP_PAD)
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * q_stride_seq + heads[:, None] * q_stride_head + dims[None, :],
                mask=rows[:, None] < GROUP, other=0.0)
    # fp32 inputs, or bf16 in the interpreter, whose bf16 dot is wrong. Otherwise the dots take
    # bf16/fp16 operands (tensor cores on the GPU; fp16 runs this path in the interpreter too).
    if FP32_DOT:
        q = q.to(tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * table_stride
    head_offset = kv_head * cache_stride_head
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max of the scores (log2 units)
    l = tl.zeros([GROUP_PAD], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    positions = tl.full([GROUP_PAD], 0, tl.int32) + end - 1  # the new token sees the whole split
    for tile in range(start, end, BLOCK_N):
        acc, m, l = attend_tile(q, acc, m, l, tile, positions, end, table, k_cache_ptr, v_cache_ptr, head_offset,
                                cache_stride_block, cache_stride_slot, scale_log2,
                                True, HEAD_DIM, BLOCK_SIZE, BLOCK_N, FP32_DOT)
    store = rows < GROUP
    out = partial_out_ptr + seq * out_stride_seq + heads[:, None] * out_stride_head + split * out_stride_split
    tl.store(out + dims[None, :], acc / l[:, None], mask=store[:, None])
    lse = partial_lse_ptr + seq * lse_stride_seq + heads * lse_stride_head + split
    tl.store(lse, m + tl.log2(l), mask=store)


@jit(do_not_specialize=("num_splits", "lse_stride_seq", "lse_stride_head"))
def _merge_splits_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr, context_lens_ptr, num_splits,
    partial_stride_seq, partial_stride_head, lse_stride_seq, lse_stride_head, out_stride_seq, out_stride_head,
    HEAD_DIM: tl.constexpr, SPLITS_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The splits in chunks of a fixed size, merged online: one compiled variant serves every
    # split count (a tile padded to the count would compile one per power of two, mid-serve).
    seq, head = tl.program_id(0), tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    used_splits = tl.cdiv(context_len, _tokens_per_split(context_len, num_splits, BLOCK_N))
    dims = tl.arange(0, HEAD_DIM)
    lse_row = partial_lse_ptr + seq * lse_stride_seq + head * lse_stride_head
    partial = partial_out_ptr + seq * partial_stride_seq + head * partial_stride_head
    m = tl.full([1], float("-inf"), tl.float32)  # the largest log-sum-exp so far
    total = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for first in range(0, used_splits, SPLITS_CHUNK):  # split 0 always exists: m is finite after one chunk
        splits = first + tl.arange(0, SPLITS_CHUNK)
        used = splits < used_splits
        lse = tl.load(lse_row + splits, mask=used, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, axis=0))
        rescale = tl.exp2(m - m_new)
        weights = tl.exp2(lse - m_new)
        parts = tl.load(partial + splits[:, None] * HEAD_DIM + dims[None, :], mask=used[:, None], other=0.0)
        acc = acc * rescale + tl.sum(parts * weights[:, None], axis=0)
        total = total * rescale + tl.sum(weights, axis=0)
        m = m_new
    tl.store(out_ptr + seq * out_stride_seq + head * out_stride_head + dims, acc / total)


def _gather_context(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Each sequence's K/V as [B, max_len, Hk, D], tails past a sequence's end zeroed (a stale NaN
    there would survive any mask), and the lengths on the host."""
    batch = block_tables.shape[0]
    _, block_size, kv_heads, head_dim = k_cache.shape
    # Context lengths read back to the host: free on CPU, where these implementations run.
    lens = context_lens.tolist()
    max_len = max(lens)
    blocks = block_tables[:, : cdiv(max_len, block_size)].reshape(-1).long()
    keys = k_cache.index_select(0, blocks).view(batch, -1, kv_heads, head_dim)[:, :max_len]
    values = v_cache.index_select(0, blocks).view(batch, -1, kv_heads, head_dim)[:, :max_len]
    for seq, length in enumerate(lens):
        if length < max_len:
            keys[seq, length:] = 0.0
            values[seq, length:] = 0.0
    return keys, values, lens


def _padding_mask(lens: list[int], context_lens: torch.Tensor) -> torch.Tensor | None:
    """[B, 1, 1, max_len] True where a key exists, or None when every sequence is as long as the longest."""
    max_len = max(lens)
    if min(lens) == max_len:
        return None
    return (torch.arange(max_len, device=context_lens.device)[None, :] < context_lens[:, None])[:, None, None, :]


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    batch, q_heads, head_dim = q.shape
    keys, values, lens = _gather_context(k_cache, v_cache, block_tables, context_lens)
    # torch's CPU attention accumulates reduced-precision inputs in fp32, as the kernel does.
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=_padding_mask(lens, context_lens), scale=scale, enable_gqa=q_heads != k_cache.shape[2],
    )
    return out.view(batch, q_heads, head_dim)


def paged_decode_attention_grouped(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The same attention as two batched matmuls per kv head group, HF eager's numerics (scores
    and probabilities in the input dtype, softmax in fp32). On some CPUs and shapes this is several
    times faster than SDPA's CPU kernel for a single query token; `model.cpu_plan` times both."""
    batch, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    keys, values, lens = _gather_context(k_cache, v_cache, block_tables, context_lens)
    grouped = q.view(batch, kv_heads, q_heads // kv_heads, head_dim)  # the query heads sharing a kv head
    # Keys as [B, Hk, L, D] (one copy that keeps D innermost), multiplied transposed: BLAS takes a
    # transposed operand as it is, where a [B, Hk, D, L] copy was 5x slower (bench/RESULTS.md).
    keys = keys.transpose(1, 2).contiguous()
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).mul_(scale)  # [B, Hk, G, L]
    mask = _padding_mask(lens, context_lens)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    probs = scores.float().softmax(-1).to(q.dtype)
    return torch.matmul(probs, values.transpose(1, 2)).view(batch, q_heads, head_dim)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(batch: int, kv_heads: int, head_dim: int, max_context: int, sm_count: int) -> int:
    """Splits per (sequence, kv head), from static shapes only: enough programs to fill the SMs
    with one wave when every sequence is long, no more than the widest table holds tiles."""
    to_fill = PROGRAMS_PER_SM * sm_count // (batch * kv_heads)
    return max(1, min(to_fill, cdiv(max_context, _block_n(head_dim)), MAX_SPLITS))


def _block_n(head_dim: int) -> int:
    return 64 if head_dim >= 128 else 128  # tokens per tile: K and V tiles of 16 KB in bf16


def paged_decode_attention_launches(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, out: torch.Tensor, num_splits: int,
) -> list[Launch]:
    """Stage 1 (and, with several splits, stage 2) writing attention to `out` ([B, Hq, D]).

    Nothing here reads a context length: the launches stay valid for any lengths that the
    tensors later hold (up to the table's width), which is what a CUDA graph replays.
    """
    check_layout("paged_decode_attention", q, k_cache, v_cache, out)
    batch, q_heads, head_dim = q.shape
    lse = torch.empty(batch, q_heads, num_splits, dtype=torch.float32, device=q.device)
    split_args = (q, k_cache, v_cache, block_tables, context_lens, scale, lse)
    if num_splits == 1:  # stage 1 writes the output itself
        return [_split_launch(*split_args, out)]
    partial = torch.empty(batch, q_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    return [_split_launch(*split_args, partial), _merge_launch(partial, lse, out, context_lens)]


def _split_launch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, lse: torch.Tensor, partial: torch.Tensor,
) -> Launch:
    """Stage 1; `partial` is [B, Hq, splits, D] fp32, or the output [B, Hq, D] when there is one split."""
    _, block_size, kv_heads, head_dim = k_cache.shape
    group = q.shape[1] // kv_heads
    return Launch(_decode_split_kernel, (q.shape[0], kv_heads, lse.shape[2]), dict(
        q_ptr=q, k_cache_ptr=k_cache, v_cache_ptr=v_cache, block_tables_ptr=block_tables,
        context_lens_ptr=context_lens, partial_out_ptr=partial, partial_lse_ptr=lse,
        scale_log2=scale * math.log2(math.e), num_splits=lse.shape[2],
        q_stride_seq=q.stride(0), q_stride_head=q.stride(1), cache_stride_block=k_cache.stride(0),
        cache_stride_slot=k_cache.stride(1), cache_stride_head=k_cache.stride(2), table_stride=block_tables.stride(0),
        out_stride_seq=partial.stride(0), out_stride_head=partial.stride(1),
        out_stride_split=partial.stride(2) if partial.dim() == 4 else 0,
        lse_stride_seq=lse.stride(0), lse_stride_head=lse.stride(1),
        GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_N=_block_n(head_dim), FP32_DOT=q.dtype == torch.float32 or (interpreting() and q.dtype == torch.bfloat16),
    ), num_warps=4)


def _merge_launch(partial: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, context_lens: torch.Tensor) -> Launch:
    """Stage 2: one program per (sequence, query head) over the contiguous [splits, D] partials."""
    batch, q_heads, num_splits, head_dim = partial.shape
    return Launch(_merge_splits_kernel, (batch, q_heads), dict(
        partial_out_ptr=partial, partial_lse_ptr=lse, out_ptr=out, context_lens_ptr=context_lens,
        num_splits=num_splits, partial_stride_seq=partial.stride(0), partial_stride_head=partial.stride(1),
        lse_stride_seq=lse.stride(0), lse_stride_head=lse.stride(1), out_stride_seq=out.stride(0),
        out_stride_head=out.stride(1), HEAD_DIM=head_dim, SPLITS_CHUNK=SPLITS_CHUNK,
        BLOCK_N=_block_n(head_dim),
    ), num_warps=4)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Returns out [B, Hq, D]: softmax(q·K * scale)·V over each sequence's cached tokens."""
    if not use_triton(q, "decode_attention"):
        return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale)
    batch, _, head_dim = q.shape
    max_context = block_tables.shape[1] * k_cache.shape[1]
    num_splits = choose_num_splits(batch, k_cache.shape[2], head_dim, max_context, _sm_count(q.device))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    for launch in paged_decode_attention_launches(q, k_cache, v_cache, block_tables, context_lens, scale, out, num_splits):
        launch()
    return out
