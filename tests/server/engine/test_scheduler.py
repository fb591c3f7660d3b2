"""Scheduling: prefill chunks within the token budget, one decode token per sequence, and
preemption of the most recently admitted sequence when the pool runs dry."""

from server.engine.block_manager import BlockManager
from server.engine.request import GenerationRequest
from server.engine.scheduler import ScheduledBatch, Scheduler
from server.engine.sequence import Sequence, SequenceStatus


def make_seq(seq_id: int, prompt_len: int) -> Sequence:
    return Sequence(seq_id, GenerationRequest(f"r{seq_id}", [1] * prompt_len), 0, 1000, (), detokenizer=None)


def finish_step(batch: ScheduledBatch) -> None:
    """What the engine does after the model ran: K/V cached, a token sampled where due."""
    sampled = [batch.samples(i) for i in range(len(batch.seqs))]
    for seq, num_new, samples in zip(batch.seqs, batch.num_new_tokens, sampled):
        seq.num_cached += num_new
        if samples:
            seq.token_ids.append(2)


def test_prefill_chunks_long_prompts_within_the_token_budget():
    scheduler = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=32)
    seqs = [make_seq(0, 10), make_seq(1, 30), make_seq(2, 50)]
    for seq in seqs:
        scheduler.add(seq)
    steps = []
    while any(seq.num_generated == 0 for seq in seqs):
        batch = scheduler.schedule()
        assert batch.is_prefill and sum(batch.num_new_tokens) <= 32
        steps.append([(seq.seq_id, n) for seq, n in zip(batch.seqs, batch.num_new_tokens)])
        finish_step(batch)
    assert steps == [[(0, 10), (1, 22)], [(1, 8), (2, 24)], [(2, 26)]]
    batch = scheduler.schedule()
    assert not batch.is_prefill and batch.num_new_tokens == [1, 1, 1]


def test_max_num_seqs_limits_admission():
    scheduler = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for seq_id in range(3):
        scheduler.add(make_seq(seq_id, 5))
    batch = scheduler.schedule()
    assert [seq.seq_id for seq in batch.seqs] == [0, 1]
    assert len(scheduler.waiting) == 1


def test_decode_preempts_the_most_recently_admitted_and_readmits_it_first():
    manager = BlockManager(4, 4)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=100)
    first, second = make_seq(0, 8), make_seq(1, 7)
    scheduler.add(first)
    scheduler.add(second)
    finish_step(scheduler.schedule())  # both prefilled: 9 and 8 tokens, the pool is full
    assert manager.num_free == 0
    batch = scheduler.schedule()  # the first needs a third block: the second makes room
    assert [seq.seq_id for seq in batch.seqs] == [0]
    assert scheduler.num_preemptions == 1
    assert second.status is SequenceStatus.WAITING and second.block_table == [] and second.num_cached == 0
    assert list(scheduler.waiting) == [second]
    finish_step(batch)
    scheduler.remove(first)
    batch = scheduler.schedule()  # recomputed from all its tokens: prompt and output so far
    assert batch.is_prefill and batch.seqs == [second] and batch.num_new_tokens == [8] and batch.samples(0)
    assert second.num_generated == 1


def test_the_newest_sequence_yields_itself_when_older_ones_hold_the_pool():
    manager = BlockManager(2, 4)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=100)
    older, newer = make_seq(0, 3), make_seq(1, 4)
    scheduler.add(older)
    scheduler.add(newer)
    finish_step(scheduler.schedule())  # 4 and 5 tokens: the newer needs a second block, none is free
    batch = scheduler.schedule()
    assert batch.seqs == [older] and newer.status is SequenceStatus.WAITING
    assert scheduler.num_preemptions == 1 and manager.num_used == 1
