"""nanoserve's ops: Triton kernels on CUDA, torch references on CPU (see `kernels.backend`).

This package imports only torch and triton; it knows nothing of models or requests.
"""

from kernels.backend import get_backend, set_backend  # first: it picks the interpreter before any kernel is defined
from kernels.attention_frontend import attention_frontend
from kernels.decode_attention import paged_decode_attention
from kernels.prefill_attention import paged_prefill_attention
from kernels.rms_norm import fused_add_rms_norm, rms_norm
from kernels.rope import apply_rope, build_cos_sin_cache
from kernels.store_kv import store_kv
from kernels.token_bitmask import apply_token_bitmask_

__all__ = [
    "apply_token_bitmask_",
    "apply_rope",
    "attention_frontend",
    "build_cos_sin_cache",
    "fused_add_rms_norm",
    "get_backend",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "set_backend",
    "store_kv",
]
