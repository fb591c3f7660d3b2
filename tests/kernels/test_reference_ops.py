"""The torch reference ops against independent float64 formulas, on random inputs."""

import math

import pytest
import torch

from nanoserve_kernels.decode_attention import paged_decode_attention_grouped, paged_decode_attention_reference
from nanoserve_kernels.rms_norm import fused_add_rms_norm_reference, rms_norm_reference
from nanoserve_kernels.rope import apply_rope_reference, build_cos_sin_cache
from nanoserve_kernels.store_kv import store_kv_reference


def test_rms_norm_reference():
    x = torch.randn(7, 3, 96) * 3
    w = torch.randn(96)
    expected = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w.double()
    torch.testing.assert_close(rms_norm_reference(x, w, 1e-6).double(), expected, rtol=1e-5, atol=1e-5)


def test_fused_add_rms_norm_reference():
    x, residual, w = torch.randn(5, 64), torch.randn(5, 64), torch.randn(64)
    out, new_residual = fused_add_rms_norm_reference(x, residual, w, 1e-5)
    total = x.double() + residual.double()
    torch.testing.assert_close(new_residual.double(), total)
    expected = total / (total.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_cos_sin_cache_layout():
    cache = build_cos_sin_cache(50, 16, 10000.0)
    assert cache.shape == (50, 16) and cache.dtype == torch.float32
    pos, i = 37, 3
    angle = pos * 10000.0 ** (-2 * i / 16)
    assert cache[pos, i].item() == pytest.approx(math.cos(angle), abs=1e-5)
    assert cache[pos, 8 + i].item() == pytest.approx(math.sin(angle), abs=1e-5)


def test_rope_reference_is_a_complex_rotation():
    """NeoX halves (x1, x2) rotate like the complex number x1 + i*x2 times e^(i*angle)."""
    tokens, heads, dim = 9, 3, 32
    q, k = torch.randn(tokens, heads, dim), torch.randn(tokens, 2, dim)
    positions = torch.randint(0, 100, (tokens,))
    cache = build_cos_sin_cache(100, dim, 1e6)
    inv_freq = 1e6 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    rotation = torch.polar(torch.ones(tokens, dim // 2, dtype=torch.float64), positions[:, None].double() * inv_freq)

    def expected(x):
        z = torch.complex(x[..., : dim // 2].double(), x[..., dim // 2 :].double()) * rotation[:, None, :]
        return torch.cat([z.real, z.imag], dim=-1)

    want_q, want_k = expected(q), expected(k)
    out_q, out_k = apply_rope_reference(q, k, positions, cache)
    assert out_q is q and out_k is k  # rotated in place
    torch.testing.assert_close(q.double(), want_q, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k.double(), want_k, rtol=1e-4, atol=1e-4)


def test_store_kv_reference_skips_padding_slots():
    blocks, block_size, heads, dim = 5, 4, 2, 8
    k_cache = torch.full((blocks, block_size, heads, dim), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    k, v = torch.randn(6, heads, dim), torch.randn(6, heads, dim)
    slots = torch.tensor([17, 3, -1, 8, 0, -1])
    store_kv_reference(k, v, k_cache, v_cache, slots)
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(k_cache[slot // block_size, slot % block_size], k[t])
            assert torch.equal(v_cache[slot // block_size, slot % block_size], v[t])
    assert k_cache.isnan().flatten(0, 1).all(-1).all(-1).sum() == blocks * block_size - 4


@pytest.mark.parametrize("implementation", [paged_decode_attention_reference, paged_decode_attention_grouped],
                         ids=["sdpa", "grouped"])
@pytest.mark.parametrize("group", [1, 2, 5])
def test_paged_decode_attention_torch_implementations(implementation, group):
    """Both CPU implementations against float64 attention; slots past each sequence's end hold NaN."""
    kv_heads, dim, block_size, blocks = 2, 16, 4, 12
    context_lens = [1, 4, 5, 11]
    q = torch.randn(len(context_lens), kv_heads * group, dim)
    k_cache = torch.randn(blocks, block_size, kv_heads, dim)
    v_cache = torch.randn(blocks, block_size, kv_heads, dim)
    tables = torch.randperm(blocks).view(len(context_lens), 3).int()  # disjoint, shuffled
    for b, n in enumerate(context_lens):
        for p in range(n, 3 * block_size):
            k_cache[tables[b, p // block_size], p % block_size] = float("nan")
            v_cache[tables[b, p // block_size], p % block_size] = float("nan")
    out = implementation(q, k_cache, v_cache, tables, torch.tensor(context_lens, dtype=torch.int32), 0.3)
    for b, n in enumerate(context_lens):
        slots = [(tables[b, p // block_size].item(), p % block_size) for p in range(n)]
        keys = torch.stack([k_cache[blk, off] for blk, off in slots]).double()  # [n, Hk, D]
        values = torch.stack([v_cache[blk, off] for blk, off in slots]).double()
        for h in range(kv_heads * group):
            scores = keys[:, h // group] @ q[b, h].double() * 0.3
            weights = scores.exp() / scores.exp().sum()
            torch.testing.assert_close(out[b, h].double(), weights @ values[:, h // group], rtol=1e-5, atol=1e-5)
