"""Out-of-bounds canaries for the attention kernels: the interpreter does not fault on a read past
a tensor, so the tests put NaN wherever a wrong read would land and check that none arrives.

Block tables and context lengths come as views into larger buffers, as the model passes them (a
mixed step hands prefill `block_tables[d:]` and `context_lens[d:]`; a graph runner's tables are
rows of a wider buffer). Every entry of those buffers outside the view, and every table entry past
a sequence's context, names a block filled with NaN; the lengths outside the view are as long as
the buffer is wide; the slots of a context's last block past its end hold NaN too. A kernel that
reads a row past its width, the wrong row, the wrong length, or a slot past the context returns
NaN, or a result that differs from the torch reference run on compact copies of the same inputs.
"""

import random

import pytest
import torch

import nanoserve_kernels
from nanoserve_kernels._triton import cdiv
from nanoserve_kernels.decode_attention import paged_decode_attention_launches, paged_decode_attention_reference
from nanoserve_kernels.prefill_attention import paged_prefill_attention_reference
from tests.kernels.common import assert_close, nan_like, randn

MARGIN_ROWS, MARGIN_COLUMNS = 2, 3  # rows before and after the view, columns past its width


def _canary_inputs(contexts: list[int], kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype):
    """(k_cache, v_cache, block_tables view, context_lens view): each context in random blocks of
    its own, NaN in every slot outside a context and in the canary blocks everything else names."""
    needed = [cdiv(c, block_size) for c in contexts]
    num_canaries = 4
    num_blocks = sum(needed) + num_canaries
    order = torch.randperm(num_blocks).tolist()
    owned, canaries = order[: sum(needed)], order[sum(needed) :]
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    width, rows = max(needed), len(contexts)
    buffer = torch.tensor(random.choices(canaries, k=(rows + 2 * MARGIN_ROWS) * (width + MARGIN_COLUMNS)),
                          dtype=torch.int32).view(rows + 2 * MARGIN_ROWS, width + MARGIN_COLUMNS)
    tables = buffer[MARGIN_ROWS : MARGIN_ROWS + rows, :width]
    for seq, (context, count) in enumerate(zip(contexts, needed)):
        blocks, owned = owned[:count], owned[count:]
        tables[seq, :count] = torch.tensor(blocks, dtype=torch.int32)
        for i, block in enumerate(blocks):
            used = min(block_size, context - i * block_size)  # the last block's tail stays NaN
            k_cache[block, :used], v_cache[block, :used] = (randn(used, kv_heads, head_dim, dtype=dtype) for _ in "kv")
    lens_buffer = torch.full((rows + 2 * MARGIN_ROWS,), (width + MARGIN_COLUMNS) * block_size, dtype=torch.int32)
    context_lens = lens_buffer[MARGIN_ROWS : MARGIN_ROWS + rows]
    context_lens.copy_(torch.tensor(contexts, dtype=torch.int32))
    assert not tables.is_contiguous() and context_lens.storage_offset() == MARGIN_ROWS
    return k_cache, v_cache, tables, context_lens


def _compact(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.clone(memory_format=torch.contiguous_format) for t in tensors]


def _finite_and_close(out: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.isfinite(out).all(), "a read past the inputs' bounds reached a NaN canary"
    assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_attention_reads_only_inside_views_of_its_tables_and_lengths(triton_backend, dtype):
    contexts = [1, 16, 17, 77, 40]
    k_cache, v_cache, tables, context_lens = _canary_inputs(contexts, 2, 64, 16, dtype)
    q = randn(len(contexts), 8, 64, dtype=dtype)
    expected = paged_decode_attention_reference(q, k_cache, v_cache, *_compact(tables, context_lens), 0.125)
    _finite_and_close(nanoserve_kernels.paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 0.125), expected)
    for splits in (1, 3):
        out = nan_like(q)
        for launch in paged_decode_attention_launches(q, k_cache, v_cache, tables, context_lens, 0.125, out, splits):
            launch()
        _finite_and_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_attention_reads_only_inside_views_of_its_tables_and_lengths(triton_backend, dtype):
    # Fresh prompts and chunks over cached prefixes; the query offsets are a view too.
    query_lens, cached = [13, 1, 20, 9], [0, 37, 16, 64]
    contexts = [q + c for q, c in zip(query_lens, cached)]
    k_cache, v_cache, tables, context_lens = _canary_inputs(contexts, 2, 64, 16, dtype)
    starts = [0, *torch.tensor(query_lens).cumsum(0).tolist()]
    loc_buffer = torch.tensor([0, *starts, 10**6, 10**6], dtype=torch.int32)
    query_start_loc = loc_buffer[1 : len(starts) + 1]
    q = randn(sum(query_lens), 4, 64, dtype=dtype)
    args = (k_cache, v_cache, tables, query_start_loc, context_lens, max(query_lens), 0.125)
    expected = paged_prefill_attention_reference(
        q, None, None, k_cache, v_cache, *_compact(tables, query_start_loc, context_lens), max(query_lens), 0.125)
    _finite_and_close(nanoserve_kernels.paged_prefill_attention(q, None, None, *args), expected)
