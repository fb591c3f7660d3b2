"""nanoserve's ops: Triton kernels on CUDA, torch references on CPU, or plug-ins (see `nanoserve_kernels.backend`).

This package imports only torch and triton; it knows nothing of models or requests.
"""

from nanoserve_kernels.backend import get_backend, set_backend  # first: it picks the interpreter before any kernel is defined
from nanoserve_kernels.backend import load_environment_plugins
from nanoserve_kernels.ops import (  # each the built-in op, or the plug-in that the kernel spec names for it
    apply_rope,
    apply_token_bitmask_,
    attention_frontend,
    fused_add_rms_norm,
    paged_decode_attention,
    paged_prefill_attention,
    rms_norm,
    store_kv,
)
from nanoserve_kernels.rope import build_cos_sin_cache

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

load_environment_plugins()  # last: a plug-in module may import nanoserve_kernels
