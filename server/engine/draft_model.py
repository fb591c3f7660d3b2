"""A smaller model with the target's tokenizer, proposing draft tokens (`"method": "draft_model"`).

The draft runs in the engine beside the target over its own paged KV cache, laid out like the
target's: the same number of blocks of the same size, and each sequence's K/V at the same slots,
through the sequence's own block table. So the draft needs no blocks, tables or prefix cache of
its own: every step the target computes, the draft computes too (`mirror`: the same inputs, its
own cache), and what the prefix cache shares holds the draft's K/V as well as the target's.
Proposing runs k greedy decode steps of the draft for all speculating sequences at once, writing
the draft's K/V of its own proposals at the slots the target's verification then overwrites with
its own. Greedy proposals are deterministic, the one-hot proposals rejection sampling takes.
"""

import torch

from model.batch import ForwardBatch, SequenceStep, make_batch
from model.qwen3 import Qwen3Model
from server.engine.sequence import Sequence


class DraftModel:
    def __init__(self, model: Qwen3Model, num_blocks: int, block_size: int, num_token_ids: int):
        self.model = model
        self.block_size = block_size
        self.num_token_ids = num_token_ids  # ids from here on have no token: never proposed
        self.kv_cache = model.allocate_kv_cache(num_blocks, block_size)

    @torch.inference_mode()
    def mirror(self, batch: ForwardBatch) -> None:
        """Compute the K/V of the target's step in the draft's cache (its logits are not used)."""
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
            logits = self.model.forward(make_batch(steps, self.block_size, self.model.device), self.kv_cache)
            tokens = logits[:, : self.num_token_ids].max(-1).indices.tolist()
            for i, token in zip(live, tokens):
                drafts[i].append(token)
                last[i] = token
        return drafts


def check_vocabularies(target_vocab: int, draft_vocab: int, target_tokens: int, draft_tokens: int) -> None:
    """ValueError unless the draft reads and writes the target's token ids."""
    if (target_vocab, target_tokens) != (draft_vocab, draft_tokens):
        raise ValueError(
            f"--speculative-config: the draft model's vocabulary ({draft_tokens} tokens, {draft_vocab} embedding "
            f"rows) differs from the target's ({target_tokens} tokens, {target_vocab} rows); a draft model must "
            "share the target's tokenizer")
