"""The KV cache's fixed pool of blocks, handed out to sequences and shared through a prefix cache.

A block holds `block_size` tokens' K/V in every layer. A sequence's block table lists its blocks
in order: token `pos` lives in block `block_table[pos // block_size]` at offset
`pos % block_size`.

Prefix caching (on unless `--no-prefix-caching`): once a finished step has written a full block's
K/V, the block is registered under a hash of its parent block's hash and its own token ids, so
equal prefixes give equal chains of hashes. A sequence being admitted takes the longest chain of
its tokens' full blocks found in the cache (always leaving its last token to compute, for its
logits) and computes only the rest. Blocks count their users; one whose last user lets go keeps
its K/V and its hash and stays findable among the free blocks until the allocator has no empty
block left, then the least recently used is evicted first. Blocks only ever written while whole
are shared: a sequence writes past its shared blocks, never into them.
"""

import array
import hashlib
from collections import OrderedDict

from server.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._hashes: list[bytes | None] = [None] * num_blocks  # of blocks registered in the cache
        self._cached: dict[bytes, int] = {}  # block hash -> the block holding that content
        # Free blocks without content, popped from the end: recently freed ones are reused first
        # (warm in the CPU's caches).
        self._empty = list(range(num_blocks - 1, -1, -1))
        # Free blocks that still hold cached content, least recently freed first: evicted in this order.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.prefix_cache_queries = 0  # tokens of admitted sequences looked up in the cache
        self.prefix_cache_hits = 0  # of those, tokens found

    @property
    def num_free(self) -> int:
        """Blocks a sequence can be given: empty ones and cached ones nobody uses."""
        return len(self._empty) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.num_free

    @property
    def num_free_cached(self) -> int:
        """Free blocks that still hold cached K/V."""
        return len(self._evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def reads_cache(self, seq: Sequence) -> bool:
        return self.enable_prefix_caching and not seq.skip_reading_prefix_cache

    def lookup(self, seq: Sequence) -> list[int]:
        """The cached blocks that hold the longest chain of the sequence's leading full blocks,
        short of its last token."""
        if not self.reads_cache(seq):
            return []
        hits = []
        count = (seq.num_tokens - 1) // self.block_size
        for block_hash in self._block_hashes(seq, count)[:count]:
            block = self._cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, seq: Sequence, hits: list[int]) -> bool:
        """Whether the sequence's tokens fit, sharing `hits` (from `lookup`)."""
        hits_free = sum(self._ref_counts[block] == 0 for block in hits)
        return self.blocks_for(seq.num_tokens) - len(hits) + hits_free <= self.num_free

    def allocate(self, seq: Sequence, hits: list[int]) -> None:
        """Blocks for every token the sequence holds (its prompt, or prompt + output when
        recomputed): `hits` shared, their tokens counted as cached, the rest new."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        for block in hits:  # taken first, so that the new blocks below cannot evict them
            if self._ref_counts[block] == 0:
                del self._evictable[block]
            self._ref_counts[block] += 1
        seq.block_table = hits + [self._take() for _ in range(self.blocks_for(seq.num_tokens) - len(hits))]
        seq.num_cached = len(hits) * self.block_size
        if self.reads_cache(seq):
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += seq.num_cached

    def can_append(self, seq: Sequence) -> bool:
        """Whether the sequence's newest token has a slot, or a free block can give it one."""
        return seq.num_tokens <= len(seq.block_table) * self.block_size or self.num_free > 0

    def append(self, seq: Sequence, num_draft: int = 0) -> None:
        """Slots up to the sequence's newest token, and `num_draft` draft tokens after it."""
        while seq.num_tokens + num_draft > len(seq.block_table) * self.block_size:
            seq.block_table.append(self._take())

    def free_slots(self, seq: Sequence) -> int:
        """Slots past the sequence's newest token that it holds or the free blocks could give it."""
        return (len(seq.block_table) + self.num_free) * self.block_size - seq.num_tokens

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past the sequence's tokens: those only rejected drafts wrote.
        Never cached (`cache_full_blocks` registers computed tokens only), so they go back empty."""
        keep = self.blocks_for(seq.num_tokens)
        for block in seq.block_table[keep:]:
            assert self._ref_counts[block] == 1 and self._hashes[block] is None, f"block {block} is shared"
            self._ref_counts[block] = 0
            self._empty.append(block)
        del seq.block_table[keep:]

    def cache_full_blocks(self, seq: Sequence, first: int) -> None:
        """Register the sequence's blocks from index `first` to its last full one whose K/V a
        finished step has written (`seq.num_cached`). Content already cached in another block
        stays registered there; this block then stays private."""
        if not self.enable_prefix_caching:
            return
        last = seq.num_cached // self.block_size
        hashes = self._block_hashes(seq, last)
        for index in range(first, last):
            block_hash = hashes[index]
            if block_hash not in self._cached:
                block = seq.block_table[index]
                self._cached[block_hash] = block
                self._hashes[block] = block_hash

    def free(self, seq: Sequence) -> None:
        """Let go of the sequence's blocks; a block whose last user this was becomes free. The
        table is walked from its end, so that a sequence's last blocks are evicted before its
        first ones, which more sequences share."""
        for block in reversed(seq.block_table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if self._hashes[block] is None:
                    self._empty.append(block)
                else:
                    self._evictable[block] = None
        seq.block_table = []

    def _take(self) -> int:
        """A free block for one user: an empty one, else the least recently freed cached one."""
        if self._empty:
            block = self._empty.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._hashes[block]]
            self._hashes[block] = None
        self._ref_counts[block] = 1
        return block

    def _block_hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """Hashes of (at least) the sequence's first `count` full blocks, each over its parent's hash and its
        token ids (SHA-256, so that no prompt can be made to collide with another's blocks).
        Computed once per block and kept on the sequence: its tokens never change."""
        hashes, size = seq.block_hashes, self.block_size
        while len(hashes) < count:
            start = len(hashes) * size
            tokens = array.array("q", seq.token_ids[start : start + size]).tobytes()
            hashes.append(hashlib.sha256((hashes[-1] if hashes else b"") + tokens).digest())
        return hashes
