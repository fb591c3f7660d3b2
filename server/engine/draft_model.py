"""A smaller model with the target's tokenizer, proposing draft tokens (`"method": "draft_model"`).

The draft runs in the engine beside the target over its own paged KV cache, laid out like the
target's: the same number of blocks of the same size, and each sequence's K/V at the same slots,
through the sequence's own block table. So the draft needs no blocks, tables or prefix cache of
its own: every step the target computes, the draft computes too (`mirror`: the same inputs, its
own cache), and what the prefix cache shares holds the draft's K/V as well as the target's.
Proposing runs k greedy decode steps of the draft for all speculating sequences at once, writing
the draft's K/V of its own proposals at the slots the target's verification then overwrites with
its own. Greedy proposals are deterministic, the one-hot proposals rejection sampling takes.

With CUDA graphs the draft has its own (`cuda_graph.py`, the target's keys: decode per bucket and
verification per bucket and 1 + k) over its own cache and static buffers: its proposal steps
replay its decode graphs, and a step the target replays is mirrored by copying the target's
static inputs into the draft's and replaying the draft's graph of the same key.
"""

import torch

from model.batch import ForwardBatch, SequenceStep, make_batch
from model.qwen3 import Qwen3Model
from server.engine.cuda_graph import CaptureSummary, DecodeGraphRunner, StaticInputs
from server.engine.sequence import Sequence


class DraftModel:
    def __init__(self, model: Qwen3Model, num_blocks: int, block_size: int, num_token_ids: int):
        self.model = model
        self.block_size = block_size
        self.num_token_ids = num_token_ids  # ids from here on have no token: never proposed
        self.kv_cache = model.allocate_kv_cache(num_blocks, block_size)
        self.graphs: DecodeGraphRunner | None = None

    def capture_graphs(self, target: DecodeGraphRunner) -> CaptureSummary:
        """Graphs of the draft for every key `target` has, into the target's memory pool."""
        device, t = self.model.device, target.inputs
        inputs = StaticInputs(*(torch.zeros_like(buffer, device=device) for buffer in
                                (t.token_ids, t.positions, t.slot_mapping, t.context_lens, t.block_tables)),
                              t.table_width)
        self.graphs = DecodeGraphRunner(self.model, self.kv_cache, inputs, target.buckets, target.verify_query_len,
                                        target.verify_buckets)
        return self.graphs.capture(target.pool)

    @torch.inference_mode()
    def mirror(self, batch: ForwardBatch, key: tuple[int, int] | None = None) -> None:
        """Compute the K/V of the target's step in the draft's cache (its logits are not used);
        `key`: the target replayed that graph, `batch` being its static batch."""
        if key is not None and self.graphs is not None and self.graphs.has(*key):
            self.graphs.load(batch, *key)
            self.graphs.replay(key[0], key[0], key[1])
        else:
            self.model.forward(batch, self.kv_cache)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], counts: list[int]) -> list[list[int]]:
        """`counts[i]` greedy draft tokens after each sequence's tokens. The sequences hold slots
        for them (the scheduler appended them); the draft writes K/V up to the last but one."""
        drafts: list[list[int]] = [[] for _ in seqs]
        last = [seq.token_ids[-1] for seq in seqs]
        for step in range(max(counts)):
            live = [i for i, count in enumerate(counts) if count > step]
            steps = [SequenceStep([last[i]], seqs[i].num_tokens - 1 + step, seqs[i].block_table) for i in live]
            logits = self._decode(make_batch(steps, self.block_size, self.model.device))
            tokens = logits[:, : self.num_token_ids].max(-1).indices.tolist()
            for i, token in zip(live, tokens):
                drafts[i].append(token)
                last[i] = token
        return drafts

    def _decode(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits of a decode step of the draft: its graph's replay where one holds the batch."""
        n = len(batch.query_lens)
        bucket = self.graphs.bucket_for(n) if self.graphs is not None else None
        if bucket is None:
            return self.model.forward(batch, self.kv_cache)
        self.graphs.load(batch, bucket)
        return self.graphs.replay(bucket, n)


def check_vocabularies(target_vocab: int, draft_vocab: int, target_tokens: int, draft_tokens: int) -> None:
    """ValueError unless the draft reads and writes the target's token ids."""
    if (target_vocab, target_tokens) != (draft_vocab, draft_tokens):
        raise ValueError(
            f"--speculative-config: the draft model's vocabulary ({draft_tokens} tokens, {draft_vocab} embedding "
            f"rows) differs from the target's ({target_tokens} tokens, {target_vocab} rows); a draft model must "
            "share the target's tokenizer")
