"""The KV block pool and its prefix cache: blocks are shared only where the K/V they hold is what
the sharer's own tokens would have written, every user is counted, and all blocks come back."""

import random

import pytest

from server.engine.block_manager import BlockManager
from server.engine.request import GenerationRequest
from server.engine.sequence import Sequence

_ids = iter(range(10**9))


def make_seq(tokens: list[int]) -> Sequence:
    seq_id = next(_ids)
    return Sequence(seq_id, GenerationRequest(f"r{seq_id}", list(tokens)), 0, 1000, (), detokenizer=None)


def random_tokens(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(1000) for _ in range(count)]


def admit(manager: BlockManager, seq: Sequence) -> list[int]:
    hits = manager.lookup(seq)
    assert manager.can_allocate(seq, hits)
    manager.allocate(seq, hits)
    return hits


def compute(manager: BlockManager, seq: Sequence, num_tokens: int | None = None) -> None:
    """What a finished step does: the K/V of the next `num_tokens` (default: all) are written."""
    first = seq.num_cached // manager.block_size
    seq.num_cached = seq.num_tokens if num_tokens is None else seq.num_cached + num_tokens
    manager.cache_full_blocks(seq, first)


def computed(manager: BlockManager, *seqs: Sequence) -> None:
    for seq in seqs:
        admit(manager, seq)
        compute(manager, seq)


def grow(seq: Sequence, count: int) -> Sequence:
    seq.token_ids += [0] * count
    return seq


def test_equal_prefixes_give_equal_hash_chains_and_a_changed_block_changes_the_rest():
    rng = random.Random(1)
    manager = BlockManager(num_blocks=16, block_size=4)
    prefix = random_tokens(rng, 8)
    a, b = make_seq(prefix + random_tokens(rng, 5)), make_seq(prefix + random_tokens(rng, 5))
    changed_first = make_seq([prefix[0] + 1] + prefix[1:] + a.token_ids[8:])
    for seq in (a, b, changed_first):
        manager.lookup(seq)  # hashes the full blocks short of the last token
    assert a.block_hashes[:2] == b.block_hashes[:2] and a.block_hashes[2] != b.block_hashes[2]
    # Block 1 holds the same tokens in `a` and `changed_first`, but its parent differs.
    assert all(x != y for x, y in zip(a.block_hashes, changed_first.block_hashes))
    assert len({len(h) for h in a.block_hashes}) == 1 and len(a.block_hashes[0]) == 32  # SHA-256


def test_a_later_sequence_takes_the_cached_full_blocks_and_computes_the_rest():
    rng = random.Random(2)
    manager = BlockManager(num_blocks=16, block_size=4)
    first = make_seq(random_tokens(rng, 10))
    assert admit(manager, first) == [] and first.num_cached == 0
    compute(manager, first)
    first_blocks = list(first.block_table)
    manager.free(first)
    assert manager.num_used == 0 and manager.num_free_cached == 2  # 2 full blocks; the third was partial
    second = make_seq(first.token_ids + random_tokens(rng, 7))
    assert admit(manager, second) == first_blocks[:2] and second.num_cached == 8
    assert second.block_table[:2] == first_blocks[:2] and manager.num_used == 5
    assert (manager.prefix_cache_queries, manager.prefix_cache_hits) == (10 + 17, 8)


def test_the_last_token_is_always_computed():
    rng = random.Random(3)
    manager = BlockManager(num_blocks=16, block_size=4)
    first = make_seq(random_tokens(rng, 8))  # exactly two blocks
    computed(manager, first)
    same = make_seq(first.token_ids)
    assert admit(manager, same) == first.block_table[:1] and same.num_cached == 4
    assert same.block_table[1] != first.block_table[1]  # its own copy of the block with the last token


def test_blocks_are_findable_only_once_a_step_has_written_them():
    rng = random.Random(4)
    manager = BlockManager(num_blocks=32, block_size=4)
    prompt = random_tokens(rng, 30)
    chunked = make_seq(prompt)
    admit(manager, chunked)
    assert manager.lookup(make_seq(prompt)) == []  # allocated, not computed
    compute(manager, chunked, 10)  # a first chunk: blocks 0 and 1 are full, block 2 half written
    assert manager.lookup(make_seq(prompt)) == chunked.block_table[:2]
    compute(manager, chunked, 12)
    assert manager.lookup(make_seq(prompt)) == chunked.block_table[:5]


def test_shared_blocks_count_their_users():
    rng = random.Random(5)
    manager = BlockManager(num_blocks=16, block_size=4)
    prefix = random_tokens(rng, 8)
    owner = make_seq(prefix + random_tokens(rng, 3))
    computed(manager, owner)
    sharers = [make_seq(prefix + random_tokens(rng, 2)) for _ in range(2)]
    for seq in sharers:
        assert admit(manager, seq) == owner.block_table[:2]
    assert manager.num_used == 3 + 1 + 1
    manager.free(owner)  # its shared blocks stay in use; its own last block goes back
    assert manager.num_used == 4 and manager.num_free_cached == 0
    manager.free(sharers[0])
    assert manager.num_used == 3
    manager.free(sharers[1])
    assert manager.num_used == 0 and manager.num_free_cached == 2 and manager.num_free == 16


