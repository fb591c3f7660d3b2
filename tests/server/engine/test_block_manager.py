"""The KV block pool: every block has one owner at most, and all come back."""

import random

from server.engine.block_manager import BlockManager
from server.engine.request import GenerationRequest
from server.engine.sequence import Sequence


def make_seq(seq_id: int, num_tokens: int) -> Sequence:
    return Sequence(seq_id, GenerationRequest(f"r{seq_id}", [1] * num_tokens), 0, 1000, (), detokenizer=None)


def test_random_allocate_append_free_keeps_the_pool_consistent():
    rng = random.Random(7)
    manager = BlockManager(num_blocks=40, block_size=4)
    live: list[Sequence] = []
    for seq_id in range(400):
        action = rng.random()
        if action < 0.3:
            seq = make_seq(seq_id, rng.randrange(1, 30))
            if manager.can_allocate(seq):
                manager.allocate(seq)
                assert len(seq.block_table) == -(-seq.num_tokens // 4)
                live.append(seq)
        elif action < 0.8 and live:
            seq = rng.choice(live)
            seq.token_ids.append(0)
            if manager.can_append(seq):
                manager.append(seq)
                assert len(seq.block_table) * 4 >= seq.num_tokens
            else:
                seq.token_ids.pop()
        elif live:
            manager.free(live.pop(rng.randrange(len(live))))
        owned = [block for seq in live for block in seq.block_table]
        assert len(owned) == len(set(owned)) == manager.num_used
        assert manager.num_used + manager.num_free == 40
    for seq in live:
        manager.free(seq)
    assert manager.num_free == 40 and manager.num_used == 0


def test_append_takes_a_block_only_at_a_block_boundary():
    manager = BlockManager(num_blocks=3, block_size=4)
    seq = make_seq(0, 4)
    manager.allocate(seq)
    assert manager.num_used == 1 and manager.can_append(seq)
    seq.token_ids.append(0)  # the 5th token needs a second block
    manager.append(seq)
    assert manager.num_used == 2
    for _ in range(3):  # tokens 6..8 fit the second block
        seq.token_ids.append(0)
        manager.append(seq)
    assert manager.num_used == 2
    other = make_seq(1, 4)
    manager.allocate(other)
    seq.token_ids.append(0)  # the 9th would need a fourth block
    assert not manager.can_append(seq)
