"""A kernel plug-in: RMSNorm in plain torch, as the README's "Bring your own kernel" shows it.

    nanoserve generate --kernels rms_norm=tests.plugins.rms_norm_torch:rms_norm "Hello"

It keeps the contract of `nanoserve_kernels.rms_norm`: x [..., H] (any leading shape; the last dimension
contiguous, the rest possibly strided), weight [H], a new tensor back in x's dtype. Statistics in
fp32, the normalised value cast back to x's dtype, then times the weight, as HF's Qwen3RMSNorm.
"""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)
