"""Scheduling: every step carries one decode token for each running sequence first, then prompt
chunks within the token budget; cached prefixes are taken instead of computed; the most recently
admitted sequence is preempted when the pool runs dry, and shared blocks outlive it."""

import random

from server.engine.block_manager import BlockManager
from server.engine.request import GenerationRequest, SamplingParams
from server.engine.scheduler import ScheduledBatch, Scheduler
from server.engine.sequence import Sequence, SequenceStatus

_rng = random.Random(0)
_ids = iter(range(10**9))


def make_seq(prompt_len: int = 0, prompt: list[int] | None = None) -> Sequence:
    seq_id = next(_ids)
    prompt = prompt if prompt is not None else [_rng.randrange(1000) for _ in range(prompt_len)]
    return Sequence(seq_id, GenerationRequest(f"r{seq_id}", prompt), 0, 1000, (), detokenizer=None)


def make_choices(prompt: list[int], n: int) -> list[Sequence]:
    """The `n` sequences of one request, linked as `EngineCore.add_request` links them."""
    request = GenerationRequest(f"r{next(_ids)}", prompt, SamplingParams(n=n))
    seqs = [Sequence(next(_ids), request, i, 1000, (), detokenizer=None) for i in range(n)]
    for seq in seqs[1:]:
        seq.prompt_leader = seqs[0]
    return seqs


def finish_step(scheduler: Scheduler, batch: ScheduledBatch) -> None:
    """What the engine does after the model ran: K/V written and cached, a token sampled where due."""
    sampled = [batch.samples(i) for i in range(len(batch.seqs))]
    for seq, num_new, samples in zip(batch.seqs, batch.num_new_tokens, sampled):
        seq.num_cached += num_new
        scheduler.block_manager.cache_full_blocks(seq, 0)
        if samples:
            seq.token_ids.append(2)


def prefill(scheduler: Scheduler, *seqs: Sequence) -> None:
    """Add the sequences and run one step over them."""
    for seq in seqs:
        scheduler.add(seq)
    finish_step(scheduler, scheduler.schedule())


def shape(batch: ScheduledBatch) -> list[tuple[int, int]]:
    return [(seq.seq_id, n) for seq, n in zip(batch.seqs, batch.num_new_tokens)]


def test_prompts_go_in_chunks_within_the_budget_behind_the_decodes():
    scheduler = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=32)
    a, b, c = make_seq(10), make_seq(30), make_seq(50)
    for seq in (a, b, c):
        scheduler.add(seq)
    steps = []
    while any(seq.num_generated == 0 for seq in (a, b, c)):
        batch = scheduler.schedule()
        steps.append((batch.num_decodes, shape(batch)))
        assert sum(batch.num_new_tokens) <= 32
        finish_step(scheduler, batch)
    A, B, C = a.seq_id, b.seq_id, c.seq_id
    assert steps == [
        (0, [(A, 10), (B, 22)]),
        (1, [(A, 1), (B, 8), (C, 23)]),  # a decodes while b's and c's prompts go on
        (2, [(A, 1), (B, 1), (C, 27)]),
    ]
    batch = scheduler.schedule()
    assert batch.num_decodes == 3 and shape(batch) == [(A, 1), (B, 1), (C, 1)]


def test_a_running_stream_gets_a_token_every_step_while_a_long_prompt_is_prefilled():
    scheduler = Scheduler(BlockManager(200, 16), max_num_seqs=8, max_num_batched_tokens=256)
    stream = make_seq(5)
    prefill(scheduler, stream)
    long_prompt = make_seq(2000)
    scheduler.add(long_prompt)
    tokens_meanwhile = 0
    while long_prompt.num_generated == 0:
        batch = scheduler.schedule()
        assert batch.seqs[0] is stream and batch.num_new_tokens[0] == 1 and sum(batch.num_new_tokens) <= 256
        finish_step(scheduler, batch)
        tokens_meanwhile += 1
    assert tokens_meanwhile == -(-2000 // 255)  # the stream's token and 255 prompt tokens a step


def test_max_num_seqs_limits_admission():
    scheduler = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=100)
    seqs = [make_seq(5) for _ in range(3)]
    for seq in seqs:
        scheduler.add(seq)
    batch = scheduler.schedule()
    assert batch.seqs == seqs[:2]
    assert list(scheduler.waiting) == seqs[2:]


