"""The Triton store_kv kernel against its torch reference: exact copies, padding skipped."""

import pytest
import torch

import nanoserve_kernels
from nanoserve_kernels.store_kv import store_kv_launch, store_kv_reference
from tests.kernels.common import DTYPE_IDS, DTYPES, randn


def _new_kv(tokens: int, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    """k contiguous (as rms_norm returns it) and v a strided view of the fused QKV output."""
    qkv = randn(tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype)
    v = qkv[:, (q_heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    return randn(tokens, kv_heads, head_dim, dtype=dtype), v


def _slots(tokens: int, num_slots: int) -> torch.Tensor:
    slots = torch.randperm(num_slots)[:tokens]
    slots[::4] = -1  # padding tokens, the first among them
    return slots


# (tokens, kv heads, head_dim, block size, blocks): odd counts, 1..8 kv heads, block sizes 1..128.
CASES = [(1, 1, 64, 16, 4), (13, 2, 128, 16, 5), (31, 8, 64, 1, 40), (9, 5, 128, 8, 3), (6, 4, 64, 128, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-Hk{}-D{}-bs{}".format(*c[:4]))
def test_store_kv_matches_reference_exactly(case, dtype):
    tokens, kv_heads, head_dim, block_size, blocks = case
    k, v = _new_kv(tokens, 2 * kv_heads, kv_heads, head_dim, dtype)
    slots = _slots(tokens, blocks * block_size)
    k_cache = torch.full((blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    want_k, want_v = k_cache.clone(), v_cache.clone()
    store_kv_reference(k, v, want_k, want_v, slots)
    store_kv_launch(k, v, k_cache, v_cache, slots)()
    # Equal bit for bit, NaN where nothing was stored.
    torch.testing.assert_close(k_cache, want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, want_v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("tokens_per_program,num_warps", [(4, 1), (3, 2)])
def test_store_kv_with_several_tokens_per_program(tokens_per_program, num_warps):
    """The configurations `bench.kernels --sweep` times; 13 tokens leave a partial last program."""
    k, v = _new_kv(13, 4, 2, 128, torch.bfloat16)
    slots = _slots(13, 5 * 16)
    k_cache = torch.full((5, 16, 2, 128), float("nan"), dtype=torch.bfloat16)
    v_cache = k_cache.clone()
    want_k, want_v = k_cache.clone(), v_cache.clone()
    store_kv_reference(k, v, want_k, want_v, slots)
    store_kv_launch(k, v, k_cache, v_cache, slots, tokens_per_program, num_warps)()
    torch.testing.assert_close(k_cache, want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, want_v, rtol=0, atol=0, equal_nan=True)


def test_public_store_kv(triton_backend):
    k, v = _new_kv(5, 4, 2, 64, torch.bfloat16)
    k_cache = torch.full((3, 4, 2, 64), float("nan"), dtype=torch.bfloat16)
    v_cache = k_cache.clone()
    slots = torch.tensor([11, -1, 0, 5, 4])
    nanoserve_kernels.store_kv(k, v, k_cache, v_cache, slots)
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(k_cache[slot // 4, slot % 4], k[token])
            assert torch.equal(v_cache[slot // 4, slot % 4], v[token])
    assert k_cache.isnan().all(-1).all(-1).sum() == 12 - 4


def test_store_kv_into_a_cache_over_2_31_elements():
    """Slots past 2^31 elements: int32 offsets would wrap and write elsewhere."""
    block_size, kv_heads, head_dim = 16, 1, 128
    blocks = 2**31 // (block_size * kv_heads * head_dim) + 8  # 4 GiB, never touched but for the rows written
    k_cache = torch.empty(blocks, block_size, kv_heads, head_dim, dtype=torch.bfloat16)
    v_cache = torch.empty_like(k_cache)
    k, v = _new_kv(3, 2, kv_heads, head_dim, torch.bfloat16)
    slots = torch.tensor([blocks * block_size - 1, (blocks - 5) * block_size + 3, 7])
    store_kv_launch(k, v, k_cache, v_cache, slots)()
    flat_k, flat_v = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
    assert torch.equal(flat_k[slots], k) and torch.equal(flat_v[slots], v)
