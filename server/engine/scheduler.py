"""Which sequences run in the next step, and how many of their tokens.

A step is either a prefill step (prompt tokens, up to `max_num_batched_tokens` of them, long
prompts in chunks) or a decode step (one token for every running sequence); the model runs the
two kinds differently. Prefill goes first, so new requests join the batch as soon as their KV
blocks fit. When a decode step finds the pool empty, the most recently admitted sequence is
preempted: its blocks are freed and it waits at the head of the queue, to be recomputed from
its tokens (prompt and output so far) when blocks free up. Nothing is lost: the recompute
produces the K/V the sequence had, and sampling continues from its last token.
"""

from collections import deque
from dataclasses import dataclass

from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # per sequence: tokens from `num_cached` on that this step computes
    is_prefill: bool

    def samples(self, seq_index: int) -> bool:
        """Whether this step ends at the sequence's last token, so a new token is sampled for it."""
        seq = self.seqs[seq_index]
        return seq.num_cached + self.num_new_tokens[seq_index] == seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()  # in admission order
        self.num_preemptions = 0

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch | None:
        return self._schedule_prefill() or self._schedule_decode()

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def _schedule_prefill(self) -> ScheduledBatch | None:
        batch = ScheduledBatch([], [], is_prefill=True)
        budget = self.max_num_batched_tokens
        # Chunks of prompts already admitted come first: their blocks are held until they finish.
        for seq in self.running:
            remaining = seq.num_tokens - seq.num_cached
            if remaining > 1 and budget:
                batch.seqs.append(seq)
                batch.num_new_tokens.append(min(remaining, budget))
                budget -= batch.num_new_tokens[-1]
        while self.waiting and budget and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self.block_manager.allocate(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(min(seq.num_tokens, budget))
            budget -= batch.num_new_tokens[-1]
        return batch if batch.seqs else None

    def _schedule_decode(self) -> ScheduledBatch | None:
        scheduled: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq) and self.running:
                self._preempt(self.running.pop())
            if self.block_manager.can_append(seq):
                self.block_manager.append(seq)
                scheduled.append(seq)
            else:  # the sequences before it (admitted earlier) hold the rest of the pool
                self._preempt(seq)
        self.running.extend(scheduled)
        return ScheduledBatch(scheduled, [1] * len(scheduled), is_prefill=False) if scheduled else None

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_cached = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
