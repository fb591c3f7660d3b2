"""The Triton token-bitmask kernel against its torch reference, and the reference against the
bit layout grammar engines write (bit j of word w allows token 32 * w + j)."""

import pytest
import torch

import nanoserve_kernels.token_bitmask as tb
from tests.kernels.common import randn


def _random_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    words = torch.randint(-(2**31), 2**31, (rows, -(-vocab_size // 32)), dtype=torch.int64).to(torch.int32)
    words[0, 1] = 0  # a run of 32 forbidden tokens and one of 32 allowed ones, as grammars make them
    words[-1, 2] = -1
    return words


# (batch rows, masked rows, vocabulary): a vocabulary that ends inside a word, one mask row, every row
# masked, Qwen3's vocabulary.
CASES = [(5, 3, 1000), (1, 1, 77), (7, 7, 4096), (9, 4, 151936)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-R{}-V{}".format(*c))
def test_kernel_matches_reference_exactly(case):
    batch, masked, vocab_size = case
    logits = randn(batch, vocab_size, dtype=torch.float32)
    rows = torch.randperm(batch)[:masked]
    bitmask = _random_bitmask(masked, vocab_size)
    want = logits.clone()
    tb.apply_token_bitmask_reference(want, bitmask, rows)
    tb.apply_token_bitmask_launch(logits, bitmask, rows)()
    torch.testing.assert_close(logits, want, rtol=0, atol=0)
    untouched = [r for r in range(batch) if r not in rows.tolist()]
    assert not torch.isinf(logits[untouched]).any()


def test_reference_follows_the_bit_layout():
    vocab_size = 70
    bitmask = torch.zeros(2, 3, dtype=torch.int32)
    bitmask[0, 0] = 1 << 5  # token 5
    bitmask[0, 1] = -(2**31)  # bit 31 of word 1: token 63
    bitmask[1, 2] = 0b101  # tokens 64 and 66
    logits = randn(3, vocab_size, dtype=torch.float32)
    before = logits.clone()
    tb.apply_token_bitmask_reference(logits, bitmask, torch.tensor([2, 0]))
    assert torch.isfinite(logits[2]).nonzero().flatten().tolist() == [5, 63]
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [64, 66]
    assert torch.equal(logits[1], before[1])
    assert logits[2, 5] == before[2, 5] and logits[0, 66] == before[0, 66]


@pytest.mark.parametrize("vocab_size", [1000, 151936])
def test_host_path_equals_the_reference(vocab_size):
    """What CPU tensors run: grammar-like rows (a few tokens allowed, almost all allowed) and random ones."""
    words = -(-vocab_size // 32)
    bitmask = torch.zeros(4, words, dtype=torch.int32, device="cpu")
    bitmask[0, [3, words // 2]] = torch.tensor([0b1011, 1 << 31], dtype=torch.int64).to(torch.int32)
    bitmask[1] = -1
    bitmask[1, [0, 7, words - 1]] = torch.tensor([0, 0x0F0F0F0F, 1], dtype=torch.int32)
    bitmask[2:] = _random_bitmask(2, vocab_size).cpu()
    logits = randn(6, vocab_size, dtype=torch.float32).cpu()
    rows = torch.tensor([5, 0, 2, 3])
    want = logits.clone()
    tb.apply_token_bitmask_reference(want, bitmask, rows)
    tb.apply_token_bitmask_host(logits, bitmask, rows)
    torch.testing.assert_close(logits, want, rtol=0, atol=0)
    assert torch.isfinite(logits[5]).sum() == 4 and torch.isinf(logits[0]).sum() == 32 + 16 + 31 - (words * 32 - vocab_size)


def test_public_op_runs_the_kernel(triton_backend, monkeypatch):
    calls = []
    monkeypatch.setattr(tb, "apply_token_bitmask_reference", lambda *args: calls.append(args))
    logits = randn(4, 300, dtype=torch.float32)
    bitmask = _random_bitmask(2, 300)
    tb.apply_token_bitmask_(logits, bitmask, torch.tensor([3, 1]))
    assert not calls  # the kernel ran, not the reference
    assert torch.isinf(logits[[1, 3]]).any() and not torch.isinf(logits[[0, 2]]).any()


def test_launch_rejects_a_bitmask_too_short_for_the_vocabulary():
    with pytest.raises(ValueError, match="cannot cover"):
        tb.apply_token_bitmask_launch(torch.zeros(1, 65), torch.zeros(1, 2, dtype=torch.int32), torch.tensor([0]))
