"""Paged prefill attention (the Triton kernel through the interpreter on CPU, and the torch
reference) against attention spelled out in float64, one sequence at a time."""

import random

import pytest
import torch

from nanoserve_kernels import paged_prefill_attention
from nanoserve_kernels.prefill_attention import paged_prefill_attention_grouped
from tests.kernels.common import DTYPE_IDS, DTYPES, assert_close, kernel_backend, randn

# How the tests call the op: the torch reference with the new tokens' k/v and without them (read
# from the cache), the Triton kernel (which reads everything from the cache), and the grouped-matmul
# form the CPU plan may choose for verification windows, both ways.
IMPLS = {"reference": ("torch", True), "reference-no-kv": ("torch", False), "triton": ("triton", False),
         "grouped": ("grouped", True), "grouped-no-kv": ("grouped", False)}


def _expected(q, keys, values, num_cached, scale):
    """q [n, Hq, D] at positions num_cached.., keys/values [context, Hk, D]: causal softmax attention."""
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    visible = torch.arange(num_cached, num_cached + q.shape[0])[:, None] >= torch.arange(keys.shape[0])[None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _case(query_lens, cached_lens, q_heads, kv_heads, head_dim, block_size, dtype, seed=0):
    """A batch whose sequences' whole contexts are in a shuffled paged cache, NaN elsewhere."""
    rng = random.Random(seed)
    contexts = [c + n for c, n in zip(cached_lens, query_lens)]
    widths = [-(-c // block_size) for c in contexts]
    num_blocks = sum(widths) + 3
    order = rng.sample(range(num_blocks), sum(widths))
    tables, at = [], 0
    for width in widths:
        tables.append(order[at : at + width])
        at += width
    table_tensor = torch.tensor([t + [0] * (max(widths) - len(t)) for t in tables], dtype=torch.int32)
    # NaN in every slot no sequence owns: reading past a context (or weighting such a slot by 0) fails.
    k_cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    keys = [randn(c, kv_heads, head_dim, dtype=dtype) for c in contexts]
    values = [randn(c, kv_heads, head_dim, dtype=dtype) for c in contexts]
    for table, key, value in zip(tables, keys, values):
        for pos in range(key.shape[0]):
            k_cache[table[pos // block_size], pos % block_size] = key[pos]
            v_cache[table[pos // block_size], pos % block_size] = value[pos]
    q = randn(sum(query_lens), q_heads, head_dim, dtype=dtype)
    k_new = torch.cat([key[c:] for key, c in zip(keys, cached_lens)])
    v_new = torch.cat([value[c:] for value, c in zip(values, cached_lens)])
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    args = (q, k_new, v_new, k_cache, v_cache, table_tensor, starts, torch.tensor(contexts, dtype=torch.int32),
            max(query_lens), head_dim**-0.5)
    expected = torch.cat([
        _expected(q[starts[s] : starts[s + 1]], keys[s], values[s], cached_lens[s], head_dim**-0.5)
        for s in range(len(query_lens))
    ])
    return args, expected.to(dtype)


def _run(impl: str, args: tuple) -> torch.Tensor:
    backend, with_kv = IMPLS[impl]
    q, k, v, *rest = args
    if backend == "grouped":
        return paged_prefill_attention_grouped(q, k if with_kv else None, v if with_kv else None, *rest)
    with kernel_backend(backend):
        return paged_prefill_attention(q, k if with_kv else None, v if with_kv else None, *rest)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 128), (10, 2, 64), (8, 1, 64)])
def test_prefill_attention_matches_spelled_out_attention(impl, dtype, q_heads, kv_heads, head_dim):
    # Fresh prompts and prompts over cached prefixes of 0..3 blocks, chunks starting and ending
    # inside blocks, odd lengths.
    query_lens = [13, 1, 20, 7, 16]
    cached_lens = [0, 37, 16, 5, 48]
    args, expected = _case(query_lens, cached_lens, q_heads, kv_heads, head_dim, 16, dtype)
    assert_close(_run(impl, args), expected)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_prefill_attention_any_block_size(impl, block_size):
    args, expected = _case([9, 33], [23, 4], 4, 2, 64, block_size, torch.float32, seed=block_size)
    assert_close(_run(impl, args), expected)


@pytest.mark.parametrize("group", [1, 2, 3, 6, 7])
def test_triton_prefill_every_gqa_group(group):
    # With the groups above: 1, 2, 3, 4, 5, 6, 7, 8 query heads per kv head.
    args, expected = _case([11, 30, 5], [0, 19, 64], 2 * group, 2, 64, 16, torch.bfloat16, seed=group)
    assert_close(_run("triton", args), expected)


@pytest.mark.parametrize("group,dtype", [(1, torch.float32), (4, torch.bfloat16)], ids=["G1-fp32", "G4-bf16"])
def test_triton_prefill_over_several_query_and_key_tiles(group, dtype):
    # Query tiles of 128 // group tokens and key tiles of 64: prompts that cross several of both,
    # with chunks that start on, just after and just before a tile boundary.
    query_lens, cached_lens = [150, 70, 129, 1], [0, 64, 127, 200]
    args, expected = _case(query_lens, cached_lens, 2 * group, 2, 128, 16, dtype, seed=group)
    assert_close(_run("triton", args), expected)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_triton_prefill_at_qwen3_8b_heads(dtype):
    args, expected = _case([700, 333], [0, 1500], 32, 8, 128, 16, dtype)
    assert_close(_run("triton", args), expected)
