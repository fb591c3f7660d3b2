"""The public ops: each runs its plug-in when the kernel spec names one (`nanoserve_kernels.backend.PLUGINS`),
else the built-in (Triton kernel or torch reference, as `use_triton` decides).

A plug-in is called with exactly the arguments the built-in gets, so nothing else changes: the
same call sites, the same CUDA-graph captures (a capture records whatever the plug-in launches).
Without plug-ins each op costs one truth test of an empty dict before the built-in.
Two ops reach further than their own function:
- `rms_norm` also serves `fused_add_rms_norm`: the residual add runs in torch (in the input
  dtype, as HF adds), then the plug-in normalises the sum.
- A plug-in for `rms_norm`, `rope` or `store_kv` runs the attention front-end unfused (q and k
  norm, RoPE, the K/V store, each through its op here), since the fused front-end would otherwise
  do that op's work without it; a plug-in for `attention_frontend` itself, or a backend named for
  it (`attention_frontend=triton`), keeps it fused.
"""

import torch

from nanoserve_kernels.attention_frontend import attention_frontend as builtin_attention_frontend
from nanoserve_kernels.attention_frontend import unfused_attention_frontend
from nanoserve_kernels.decode_attention import paged_decode_attention as builtin_decode_attention
from nanoserve_kernels.prefill_attention import paged_prefill_attention as builtin_prefill_attention
from nanoserve_kernels.rms_norm import fused_add_rms_norm as builtin_fused_add_rms_norm
from nanoserve_kernels.rms_norm import rms_norm as builtin_rms_norm
from nanoserve_kernels.rope import apply_rope as builtin_apply_rope
from nanoserve_kernels.store_kv import store_kv as builtin_store_kv
from nanoserve_kernels.token_bitmask import apply_token_bitmask_ as builtin_apply_token_bitmask_
from nanoserve_kernels.backend import PLUGINS, overridden

UNFUSE_FRONTEND = ("rms_norm", "rope", "store_kv")  # ops whose plug-in runs the front-end unfused


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of `x` ([..., H]); returns a new tensor."""
    if PLUGINS and "rms_norm" in PLUGINS:
        return PLUGINS["rms_norm"](x, weight, eps)
    return builtin_rms_norm(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    if PLUGINS and "rms_norm" in PLUGINS:
        residual_out = x + residual
        return PLUGINS["rms_norm"](residual_out, weight, eps), residual_out
    return builtin_fused_add_rms_norm(x, residual, weight, eps)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq, D] and k [T, Hk, D] at `positions` [T]; returns (q, k) (the built-in rotates in place)."""
    if PLUGINS and "rope" in PLUGINS:
        return PLUGINS["rope"](q, k, positions, cos_sin_cache)
    return builtin_apply_rope(q, k, positions, cos_sin_cache)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [T, Hk, D] go to the cache slots in `slot_mapping` [T] (int64; -1 skips the token)."""
    if PLUGINS and "store_kv" in PLUGINS:
        PLUGINS["store_kv"](k, v, k_cache, v_cache, slot_mapping)
        return
    builtin_store_kv(k, v, k_cache, v_cache, slot_mapping)


def attention_frontend(
    qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, eps: float,
    positions: torch.Tensor, cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """q-norm, k-norm, RoPE at `positions` and the K/V cache store for qkv [T, (Hq + 2Hk) * D];
    returns (q, k, v) as `nanoserve_kernels.attention_frontend.attention_frontend` does."""
    args = (qkv, q_norm_weight, k_norm_weight, eps, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    if PLUGINS:
        plugin = PLUGINS.get("attention_frontend")
        if plugin is not None:
            return plugin(*args)
        if not overridden("attention_frontend") and any(op in PLUGINS for op in UNFUSE_FRONTEND):
            return _unfused_frontend(*args)
    return builtin_attention_frontend(*args)


def _unfused_frontend(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The front-end through the dispatching ops, so a norm, RoPE or store plug-in sees every call."""
    return unfused_attention_frontend(rms_norm, apply_rope, store_kv, *args)


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Returns out [B, Hq, D]: softmax(q·K * scale)·V over each sequence's cached tokens."""
    if PLUGINS and "decode_attention" in PLUGINS:
        return PLUGINS["decode_attention"](q, k_cache, v_cache, block_tables, context_lens, scale)
    return builtin_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def paged_prefill_attention(
    q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, query_start_loc: torch.Tensor, context_lens: torch.Tensor, max_query_len: int,
    scale: float,
) -> torch.Tensor:
    """Returns out [T, Hq, D]: causal attention of each sequence's new tokens over its whole context."""
    args = (q, k, v, k_cache, v_cache, block_tables, query_start_loc, context_lens, max_query_len, scale)
    if PLUGINS and "prefill_attention" in PLUGINS:
        return PLUGINS["prefill_attention"](*args)
    return builtin_prefill_attention(*args)


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """logits [B, V] fp32 (in place); bitmask [R, ceil(V / 32)] int32; rows [R] int64: the logits row
    each mask row applies to."""
    if PLUGINS and "token_bitmask" in PLUGINS:
        PLUGINS["token_bitmask"](logits, bitmask, rows)
        return
    builtin_apply_token_bitmask_(logits, bitmask, rows)
