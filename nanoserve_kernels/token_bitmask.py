"""Structured output's last step on the device: tokens a grammar forbids get a logit of -inf.

A grammar engine describes the tokens it allows next as a packed bitmask, one int32 word per 32
tokens (bit j of word w allows token 32 * w + j), one mask row per constrained sequence.
`apply_token_bitmask_(logits, bitmask, rows)` masks logits row `rows[r]` with bitmask row `r` in
place; rows of the batch that are not listed are left alone.

One program per (mask row, block of 32 * WORDS tokens) loads its words once, spreads each over its
32 bits and stores -inf only where a bit is clear: it never reads the logits.
"""

import numpy as np
import torch

from nanoserve_kernels._triton import Launch, cdiv, jit, tl
from nanoserve_kernels.backend import use_triton

WORDS_PER_PROGRAM = 64  # 2048 tokens: 75 programs per row for Qwen3's 151,936-token vocabulary


@jit
def _apply_token_bitmask_kernel(
    logits_ptr, bitmask_ptr, rows_ptr, logits_stride, bitmask_stride, vocab_size, num_words,
    WORDS: tl.constexpr,
):
    mask_row = tl.program_id(0)
    row = tl.load(rows_ptr + mask_row).to(tl.int64)
    words = tl.program_id(1) * WORDS + tl.arange(0, WORDS)
    packed = tl.load(bitmask_ptr + mask_row.to(tl.int64) * bitmask_stride + words, mask=words < num_words, other=-1)
    bits = tl.arange(0, 32)
    forbidden = ((packed[:, None] >> bits[None, :]) & 1) == 0
    tokens = words[:, None] * 32 + bits[None, :]
    out = logits_ptr + row * logits_stride + tokens
    tl.store(out, tl.full((WORDS, 32), float("-inf"), tl.float32), mask=forbidden & (tokens < vocab_size))


def unpack_token_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, ceil(V / 32)] int32 words -> [R, V] bool, True where the token is allowed."""
    bit_values = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=bitmask.device)
    allowed = (bitmask.contiguous().view(torch.uint8).unsqueeze(-1) & bit_values) != 0  # little-endian words
    return allowed.flatten(1)[:, :vocab_size]


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    allowed = unpack_token_bitmask(bitmask, logits.shape[-1])
    logits[rows] = torch.where(allowed, logits[rows], torch.tensor(float("-inf"), dtype=logits.dtype,
                                                                   device=logits.device))


def apply_token_bitmask_host(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """The reference's result for CPU tensors, touching only the words that decide, row by row: a
    grammar mostly allows a few tokens (keep those, fill the rest) or almost all (forbid the few).
    Masking every logit instead costs about ten times the sampler's own pass over the rows."""
    out, words_of, vocab_size = logits.numpy(), bitmask.numpy(), logits.shape[-1]
    for mask_row, row in enumerate(rows.tolist()):
        words = words_of[mask_row]
        some_allowed = np.flatnonzero(words)
        if 2 * len(some_allowed) < len(words):
            keep = _tokens(words, some_allowed, vocab_size, allowed=True)
            kept = out[row, keep]
            out[row].fill(-np.inf)
            out[row, keep] = kept
        else:
            out[row, _tokens(words, np.flatnonzero(words != -1), vocab_size, allowed=False)] = -np.inf


def _tokens(words: np.ndarray, which: np.ndarray, vocab_size: int, allowed: bool) -> np.ndarray:
    """The tokens of words `which` whose bit is set (allowed) or clear (not)."""
    bits = np.unpackbits(words[which].view(np.uint8).reshape(-1, 4), axis=1, bitorder="little").astype(bool)
    found = (which[:, None] * 32 + np.arange(32))[bits if allowed else ~bits]
    return found[found < vocab_size]


def apply_token_bitmask_launch(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> Launch:
    if logits.stride(-1) != 1 or bitmask.stride(-1) != 1 or bitmask.dtype != torch.int32:
        raise ValueError("apply_token_bitmask needs int32 words and rows of logits and words contiguous")
    num_words = bitmask.shape[1]
    if num_words * 32 < logits.shape[1]:
        raise ValueError(f"a bitmask of {num_words} words cannot cover {logits.shape[1]} logits")
    args = dict(
        logits_ptr=logits, bitmask_ptr=bitmask, rows_ptr=rows, logits_stride=logits.stride(0),
        bitmask_stride=bitmask.stride(0), vocab_size=logits.shape[1], num_words=num_words, WORDS=WORDS_PER_PROGRAM,
    )
    return Launch(_apply_token_bitmask_kernel, (rows.shape[0], cdiv(num_words, WORDS_PER_PROGRAM)), args,
                  num_warps=4)


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """logits [B, V] fp32 (in place); bitmask [R, ceil(V / 32)] int32; rows [R] int64: the logits row
    each mask row applies to."""
    if not use_triton(logits, "token_bitmask"):
        host = logits.device.type == "cpu" and bitmask.device.type == "cpu" and logits.is_contiguous()
        (apply_token_bitmask_host if host else apply_token_bitmask_reference)(logits, bitmask, rows)
        return
    apply_token_bitmask_launch(logits, bitmask, rows)()
