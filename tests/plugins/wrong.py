"""Deliberately wrong plug-ins, for the tests: each off by a small factor in one op."""

import torch

from nanoserve_kernels.decode_attention import paged_decode_attention_reference
from nanoserve_kernels.rms_norm import rms_norm_reference

FACTOR = 1.01  # 1 %: past every fp32 tolerance, small enough to look like a rounding question


def scaled_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_reference(x, weight * FACTOR, eps)


def scaled_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale):
    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, scale) * FACTOR


def raising_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    raise NotImplementedError("only head_dim 128")
