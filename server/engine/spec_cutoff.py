"""The batch size above which speculation stops paying, measured on this model and device at load.

A decode step of a small batch is bound by reading the weights, so scoring 1 + k tokens per
sequence costs little more than 1; as the batch grows the step becomes bound by compute, and
verifying k drafts per sequence costs nearly k + 1 times as much. Speculation is kept for the
batch sizes (powers of two) whose verification step costs at most MAX_VERIFY_COST times a plain
decode step of the same batch: a window must then keep that many tokens on average to pay, which
the per-sequence acceptance tracking (`speculative.py`) checks for the rest.
"""

import time

import torch

from model.batch import SequenceStep, make_batch
from model.qwen3 import KVCache, Qwen3Model

MAX_VERIFY_COST = 2.0
CONTEXT = 128  # cached tokens each timed sequence attends to
REPEATS = 3


def _step_seconds(model: Qwen3Model, kv_cache: KVCache, block_size: int, batch_size: int, query_len: int) -> float:
    """Seconds (the fastest of REPEATS: on a shared machine others' work only adds time) of a forward step of `batch_size` sequences with `query_len` new tokens each
    over CONTEXT cached ones. Nothing is stored (slot -1); every sequence reads the same blocks."""
    num_blocks = kv_cache[0][0].shape[0]
    table = [block % num_blocks for block in range(-(-(CONTEXT + query_len) // block_size))]
    steps = [SequenceStep([1] * query_len, CONTEXT, table) for _ in range(batch_size)]
    batch = make_batch(steps, block_size, model.device, all_logits=True)
    batch.slot_mapping.fill_(-1)
    times = []
    for _ in range(REPEATS + 1):  # the first warms up
        start = time.perf_counter()
        model.forward(batch, kv_cache)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times[1:])


@torch.inference_mode()
def measure_cutoff(model: Qwen3Model, kv_cache: KVCache, block_size: int, num_draft: int,
                   max_num_seqs: int) -> tuple[int, str]:
    """The largest batch size (0: none) whose verification of `num_draft` drafts per sequence costs
    at most MAX_VERIFY_COST plain decode steps; and a line saying what was measured."""
    cutoff, ratios = 0, []
    batch_size = 1
    while batch_size <= max_num_seqs:
        ratio = (_step_seconds(model, kv_cache, block_size, batch_size, 1 + num_draft)
                 / _step_seconds(model, kv_cache, block_size, batch_size, 1))
        ratios.append(f"{batch_size}: {ratio:.2f}x")
        if ratio > MAX_VERIFY_COST:
            break
        cutoff, batch_size = batch_size, 2 * batch_size
    return cutoff, (f"speculation on up to {cutoff} decoding sequences (verifying {num_draft} drafts costs, "
                    f"by batch size, {', '.join(ratios)} a decode step; limit {MAX_VERIFY_COST}x; "
                    "disable_by_batch_size sets it)")
