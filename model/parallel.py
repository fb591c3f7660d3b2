"""Tensor parallelism as the model sees it: which part of every weight this rank holds, and the two
collectives the forward pass needs. The model never creates process groups; the engine hands it
`Collectives` (see `server.engine.distributed`).

The split is Megatron's, as vLLM, SGLang and nano-vllm do it:
- attention is split by heads: q, k and v column-parallel (each rank its query heads and the KV
  heads they read; with fewer KV heads than ranks, each KV head is replicated on the ranks whose
  query heads read it), each rank's own KV cache over its KV heads; o_proj row-parallel;
- the MLP is split by its intermediate dimension: gate/up column-parallel, down_proj row-parallel;
- after each row-parallel projection every rank holds a partial sum of the full hidden state:
  one all-reduce makes it whole again (two per layer);
- the embedding and LM head are split by vocabulary rows (padded up to a multiple of the ranks):
  a rank's lookup yields zeros for ids outside its rows (one all-reduce sums them), and its LM
  head gives the logits of its rows, gathered into the full vocabulary for the sampler.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.config import Qwen3Config


@dataclass(frozen=True)
class Collectives:
    """What the forward pass asks of the other ranks."""

    all_reduce: Callable[[torch.Tensor], None]  # sums the tensor over the ranks, in place
    all_gather: Callable[[torch.Tensor], torch.Tensor]  # [*shape] -> [ranks, *shape], rank order


@dataclass(frozen=True)
class Shard:
    """One rank's part of the model: sizes on this rank and where they start in the full weights."""

    rank: int
    size: int  # ranks in all (the tensor-parallel size)
    num_heads: int
    num_kv_heads: int
    kv_head_start: int  # the first of the full model's KV heads that this rank holds
    intermediate_size: int
    vocab_rows: int  # rows of the embedding and LM head per rank (the last rank's may run past the vocabulary)
    vocab_size: int  # the full vocabulary

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_rows

    @property
    def vocab_end(self) -> int:
        """Past this rank's last real vocabulary row (rows up to vocab_rows past that are padding)."""
        return min(self.vocab_start + self.vocab_rows, self.vocab_size)


def shard_of(config: Qwen3Config, rank: int = 0, size: int = 1) -> Shard:
    """This rank's shard of `config`, or ValueError naming what `size` does not divide."""
    c = config
    if size < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, got {size}")
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in 0..{size - 1}")
    if c.num_heads % size:
        raise ValueError(f"--tensor-parallel-size {size} does not divide the model's {c.num_heads} attention heads")
    if c.intermediate_size % size:
        raise ValueError(f"--tensor-parallel-size {size} does not divide the model's intermediate size "
                         f"{c.intermediate_size}")
    if c.num_kv_heads >= size:
        if c.num_kv_heads % size:
            raise ValueError(f"--tensor-parallel-size {size} does not divide the model's {c.num_kv_heads} KV heads")
        num_kv_heads, kv_head_start = c.num_kv_heads // size, rank * (c.num_kv_heads // size)
    else:  # each KV head serves size / num_kv_heads ranks, all of whose query heads read it
        if size % c.num_kv_heads:
            raise ValueError(f"--tensor-parallel-size {size} is not a multiple of the model's {c.num_kv_heads} KV "
                             f"heads (each KV head must be replicated on a whole number of ranks)")
        num_kv_heads, kv_head_start = 1, rank * c.num_kv_heads // size
    return Shard(rank=rank, size=size, num_heads=c.num_heads // size, num_kv_heads=num_kv_heads,
                 kv_head_start=kv_head_start, intermediate_size=c.intermediate_size // size,
                 vocab_rows=-(-c.vocab_size // size), vocab_size=c.vocab_size)