def test_eviction_takes_empty_blocks_first_then_the_least_recently_freed():
    rng = random.Random(6)
    manager = BlockManager(num_blocks=6, block_size=4)
    old, new = make_seq(random_tokens(rng, 9)), make_seq(random_tokens(rng, 9))
    computed(manager, old, new)
    old_blocks, new_blocks = list(old.block_table), list(new.block_table)
    manager.free(old)
    manager.free(new)
    assert manager.num_free_cached == 4  # two full blocks each; their third blocks are empty
    filler = make_seq(random_tokens(rng, 8))
    admit(manager, filler)  # the two empty blocks: nothing is evicted
    assert set(filler.block_table) == {old_blocks[2], new_blocks[2]} and manager.num_free_cached == 4
    manager.append(grow(filler, 1))  # one more block: the old sequence's last full block goes first
    assert filler.block_table[-1] == old_blocks[1]
    assert manager.lookup(make_seq(old.token_ids)) == old_blocks[:1]
    assert manager.lookup(make_seq(new.token_ids)) == new_blocks[:2]
    manager.append(grow(filler, 4))
    assert filler.block_table[-1] == old_blocks[0] and manager.lookup(make_seq(old.token_ids)) == []


def test_a_cache_hit_makes_a_block_recently_used():
    rng = random.Random(7)
    manager = BlockManager(num_blocks=4, block_size=4)
    a, b = make_seq(random_tokens(rng, 5)), make_seq(random_tokens(rng, 5))
    computed(manager, a, b)
    manager.free(a)
    manager.free(b)  # LRU order: a's block, then b's
    again = make_seq(a.token_ids[:4] + random_tokens(rng, 1))
    admit(manager, again)  # takes a's block from the free list (and one empty block)
    manager.free(again)  # a's block is now the most recently freed
    taker = make_seq(random_tokens(rng, 12))
    admit(manager, taker)  # two empty blocks, then one eviction: b's
    assert manager.lookup(make_seq(b.token_ids)) == [] and len(manager.lookup(make_seq(a.token_ids))) == 1


def test_can_allocate_counts_the_free_blocks_that_a_hit_takes_from_the_pool():
    rng = random.Random(8)
    manager = BlockManager(num_blocks=4, block_size=4)
    first = make_seq(random_tokens(rng, 12))
    computed(manager, first)
    manager.free(first)  # 3 cached blocks, 1 empty
    longer = make_seq(first.token_ids + random_tokens(rng, 8))  # 5 blocks: 3 hit (free), 2 new
    assert manager.can_allocate(longer, manager.lookup(longer)) is False
    fits = make_seq(first.token_ids + random_tokens(rng, 4))  # 4 blocks: 3 hit, 1 new
    assert len(admit(manager, fits)) == 3 and manager.num_free == 0


def test_caching_off_and_skipped_lookups():
    rng = random.Random(9)
    off = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    seq = make_seq(random_tokens(rng, 9))
    admit(off, seq)
    compute(off, seq)
    off.free(seq)
    assert off.lookup(make_seq(seq.token_ids)) == [] and off.num_free_cached == 0
    assert (off.prefix_cache_queries, off.prefix_cache_hits) == (0, 0)
    on = BlockManager(num_blocks=8, block_size=4)
    skipping = make_seq(seq.token_ids)
    skipping.skip_reading_prefix_cache = True
    admit(on, skipping)
    compute(on, skipping)  # still writes what it computed into the cache, for others
    repeat = make_seq(seq.token_ids)
    repeat.skip_reading_prefix_cache = True
    assert on.lookup(repeat) == [] and on.lookup(make_seq(seq.token_ids)) == skipping.block_table[:2]
    assert on.prefix_cache_queries == 0


@pytest.mark.parametrize("caching", [True, False])
def test_random_workload_shares_only_matching_content_and_returns_every_block(caching):
    """Sequences drawn from a few shared prefixes are admitted, computed in chunks, grown, freed
    and preempted at random. A fake cache records the token each slot was written with: every
    token a sequence counts as cached must be its own, wherever the block came from."""
    rng = random.Random(10)
    block_size, num_blocks = 4, 48
    manager = BlockManager(num_blocks, block_size, caching)
    written: dict[tuple[int, int], tuple[int, ...]] = {}  # (block, offset) -> the prefix written there
    prefixes = [random_tokens(rng, rng.randrange(4, 20)) for _ in range(4)]
    live: list[Sequence] = []
    hits = 0

    def step(seq: Sequence, count: int) -> None:
        for pos in range(seq.num_cached, seq.num_cached + count):
            written[seq.block_table[pos // block_size], pos % block_size] = tuple(seq.token_ids[: pos + 1])
        compute(manager, seq, count)

    for _ in range(600):
        action = rng.random()
        if action < 0.25:
            seq = make_seq(rng.choice(prefixes) + random_tokens(rng, rng.randrange(1, 12)))
            found = manager.lookup(seq)
            if manager.can_allocate(seq, found):
                manager.allocate(seq, found)
                hits += len(found)
                live.append(seq)
        elif action < 0.75 and live:
            seq = rng.choice(live)
            if seq.num_cached < seq.num_tokens:
                step(seq, rng.randrange(1, seq.num_tokens - seq.num_cached + 1))
            else:
                seq.token_ids.append(rng.randrange(1000))
                if manager.can_append(seq):
                    manager.append(seq)
                else:
                    seq.token_ids.pop()
        elif live:  # finished, cancelled or preempted: the block manager cannot tell them apart
            seq = live.pop(rng.randrange(len(live)))
            manager.free(seq)
            seq.num_cached = 0
        for seq in live:
            for pos in range(seq.num_cached):
                assert written[seq.block_table[pos // block_size], pos % block_size] == tuple(seq.token_ids[: pos + 1])
        held = [block for seq in live for block in seq.block_table]
        assert len(set(held)) == manager.num_used
        assert manager.num_used + manager.num_free == num_blocks
        assert all(manager._ref_counts[block] == held.count(block) for block in set(held))
    assert (hits > 20) == caching
    for seq in live:
        manager.free(seq)
    assert manager.num_used == 0 and manager.num_free == num_blocks


