"""Which sequences run in the next step, and how many of their tokens.

One step serves everyone, within `max_num_batched_tokens` (vLLM v1's policy): first one token
for every running sequence past its prompt (decodes), then chunks of prompts already admitted,
then new sequences as long as their KV blocks fit, each taking what its prompt found in the
prefix cache and computing the rest, long prompts in chunks. So running streams keep moving
while a long prompt is prefilled, and decodes come first in the batch, as the model expects.

When a decode finds the pool empty, the most recently admitted sequence is preempted: its blocks
are let go and it waits at the head of the queue, to be recomputed from its tokens (prompt and
output so far; the prefix cache may still hold most of them) when blocks free up. Nothing is
lost: the recompute produces the K/V the sequence had, and sampling continues from its last token.

Speculative decoding (`speculative.py`): once every decode has its slot, decodes whose sequence
has draft tokens bring them too, as far as the token budget and the free blocks allow (drafts
never preempt anyone). They go after the plain decodes and before the prompt chunks: the model
scores their 1 + k tokens as a chunk over the cached context.
"""

from collections import deque
from dataclasses import dataclass, field

from server.engine.block_manager import BlockManager
from server.engine.sequence import Sequence, SequenceStatus
from server.engine.speculative import Speculator


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)  # the decodes first, then prompt chunks
    num_new_tokens: list[int] = field(default_factory=list)  # per sequence: tokens from `num_cached` on
    num_decodes: int = 0  # leading sequences with one new token: the last one they sampled
    # Per sequence: the draft tokens it brings after its last one (speculation), else empty. The
    # sequences with drafts come right after the plain decodes.
    drafts: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.drafts) < len(self.seqs):  # a batch built from its sequences alone has no drafts
            self.drafts += [[] for _ in range(len(self.seqs) - len(self.drafts))]

    def add(self, seq: Sequence, num_new: int, draft: list[int] | None = None) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new)
        self.drafts.append(draft or [])

    @property
    def num_verifies(self) -> int:
        return sum(bool(draft) for draft in self.drafts)

    def split(self) -> tuple["ScheduledBatch", "ScheduledBatch"]:
        """The running streams (decodes, with their drafts) and the prompt chunks, as two batches."""
        r = self.num_decodes + self.num_verifies
        decodes = ScheduledBatch(self.seqs[:r], self.num_new_tokens[:r], self.num_decodes, self.drafts[:r])
        return decodes, ScheduledBatch(self.seqs[r:], self.num_new_tokens[r:], 0, self.drafts[r:])

    def without_finished(self) -> "ScheduledBatch":
        """This batch less its sequences that have finished since it was scheduled."""
        kept = [i for i, seq in enumerate(self.seqs) if not seq.is_finished]
        return ScheduledBatch([self.seqs[i] for i in kept], [self.num_new_tokens[i] for i in kept],
                              sum(i < self.num_decodes for i in kept), [self.drafts[i] for i in kept])

    def samples(self, seq_index: int) -> bool:
        """Whether this step ends at the sequence's last token (or its drafts), so a new token is
        sampled for it."""
        seq = self.seqs[seq_index]
        return seq.num_cached + self.num_new_tokens[seq_index] == seq.num_tokens + len(self.drafts[seq_index])


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 speculator: Speculator | None = None):
        self.block_manager = block_manager
        self.speculator = speculator
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
        batch = ScheduledBatch()
        prefilling = self._schedule_decodes(batch)
        if self.speculator is not None and batch.seqs:
            batch = self._add_drafts(batch)
        budget = self.max_num_batched_tokens - sum(batch.num_new_tokens)
        for seq in prefilling:  # admitted earlier: their blocks are held until they finish
            if not budget:
                break
            batch.add(seq, min(seq.num_tokens - seq.num_cached, budget))
            budget -= batch.num_new_tokens[-1]
        self._admit(batch, budget)
        return batch if batch.seqs else None

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and let go of its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def _schedule_decodes(self, batch: ScheduledBatch) -> list[Sequence]:
        """One token for every running sequence that has computed its prompt, preempting the most
        recently admitted when the pool runs dry; returns the running ones still prefilling."""
        kept: list[Sequence] = []
        prefilling: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            if seq.num_tokens - seq.num_cached > 1:
                prefilling.append(seq)
                kept.append(seq)
                continue
            while not self.block_manager.can_append(seq) and self.running:
                self._preempt(self.running.pop())
            if self.block_manager.can_append(seq):
                self.block_manager.append(seq)
                kept.append(seq)
                batch.add(seq, 1)
            else:  # the sequences before it (admitted earlier) hold the rest of the pool
                self._preempt(seq)
        self.running.extend(kept)
        batch.num_decodes = len(batch.seqs)
        return prefilling

    def _add_drafts(self, batch: ScheduledBatch) -> ScheduledBatch:
        """The decodes of `batch` (all it holds), those with drafts moved after the plain ones."""
        budget = self.max_num_batched_tokens - batch.num_decodes
        ngram = self.speculator.ngram_enabled_for(batch.num_decodes)
        plain, verifying = ScheduledBatch(), ScheduledBatch()
        for seq in batch.seqs:
            draft = []
            if budget and self.speculator.may_propose(seq):
                draft = self.speculator.propose(seq, min(budget, self.block_manager.free_slots(seq)), ngram)
            if draft:
                self.block_manager.append(seq, len(draft))
                budget -= len(draft)
                verifying.add(seq, 1 + len(draft), draft)
            else:
                plain.add(seq, 1)
        plain.num_decodes = len(plain.seqs)
        self.speculator.complete(verifying.seqs, verifying.drafts)  # now that their slots exist
        for seq, num_new, draft in zip(verifying.seqs, verifying.num_new_tokens, verifying.drafts):
            plain.add(seq, num_new, draft)
        return plain

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        """Waiting sequences in order, while the budget lasts and their blocks fit."""
        while self.waiting and budget and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # A sequence preempted while its last token was still on the device (async
            # scheduling) is recomputed from its tokens once that token is known: next step.
            if self._waits_for_leader(seq) or seq.unresolved_row is not None:
                break
            hits = self.block_manager.lookup(seq)
            if not self.block_manager.can_allocate(seq, hits):
                break
            self.block_manager.allocate(seq, hits)
            if seq.num_cached_prompt_tokens is None:
                seq.num_cached_prompt_tokens = seq.num_cached
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, min(seq.num_tokens - seq.num_cached, budget))
            budget -= batch.num_new_tokens[-1]

    def _waits_for_leader(self, seq: Sequence) -> bool:
        """Choices 1.. of an n > 1 request wait while choice 0 prefills their common prompt, then
        share its full blocks through the prefix cache instead of computing copies of them."""
        leader, block_size = seq.prompt_leader, self.block_manager.block_size
        return (
            leader is not None
            and leader.status is SequenceStatus.RUNNING
            and self.block_manager.reads_cache(seq)
            and leader.num_cached < leader.num_prompt_tokens // block_size * block_size
        )

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_cached = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