def test_a_new_sequence_computes_only_what_the_cache_lacks():
    manager = BlockManager(100, 4)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=100)
    first = make_seq(18)
    prefill(scheduler, first)
    scheduler.remove(first)  # finished: its blocks stay cached
    longer = make_seq(prompt=first.token_ids[:18] + [7] * 6)
    exact = make_seq(prompt=first.token_ids[:16])
    scheduler.add(longer)
    scheduler.add(exact)
    batch = scheduler.schedule()
    # 4 blocks found for the longer one; 3 for the exact repeat, whose last token's block is computed again.
    assert shape(batch) == [(longer.seq_id, 24 - 16), (exact.seq_id, 4)]
    assert (longer.num_cached_prompt_tokens, exact.num_cached_prompt_tokens) == (16, 12)
    assert manager.prefix_cache_hits == 16 + 12 and manager.prefix_cache_queries == 18 + 24 + 16


def test_choices_of_one_request_wait_for_the_first_to_cache_the_prompt_then_share_it():
    manager = BlockManager(100, 4)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=12)
    leader, *others = make_choices([_rng.randrange(1000) for _ in range(18)], 3)
    for seq in (leader, *others):
        scheduler.add(seq)
    batch = scheduler.schedule()
    assert batch.seqs == [leader] and batch.num_new_tokens == [12]  # the others wait behind it
    finish_step(scheduler, batch)
    batch = scheduler.schedule()
    assert batch.seqs == [leader]  # 12 of 16 full-block tokens cached: still waiting
    finish_step(scheduler, batch)
    batch = scheduler.schedule()
    assert shape(batch) == [(leader.seq_id, 1), (others[0].seq_id, 2), (others[1].seq_id, 2)]
    assert all(seq.block_table[:4] == leader.block_table[:4] for seq in others)
    assert manager.num_used == 5 + 1 + 1


def test_choices_do_not_wait_without_the_prefix_cache():
    scheduler = Scheduler(BlockManager(100, 4, enable_prefix_caching=False), max_num_seqs=8, max_num_batched_tokens=100)
    seqs = make_choices([_rng.randrange(1000) for _ in range(18)], 3)
    for seq in seqs:
        scheduler.add(seq)
    assert scheduler.schedule().seqs == seqs


def test_decode_preempts_the_most_recently_admitted_and_readmits_it_first():
    manager = BlockManager(4, 4)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=100)
    first, second = make_seq(8), make_seq(7)
    prefill(scheduler, first, second)  # both prefilled: 9 and 8 tokens, the pool is full
    assert manager.num_free == manager.num_free_cached == 0
    batch = scheduler.schedule()  # the first needs a third block: the second makes room
    assert batch.seqs == [first]
    assert scheduler.num_preemptions == 1
    assert second.status is SequenceStatus.WAITING and second.block_table == [] and second.num_cached == 0
    assert list(scheduler.waiting) == [second]
    finish_step(scheduler, batch)
    scheduler.remove(first)
    batch = scheduler.schedule()  # recomputed from all its tokens, the cached block of its prompt reused
    assert batch.seqs == [second] and batch.num_new_tokens == [4] and batch.samples(0)
    assert second.num_generated == 1 and second.num_cached_prompt_tokens == 0  # as first admitted


def test_preempting_a_sharer_keeps_the_blocks_others_use():
    manager = BlockManager(6, 4)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=100)
    owner = make_seq(9)
    prefill(scheduler, owner)
    sharer = make_seq(prompt=owner.token_ids[:8] + [5] * 3)  # shares the owner's two full blocks
    prefill(scheduler, sharer)
    assert sharer.block_table[:2] == owner.block_table[:2] and manager.num_used == 4
    filler = make_seq(prompt=[6] * 8)
    prefill(scheduler, filler)
    assert manager.num_free == 0
    batch = scheduler.schedule()  # the sharer needs a fourth block: the newest sequence yields
    assert batch.seqs == [owner, sharer] and filler.status is SequenceStatus.WAITING
    assert scheduler.num_preemptions == 1
    finish_step(scheduler, batch)
    assert owner.block_table[:2] == sharer.block_table[:2] and manager.num_used == 3 + 2
    scheduler.remove(sharer)  # cancelled: the shared blocks stay with the owner
    scheduler.remove(owner)
    assert manager.num_used == 0 and manager.num_free == 6


def test_the_newest_sequence_yields_itself_when_older_ones_hold_the_pool():
    manager = BlockManager(2, 4)
    scheduler = Scheduler(manager, max_num_seqs=8, max_num_batched_tokens=100)
    older, newer = make_seq(3), make_seq(4)
    prefill(scheduler, older, newer)  # 4 and 5 tokens: the newer needs a second block, none is free
    batch = scheduler.schedule()
    assert batch.seqs == [older] and newer.status is SequenceStatus.WAITING
    assert scheduler.num_preemptions == 1 and manager.num_used == 1
