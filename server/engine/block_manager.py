"""The KV cache's fixed pool of blocks, handed out to sequences and taken back.

A block holds `block_size` tokens' K/V in every layer. A sequence's block table lists its blocks
in order: token `pos` lives in block `block_table[pos // block_size]` at offset
`pos % block_size`. There is no prefix sharing: every block has exactly one owner.
"""

from server.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Popped from the end, so recently freed blocks are reused first (warm in the cache).
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence) -> bool:
        return self.blocks_for(seq.num_tokens) <= len(self._free)

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token the sequence holds (its prompt, or prompt + output when recomputed)."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        count = self.blocks_for(seq.num_tokens)
        seq.block_table = self._free[-count:][::-1] if count else []
        del self._free[len(self._free) - count :]

    def can_append(self, seq: Sequence) -> bool:
        """Whether the sequence's newest token has a slot, or a free block can give it one."""
        return seq.num_tokens <= len(seq.block_table) * self.block_size or bool(self._free)

    def append(self, seq: Sequence) -> None:
        if seq.num_tokens > len(seq.block_table) * self.block_size:
            seq.block_table.append(self._free.pop())

    def free(self, seq: Sequence) -> None:
        self._free.extend(reversed(seq.block_table))
        seq.block_table = []
