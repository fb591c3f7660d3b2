"""How many KV-cache blocks fit on a CUDA device beside the weights and the largest step."""

import torch

from model.batch import ForwardBatch
from model.qwen3 import KVCache, Qwen3Model

# What the memory profile of a CUDA device leaves unused: other processes and fragmentation.
GPU_MEMORY_UTILIZATION = 0.9


def profile_step(
    model: Qwen3Model, block_size: int, max_num_batched_tokens: int, max_num_seqs: int
) -> tuple[ForwardBatch, KVCache]:
    """The largest step, as a prefill of `max_num_batched_tokens` tokens into a one-block cache.

    Attention reads a key's block from the table for every key below the context length, so the
    table is as wide as the context (every entry block 0, zeroed) even though no slot is stored
    (-1): a one-wide table would send the kernel past its end, to block ids that are not in the cache.
    """
    c, device, tokens = model.config, model.device, max_num_batched_tokens
    kv_cache = model.allocate_kv_cache(1, block_size)
    for k_cache, v_cache in kv_cache:
        k_cache.zero_()
        v_cache.zero_()
    batch = ForwardBatch(
        token_ids=torch.zeros(tokens, dtype=torch.int64, device=device),
        positions=torch.arange(tokens, device=device) % c.max_position_embeddings,
        slot_mapping=torch.full((tokens,), -1, dtype=torch.int64, device=device),
        block_tables=torch.zeros(1, -(-tokens // block_size), dtype=torch.int32, device=device),
        context_lens=torch.tensor([tokens], dtype=torch.int32, device=device),
        query_start_loc=torch.tensor([0, tokens], dtype=torch.int32, device=device),
        query_lens=[tokens],
        logits_indices=torch.full((max_num_seqs,), tokens - 1, dtype=torch.int64, device=device),
    )
    return batch, kv_cache


def kv_blocks_for_free_memory(
    model: Qwen3Model, block_size: int, max_num_batched_tokens: int, max_num_seqs: int
) -> int:
    """On CUDA: as many KV blocks as fit beside the weights and the largest step's activations.

    The largest step is measured, not estimated: a prefill of `max_num_batched_tokens` tokens
    (`profile_step`: into a one-block cache whose stores are skipped) and a top-p + logprobs draw for
    `max_num_seqs` rows.
    """
    c = model.config
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    batch, kv_cache = profile_step(model, block_size, max_num_batched_tokens, max_num_seqs)
    logits = model.forward(batch, kv_cache)
    logits.sort(-1, descending=True)  # results dropped at once: only the peak they reach counts
    logits.log_softmax(-1).topk(20, -1)
    torch.cuda.synchronize()
    activations = torch.cuda.max_memory_allocated() - before
    del logits, batch, kv_cache
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    budget = free - activations - (1 - GPU_MEMORY_UTILIZATION) * total
    block_bytes = 2 * c.num_layers * block_size * model.shard.num_kv_heads * c.head_dim * model.dtype.itemsize
    if budget < block_bytes:
        raise RuntimeError(
            f"no GPU memory left for the KV cache: {free / 2**30:.1f} GiB free, the largest step needs "
            f"{activations / 2**30:.1f} GiB (lower --max-num-batched-tokens or --max-num-seqs, or set --num-kv-blocks)"
        )
    return int(budget // block_bytes)
