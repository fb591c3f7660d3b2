"""One engine step on the device: scheduled sequences in, sampled tokens (and logprobs) out.

A step may mix decodes (one new token each, first) and prompt chunks (after them, each over the
prefix its sequence has cached); logits are computed only where a sequence's last token is.
The step's inputs (token ids, positions, cache slots, block tables, context lengths) are written
into buffers allocated once, host side through numpy views; on CUDA they reach their device twins
with asynchronous copies from pinned memory. The step's results come back to the host behind one
synchronisation, the step's only one.
"""

import numpy as np
import torch

from model.batch import ForwardBatch
from model.qwen3 import KVCache, Qwen3Model
from server.engine.config import EngineConfig
from server.engine.request import TokenLogprob
from server.engine.sampler import Sampler
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence


class _InputBuffer:
    """A flat host buffer and, on CUDA, its device twin: per-step inputs without per-step allocations."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device):
        self.host = torch.zeros(size, dtype=dtype, pin_memory=device.type == "cuda")
        self.np = self.host.numpy()
        self.device = self.host if device.type == "cpu" else torch.zeros(size, dtype=dtype, device=device)

    def load(self, n: int) -> torch.Tensor:
        """The device view of the first `n` entries, as written into `np`."""
        if self.device is not self.host:
            self.device[:n].copy_(self.host[:n], non_blocking=True)
        return self.device[:n]


class ModelRunner:
    def __init__(self, model: Qwen3Model, config: EngineConfig, eos_token_ids: tuple[int, ...]):
        """`config` is resolved: every size in it is set."""
        self.model = model
        self.block_size = config.block_size
        self.kv_cache: KVCache = model.allocate_kv_cache(config.num_kv_blocks, config.block_size)
        self.sampler = Sampler(model.config.vocab_size, model.device, eos_token_ids)
        device = model.device
        max_num_seqs, max_num_batched_tokens = config.max_num_seqs, config.max_num_batched_tokens
        max_blocks_per_seq = -(-config.max_model_len // config.block_size)
        self._token_ids = _InputBuffer(max_num_batched_tokens, torch.int64, device)
        self._positions = _InputBuffer(max_num_batched_tokens, torch.int64, device)
        self._slot_mapping = _InputBuffer(max_num_batched_tokens, torch.int64, device)
        self._block_tables = _InputBuffer(max_num_seqs * max_blocks_per_seq, torch.int32, device)
        self._context_lens = _InputBuffer(max_num_seqs, torch.int32, device)
        self._query_start_loc = _InputBuffer(max_num_seqs + 1, torch.int32, device)
        self._logits_indices = _InputBuffer(max_num_seqs, torch.int64, device)

    def run(self, batch: ScheduledBatch) -> list[tuple[int, TokenLogprob | None] | None]:
        """Per scheduled sequence: (sampled token, its logprobs if asked), or None for a prompt
        chunk that stops short of the prompt's end."""
        sampling_rows = [i for i in range(len(batch.seqs)) if batch.samples(i)]
        seqs = [batch.seqs[i] for i in sampling_rows]
        forward_batch = self._prepare(batch, sampling_rows)
        if seqs:  # the sampler's host-to-device copies go before the forward pass, not behind it
            self.sampler.prepare(seqs)
        logits = self.model.forward(forward_batch, self.kv_cache)
        results: list[tuple[int, TokenLogprob | None] | None] = [None] * len(batch.seqs)
        if not sampling_rows:
            return results
        sampled = self.sampler.sample(logits, seqs)
        token_ids, *logprobs = _to_host(
            sampled.token_ids, sampled.token_logprobs, sampled.top_ids, sampled.top_logprobs
        )
        logprob_of = dict(zip(sampled.logprob_rows, _token_logprobs(seqs, sampled.logprob_rows, token_ids, *logprobs)))
        for row, i in enumerate(sampling_rows):
            results[i] = (token_ids[row], logprob_of.get(row))
        return results

    def _prepare(self, batch: ScheduledBatch, sampling_rows: list[int]) -> ForwardBatch:
        """The step's inputs in one pass: the decodes' single tokens first, then the prompt chunks."""
        seqs, bs, d = batch.seqs, self.block_size, batch.num_decodes
        decodes = seqs[:d]
        positions = [seq.num_cached for seq in decodes]  # a decode's new token is its last one
        self._token_ids.np[:d] = [seq.token_ids[-1] for seq in decodes]
        self._positions.np[:d] = positions
        self._slot_mapping.np[:d] = [seq.block_table[pos // bs] * bs + pos % bs for seq, pos in zip(decodes, positions)]
        ends = list(range(1, d + 1))
        start = d
        for seq, num_new in zip(seqs[d:], batch.num_new_tokens[d:]):
            end = start + num_new
            chunk = np.arange(seq.num_cached, seq.num_cached + num_new)
            self._token_ids.np[start:end] = seq.token_ids[seq.num_cached : seq.num_cached + num_new]
            self._positions.np[start:end] = chunk
            self._slot_mapping.np[start:end] = np.asarray(seq.block_table)[chunk // bs] * bs + chunk % bs
            start = end
            ends.append(end)
        n = len(seqs)
        self._context_lens.np[:n] = [seq.num_cached + num_new for seq, num_new in zip(seqs, batch.num_new_tokens)]
        self._query_start_loc.np[0] = 0
        self._query_start_loc.np[1 : n + 1] = ends
        self._logits_indices.np[: len(sampling_rows)] = [ends[i] - 1 for i in sampling_rows]
        return ForwardBatch(
            token_ids=self._token_ids.load(start),
            positions=self._positions.load(start),
            slot_mapping=self._slot_mapping.load(start),
            block_tables=self._load_block_tables(seqs),
            context_lens=self._context_lens.load(n),
            query_start_loc=self._query_start_loc.load(n + 1),
            query_lens=list(batch.num_new_tokens),
            logits_indices=self._logits_indices.load(len(sampling_rows)),
        )

    def _load_block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        # [B, width], contiguous, as wide as the longest table in the batch (attention reads whole
        # rows). Entries past a row's end keep whatever earlier steps wrote there: block ids all,
        # hence valid padding, which the model never reads.
        rows, width = len(seqs), max(len(seq.block_table) for seq in seqs)
        tables = self._block_tables.np[: rows * width].reshape(rows, width)
        for row, seq in enumerate(seqs):
            tables[row, : len(seq.block_table)] = seq.block_table
        return self._block_tables.load(rows * width).view(rows, width)


def _to_host(*tensors: torch.Tensor | None) -> list:
    """Device tensors as Python lists, through one synchronisation on CUDA."""
    on_host = [None if t is None else t.to("cpu", non_blocking=True) for t in tensors]
    if any(t is not None and t.is_cuda for t in tensors):
        torch.cuda.current_stream().synchronize()
    return [None if t is None else t.tolist() for t in on_host]


def _token_logprobs(
    seqs: list[Sequence],
    rows: list[int],
    token_ids: list[int],
    token_logprobs: list[float] | None,
    top_ids: list[list[int]] | None,
    top_logprobs: list[list[float]] | None,
) -> list[TokenLogprob]:
    out = []
    for i, row in enumerate(rows):
        k = seqs[row].params.logprobs
        out.append(TokenLogprob(token_ids[row], token_logprobs[i], list(zip(top_ids[i][:k], top_logprobs[i][:k]))))
    return out
