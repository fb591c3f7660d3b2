"""The plain-tensor description of one forward step, and a builder from per-sequence views."""

import functools
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Whether `Qwen3Model.forward` checks every batch against its cache (`check_batch`): each check reads
# the batch back to the host, a synchronisation, so it is on in tests (tests/conftest.py sets
# NANOSERVE_CHECK_BATCHES=1) and off in serving.
CHECK_BATCHES = os.environ.get("NANOSERVE_CHECK_BATCHES") == "1"


def to_device(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`values` (numbers or nested lists) as a tensor on `device`, without stopping the host.

    A copy from pageable memory is staged by the driver while the host waits; from pinned memory
    it is a DMA the host only queues. The pinned block comes from torch's caching host allocator,
    which records an event behind the copy and reuses the block only once that event has passed.
    """
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class ForwardBatch:
    token_ids: torch.Tensor  # [T] int64: new tokens of all sequences, sequence after sequence
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: block * block_size + offset; -1 = do not store
    block_tables: torch.Tensor  # [B, max_blocks] int32 (rows padded with any valid block id)
    context_lens: torch.Tensor  # [B] int32: tokens in the cache once this step's are stored
    query_start_loc: torch.Tensor  # [B + 1] int32: sequence b's new tokens are rows [q[b], q[b + 1]) of T
    query_lens: list[int]  # [B] new tokens per sequence (host side: splits the batch, sizes grids)
    logits_indices: torch.Tensor  # [N] int64: rows of T whose logits are wanted

    @property
    def num_decodes(self) -> int:
        """Leading sequences with one new token each: they run decode attention. A scheduler puts
        decodes first, so a mixed step is decode rows, then prompt chunks."""
        for index, num_new in enumerate(self.query_lens):
            if num_new != 1:
                return index
        return len(self.query_lens)

    @property
    def is_decode(self) -> bool:
        return self.num_decodes == len(self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @functools.cached_property
    def prefill_query_start_loc(self) -> torch.Tensor:
        """`query_start_loc` of the sequences after the decodes, counted from their first row."""
        d = self.num_decodes
        return self.query_start_loc if d == 0 else self.query_start_loc[d:] - d


def check_batch(batch: ForwardBatch, num_blocks: int, block_size: int) -> None:
    """Raises AssertionError unless every index the kernels follow stays inside its tensor: each
    sequence's block table covers its context (the kernels read `table[key // block_size]` for
    every key below the context length, with no bound of their own), every block id that covers a
    context names a block of the cache, and slots, rows and query offsets fit their tensors."""
    contexts, query_lens = batch.context_lens.tolist(), batch.query_lens
    rows, width = batch.block_tables.shape
    tokens = batch.token_ids.shape[0]
    assert rows == len(contexts) == len(query_lens), f"{rows} table rows, {len(contexts)} contexts, {len(query_lens)} queries"
    assert batch.query_start_loc.tolist() == [0, *itertools.accumulate(query_lens)], "query_start_loc != query_lens"
    assert tokens == sum(query_lens) == batch.positions.shape[0] == batch.slot_mapping.shape[0]
    for seq, (context, num_new) in enumerate(zip(contexts, query_lens)):
        assert context >= num_new >= 1, f"sequence {seq}: context {context} shorter than its {num_new} new tokens"
        covered = -(-context // block_size)
        assert covered <= width, (f"sequence {seq}: a context of {context} tokens needs {covered} blocks of "
                                  f"{block_size}, its block table has {width}")
        blocks = batch.block_tables[seq, :covered]
        assert 0 <= int(blocks.min()) and int(blocks.max()) < num_blocks, (
            f"sequence {seq}: block ids {blocks.tolist()} outside a cache of {num_blocks} blocks")
    if tokens:
        slots = batch.slot_mapping
        assert -1 <= int(slots.min()) and int(slots.max()) < num_blocks * block_size, "a slot outside the cache"
    if batch.logits_indices.numel():
        indices = batch.logits_indices
        assert 0 <= int(indices.min()) and int(indices.max()) < tokens, "a logits index outside the step's rows"


@dataclass
class SequenceStep:
    """One sequence's part of a step: its new tokens, how many it has cached, its blocks."""

    new_token_ids: Sequence[int]
    num_cached: int
    block_table: Sequence[int]


def make_batch(
    steps: Sequence[SequenceStep], block_size: int, device: torch.device | str, all_logits: bool = False
) -> ForwardBatch:
    """Logits for the last new token of each sequence, or for every new token with `all_logits`."""
    token_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_indices: list[int] = []
    for step in steps:
        first = len(token_ids)
        token_ids += step.new_token_ids
        for pos in range(step.num_cached, step.num_cached + len(step.new_token_ids)):
            positions.append(pos)
            slots.append(step.block_table[pos // block_size] * block_size + pos % block_size)
        logits_indices += range(first, len(token_ids)) if all_logits else [len(token_ids) - 1]
    width = max(len(step.block_table) for step in steps)
    tables = [list(step.block_table) + [0] * (width - len(step.block_table)) for step in steps]
    query_lens = [len(step.new_token_ids) for step in steps]

    def tensor(values, dtype=torch.int64):
        return to_device(values, dtype, device)

    return ForwardBatch(
        token_ids=tensor(token_ids),
        positions=tensor(positions),
        slot_mapping=tensor(slots),
        block_tables=tensor(tables, torch.int32),
        context_lens=tensor([step.num_cached + q for step, q in zip(steps, query_lens)], torch.int32),
        query_start_loc=tensor([0, *itertools.accumulate(query_lens)], torch.int32),
        query_lens=query_lens,
        logits_indices=tensor(logits_indices),
    )
