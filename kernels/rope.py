"""Rotary position embeddings, NeoX style (rotate the two halves of each head), as in Qwen3.

The cos/sin table is fp32 `[max_position, head_dim]`: the first half of a row holds
`cos(pos * inv_freq)`, the second half `sin(pos * inv_freq)`, with
`inv_freq = theta ** (-arange(0, D, 2) / D)`. The rotation runs in fp32 and is cast back.
"""

import torch


def build_cos_sin_cache(max_position: int, head_dim: int, theta: float, device=None) -> torch.Tensor:
    # Computed like HF's default rope init (1 / theta**(i/D) in fp32) so fp32 logits match bit-closely.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    positions = torch.arange(max_position, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    half = q.shape[-1] // 2
    cos_sin = cos_sin_cache[positions].unsqueeze(1)  # [T, 1, D]
    cos, sin = cos_sin[..., :half], cos_sin[..., half:]
    q.copy_(_rotate(q, cos, sin))
    k.copy_(_rotate(k, cos, sin))
    return q, k


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q [T, Hq, D] and k [T, Hk, D] in place at `positions` [T]; returns (q, k)."""
    return apply_rope_reference(q, k, positions, cos_sin_cache)
