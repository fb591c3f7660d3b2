"""The Triton RoPE kernel against its torch reference: in place, on strided q/k views."""

import pytest
import torch

import nanoserve_kernels
from nanoserve_kernels.rope import apply_rope_launch, apply_rope_reference, build_cos_sin_cache
from tests.kernels.common import DTYPE_IDS, DTYPES, assert_close, randn

MAX_POSITION = 4096


def _split_qkv(qkv: torch.Tensor, q_heads: int, kv_heads: int, head_dim: int):
    """q [T, Hq, D] and k [T, Hk, D] views of a fused QKV output (token rows strided)."""
    q, k, _ = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return q.view(len(qkv), q_heads, head_dim), k.view(len(qkv), kv_heads, head_dim)


def _positions(tokens: int) -> torch.Tensor:
    positions = torch.randint(0, MAX_POSITION, (tokens,))
    positions[0], positions[-1] = 0, MAX_POSITION - 1  # both ends of the table
    return positions


# (tokens, q heads, kv heads, head_dim): odd token counts, GQA 1/4/5/8, head_dim 64/128.
SHAPES = [(1, 2, 2, 64), (7, 8, 2, 128), (13, 10, 2, 64), (5, 40, 8, 128), (3, 8, 1, 128)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-Hq{}-Hk{}-D{}".format(*s))
def test_rope_on_qkv_views_matches_reference(shape, dtype):
    tokens, q_heads, kv_heads, head_dim = shape
    cache = build_cos_sin_cache(MAX_POSITION, head_dim, 1e6)
    qkv = randn(tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, scale=2)
    q, k = _split_qkv(qkv, q_heads, kv_heads, head_dim)
    positions = _positions(tokens)
    expected = qkv.clone()
    apply_rope_reference(*_split_qkv(expected, q_heads, kv_heads, head_dim), positions, cache)

    apply_rope_launch(q, k, positions, cache)()
    want_q, want_k = _split_qkv(expected, q_heads, kv_heads, head_dim)
    assert_close(q, want_q)
    assert_close(k, want_k)
    v_start = (q_heads + kv_heads) * head_dim
    assert torch.equal(qkv[:, v_start:], expected[:, v_start:])  # v, beside them, untouched


def test_public_apply_rope_rotates_in_place(triton_backend):
    cache = build_cos_sin_cache(MAX_POSITION, 64, 1e4)
    q, k = randn(9, 4, 64, dtype=torch.float32), randn(9, 2, 64, dtype=torch.float32)
    want_q, want_k = q.clone(), k.clone()
    positions = _positions(9)
    apply_rope_reference(want_q, want_k, positions, cache)
    out_q, out_k = nanoserve_kernels.apply_rope(q, k, positions, cache)
    assert out_q is q and out_k is k
    assert_close(q, want_q)
    assert_close(k, want_k)


def test_rope_refuses_a_layout_it_cannot_rotate_in_place():
    cache = build_cos_sin_cache(16, 64, 1e4)
    q = randn(64, 3, dtype=torch.float32).t().unsqueeze(1).expand(3, 2, 64)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        apply_rope_launch(q, q, torch.zeros(3, dtype=torch.int64), cache)


@pytest.mark.parametrize("tokens_per_program,num_warps", [(4, 1), (3, 4)])
def test_rope_with_several_tokens_per_program(tokens_per_program, num_warps):
    """The configurations `bench.kernels --sweep` times; 13 tokens leave a partial last program."""
    cache = build_cos_sin_cache(MAX_POSITION, 128, 1e6)
    qkv = randn(13, (8 + 2 * 2) * 128, dtype=torch.bfloat16, scale=2)
    positions = _positions(13)
    expected = qkv.clone()
    apply_rope_reference(*_split_qkv(expected, 8, 2, 128), positions, cache)
    apply_rope_launch(*_split_qkv(qkv, 8, 2, 128), positions, cache, tokens_per_program, num_warps)()
    assert_close(qkv, expected)
