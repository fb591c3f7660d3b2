"""RMSNorm, plain and fused with the residual add, with HF Qwen3 numerics.

Statistics in fp32, normalised values cast back to the input dtype, then multiplied by the
weight (in the weight's dtype), exactly as `Qwen3RMSNorm` does it. The fused variant adds the
residual in the input dtype first (as HF's decoder layer does) and returns both results.
"""

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)
    return weight * (xf * torch.rsqrt(variance + eps)).to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    residual_out = x + residual
    return rms_norm_reference(residual_out, weight, eps), residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of `x` ([..., H]); returns a new tensor."""
    return rms_norm_reference(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    return fused_add_rms_norm_reference(x, residual, weight, eps)
