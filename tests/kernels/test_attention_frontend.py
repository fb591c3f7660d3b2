"""The fused attention front-end (q/k norm, RoPE, cache store in one launch) against the unfused
torch references run in sequence, through the interpreter on CPU."""

import pytest
import torch

import nanoserve_kernels
from nanoserve_kernels.attention_frontend import attention_frontend_launch, attention_frontend_reference, attention_frontend_torch
from nanoserve_kernels.rope import build_cos_sin_cache
from tests.kernels.common import DTYPE_IDS, DTYPES, TOLERANCES, nan_like, randn

EPS = 1e-6
MAX_POSITION = 4096


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Per-dtype tolerances; bf16 allows three ulps of the largest value. q and k are rounded three
    times (normed value, times the weight, rotated), as the references round them, and the
    interpreter truncates bf16 where the GPU rounds. The rotation mixes two values per output,
    so an output near zero inherits its partners' errors: hence ulps of the largest, not its own."""
    assert actual.dtype == expected.dtype
    tolerance = TOLERANCES[expected.dtype]
    if expected.dtype == torch.bfloat16:
        tolerance = dict(rtol=3 * 2**-7, atol=3 * 2**-7 * expected.abs().max().item())
    torch.testing.assert_close(actual, expected, **tolerance)


def _inputs(tokens: int, q_heads: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype):
    """QKV rows as a strided view (wider rows than it uses), NaN caches, slots with padding (-1)."""
    width = (q_heads + 2 * kv_heads) * head_dim
    qkv = randn(tokens, width + 16, dtype=dtype, scale=3)[:, 8 : 8 + width]
    weights = randn(head_dim, dtype=dtype), randn(head_dim, dtype=dtype)
    positions = torch.randint(0, MAX_POSITION, (tokens,))
    positions[0], positions[-1] = 0, MAX_POSITION - 1  # both ends of the cos/sin table
    num_blocks = tokens // block_size + 2
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    slots[1::3] = -1
    cache = torch.full((num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype)
    cos_sin = build_cos_sin_cache(MAX_POSITION, head_dim, 1e6)
    return qkv, *weights, EPS, positions, cos_sin, cache, cache.clone(), slots


def _assert_caches(k_cache, v_cache, want_k, want_v, slots) -> None:
    """Stored slots as the reference stored them (V bit for bit), every other slot still NaN."""
    flat = [c.flatten(0, 1) for c in (k_cache, v_cache, want_k, want_v)]
    stored = slots[slots >= 0]
    assert_close(flat[0][stored], flat[2][stored])
    assert torch.equal(flat[1][stored], flat[3][stored])
    untouched = torch.ones(flat[0].shape[0], dtype=torch.bool)
    untouched[stored] = False
    assert flat[0][untouched].isnan().all() and flat[1][untouched].isnan().all()


# (tokens, q heads, kv heads, head_dim, block size): odd token counts, GQA 1..8, head_dim 64/128.
SHAPES = [(1, 2, 2, 64, 16), (7, 8, 2, 128, 16), (13, 10, 2, 64, 8), (5, 40, 8, 128, 16), (9, 8, 1, 128, 4),
          (6, 6, 2, 64, 32), (11, 14, 2, 128, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-Hq{}-Hk{}-D{}-bs{}".format(*s))
def test_frontend_matches_unfused_references(shape, dtype):
    args = _inputs(*shape, dtype)
    qkv, *rest, k_cache, v_cache, slots = args
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q, _, _ = attention_frontend_reference(qkv.clone(), *rest, want_k, want_v, slots)
    q = nan_like(want_q)
    qkv_before = qkv.clone()
    attention_frontend_launch(*args, q)()
    assert_close(q, want_q)
    _assert_caches(k_cache, v_cache, want_k, want_v, slots)
    assert torch.equal(qkv, qkv_before)  # the projection output is only read


def test_public_frontend_returns_q_and_writes_the_cache(triton_backend):
    args = _inputs(5, 8, 2, 64, 16, torch.bfloat16)
    qkv, *rest, k_cache, v_cache, slots = args
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q, _, _ = attention_frontend_reference(qkv, *rest, want_k, want_v, slots)
    q, k, v = nanoserve_kernels.attention_frontend(*args)
    assert k is None and v is None  # the kernel writes k and v into the cache only
    assert_close(q, want_q)
    _assert_caches(k_cache, v_cache, want_k, want_v, slots)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-Hq{}-Hk{}-D{}-bs{}".format(*s))
def test_cpu_frontend_gives_the_references_results_bit_for_bit(shape, dtype):
    """The CPU form (q and k normed and rotated together) against the references in sequence:
    the same q, k and v, contiguous, and the same cache contents, every bit (padding slots too)."""
    qkv, *rest, k_cache, v_cache, slots = _inputs(*shape, dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = attention_frontend_reference(qkv, *rest, want_k, want_v, slots)
    got = attention_frontend_torch(qkv, *rest, k_cache, v_cache, slots)
    for ours, theirs in zip(got, want):
        assert ours.is_contiguous() == theirs.is_contiguous() and torch.equal(ours, theirs)
    assert torch.equal(k_cache.nan_to_num(), want_k.nan_to_num()) and torch.equal(v_cache.nan_to_num(), want_v.nan_to_num())
    assert k_cache.isnan().sum() == want_k.isnan().sum() > 0  # the untouched slots are still NaN


def test_reference_returns_k_and_v_as_stored():
    qkv, *rest, k_cache, v_cache, slots = _inputs(6, 4, 2, 64, 16, torch.float32)
    q, k, v = nanoserve_kernels.attention_frontend(qkv, *rest, k_cache, v_cache, slots)
    assert q.shape == (6, 4, 64) and k.shape == v.shape == (6, 2, 64)
    stored = slots >= 0
    assert torch.equal(k_cache.flatten(0, 1)[slots[stored]], k[stored])
    assert torch.equal(v_cache.flatten(0, 1)[slots[stored]], v[stored])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_frontend_at_qwen3_8b_shape(dtype):
    args = _inputs(257, 32, 8, 128, 16, dtype)
    qkv, *rest, k_cache, v_cache, slots = args
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want_q, _, _ = attention_frontend_reference(qkv, *rest, want_k, want_v, slots)
    q = nan_like(want_q)
    attention_frontend_launch(*args, q)()
    assert_close(q, want_q)
    _assert_caches(k_cache, v_cache, want_k, want_v, slots)
