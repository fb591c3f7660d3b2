"""CUDA-graph decode: the decode forward (token ids in, logits out) captured once per batch size,
and the verification forward of speculative decoding once per (batch size, 1 + k).

An eager decode step launches some fifteen kernels per layer from Python, and on a GPU the host
cannot launch them as fast as the GPU runs them. A CUDA graph replays every launch of the step
with one call. A graph fixes its kernels' arguments, pointers and grids, so:

- Each batch-size bucket (1, 2, 4, 8, then steps of 8 to 64 and of 16 beyond, up to the
  largest batch) has its own graph; a batch of n sequences runs in the smallest bucket that holds
  it. Rows past n are padding: they store nothing (slot -1), attend to one token (context
  length 1, block 0 of their table) and their logits are sliced off.
- A verification step (speculative decoding) brings q = 1 + k tokens per sequence, scored through
  the paged prefill path; its graphs are keyed by (bucket, q), each sequence on q rows. A sequence
  with fewer drafts has padding rows BEFORE its tokens: the prefill path places a sequence's rows
  at the last q positions of its context, so its tokens keep their true positions, and the padding
  queries attend to a prefix of the sequence's own context, which its block table covers. Padding
  rows store nothing (slot -1) and their logits are not sampled. Each sequence's context must hold
  q + 1 tokens (one cached before the window: the torch reference takes a window over an empty
  cache as the whole context); a padding sequence attends to q + 1 tokens of block 0.
- The inputs live in static buffers that every replay reads: token ids, positions, slot mapping,
  context lengths and block tables at their full width (`cdiv(max_model_len, block_size)`
  columns, so the table's shape never changes). `query_start_loc` and the logits indices of a
  decode step of b rows are always 0..b, those of a verification step 0, q, .., b*q and every row:
  constants built here once; the caller reads the logits rows it needs from the shared buffer.
- Graphs are captured largest first into one shared memory pool: a smaller graph reuses the
  memory of a larger one's activations (replays never overlap), a draft model's graphs too.
  Logits land in one buffer that every graph of a runner writes (one copy inside the graph), so
  no graph keeps a `[b, vocab]` output of its own. The sampler runs outside the graph, on rows of that buffer.
- Each bucket runs once eagerly before its capture: Triton compiles its kernels then (nothing may
  compile, allocate through cudaMalloc or read the device from the host during a capture). A
  graph whose warm-up runs out of memory is dropped, and larger batches run eagerly.

On CPU there is no graph: "capture" records the step function over the same static buffers and
"replay" calls it, so that the buffer logic (padding, rows left from a larger batch, bucket choice,
slicing) runs on CPU exactly as it does under a CUDA graph, and is tested there.
"""

import bisect
import contextlib
import gc
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from nanoserve_kernels.backend import use_triton
from model.batch import ForwardBatch
from model.qwen3 import KVCache, Qwen3Model

logger = logging.getLogger("nanoserve.engine")


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, steps of 8 to 64, steps of 16 beyond, and `max_batch`."""
    sizes = [1, 2, 4, *range(8, 64, 8), *range(64, max_batch, 16)]
    return [size for size in sizes if size < max_batch] + [max_batch]


def graphs_unavailable(device: torch.device, verification: bool = False) -> str | None:
    """Why decode (or, with `verification`, the verification step) cannot be captured on `device`,
    or None when it can."""
    # The references of these ops read lengths back to the host, which a CUDA graph cannot hold.
    probe = torch.empty(0, device=device)
    ops = ("attention_frontend", "prefill_attention") if verification else ("attention_frontend", "decode_attention")
    on_reference = [op for op in ops if not use_triton(probe, op)]
    if device.type == "cuda" and on_reference:
        return f"the torch reference of {' and '.join(on_reference)} (--kernels) reads lengths back to the host"
    return None


def padding_context_len(query_len: int) -> int:
    """The context a padding sequence of `query_len` tokens attends to (in block 0): one token for a
    decode, one before the window for a verification step (see the module docstring)."""
    return 1 if query_len == 1 else query_len + 1


def pad_tokens(token_ids, positions, slot_mapping, rows: slice) -> None:
    """`rows` of a step's per-token inputs (host numpy or device buffers alike) as padding tokens:
    token 0 at position 0, stored nowhere (slot -1)."""
    token_ids[rows] = 0
    positions[rows] = 0
    slot_mapping[rows] = -1


def write_padding(token_ids, positions, slot_mapping, context_lens, block_tables, first: int, bucket: int,
                  query_len: int, block_size: int) -> None:
    """Sequences [first, bucket) of a graph step as padding, in host (numpy) or device buffers
    alike: `query_len` rows each that store nothing, over `padding_context_len` tokens of block 0.
    `block_tables` is the step's [bucket, width] view."""
    pad_tokens(token_ids, positions, slot_mapping, slice(first * query_len, bucket * query_len))
    context = padding_context_len(query_len)
    context_lens[first:bucket] = context
    block_tables[first:bucket, : -(-context // block_size)] = 0


@dataclass
class StaticInputs:
    """A graph step's inputs on the device: flat buffers written before every replay; a step of
    bucket b and q tokens per sequence reads token rows [0, b * q), sequences [0, b), and sequence
    r's block table at [r * table_width, (r + 1) * table_width)."""

    token_ids: torch.Tensor  # int64
    positions: torch.Tensor  # int64
    slot_mapping: torch.Tensor  # int64
    context_lens: torch.Tensor  # int32
    block_tables: torch.Tensor  # int32
    table_width: int


@dataclass
class CaptureSummary:
    buckets: list[int]
    seconds: float
    memory_bytes: int  # device memory the graphs hold: their pool, the logits buffer (0 on CPU)
    dropped: list[int]  # buckets whose warm-up ran out of memory, smallest first
    verify_query_len: int | None = None  # q of the verification graphs, None without them
    verify_buckets: list[int] = field(default_factory=list)
    verify_dropped: list[int] = field(default_factory=list)

    def describe(self, device: torch.device) -> str:
        what = "CUDA graphs" if device.type == "cuda" else "recorded decode steps (CPU replay)"
        text = f"{what} for {len(self.buckets)} batch sizes ({self.buckets[0]}-{self.buckets[-1]})"
        if self.verify_buckets:
            text += (f" and verification steps of {self.verify_query_len} tokens for "
                     f"{len(self.verify_buckets)} ({self.verify_buckets[0]}-{self.verify_buckets[-1]})")
        text += f" in {self.seconds:.1f} s"
        if device.type == "cuda":
            text += f", {self.memory_bytes / 2**30:.2f} GiB of GPU memory"
        if self.dropped:
            text += f"; larger batches run eagerly ({self.dropped[-1]} did not fit in memory)"
        if self.verify_dropped:
            text += f"; larger verifications run eagerly ({self.verify_dropped[-1]} did not fit in memory)"
        return text


@contextlib.contextmanager
def frozen_gc() -> Iterator[None]:
    """The garbage collector kept off the objects alive now, for the block's length. A capture
    allocates many small objects, each collection then walks every object the process holds (the
    model, the tokenizer), and a collection started during a capture would pause it for that
    long; vLLM took Qwen3-0.6B's capture from 35 s to 2 s this way."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


Key = tuple[int, int]  # (bucket, tokens per sequence)


class DecodeGraphRunner:
    """The decode forward per bucket over `inputs`, and the verification forward per bucket of
    `verify_buckets` with `verify_query_len` tokens a sequence; captured on CUDA, recorded on CPU."""

    def __init__(self, model: Qwen3Model, kv_cache: KVCache, inputs: StaticInputs, buckets: list[int],
                 verify_query_len: int | None = None, verify_buckets: list[int] = ()):
        self.model = model
        self.kv_cache = kv_cache
        self.inputs = inputs
        self.block_size = kv_cache[0][0].shape[1]
        self.buckets = sorted(buckets)
        self.verify_query_len = verify_query_len if verify_buckets else None
        self.verify_buckets = sorted(verify_buckets) if self.verify_query_len else []
        keys = [(bucket, 1) for bucket in self.buckets] + [(bucket, verify_query_len) for bucket in self.verify_buckets]
        device, most_rows = model.device, max(bucket * q for bucket, q in keys)
        self._arange = torch.arange(most_rows + 1, device=device)
        with torch.inference_mode():
            self._logits = torch.empty(most_rows, model.config.vocab_size, dtype=torch.float32, device=device)
        self._batches = {key: self._static_batch(*key) for key in keys}
        self._graphs: dict[Key, torch.cuda.CUDAGraph] = {}
        self.pool = None  # the CUDA memory pool the graphs were captured into

    def bucket_for(self, rows: int, query_len: int = 1) -> int | None:
        """The smallest bucket holding `rows` sequences of `query_len` tokens, or None when none does."""
        buckets = self._buckets_of(query_len)
        index = bisect.bisect_left(buckets, rows)
        return buckets[index] if index < len(buckets) else None

    def has(self, bucket: int, query_len: int) -> bool:
        """Whether a graph of `bucket` sequences of `query_len` tokens was captured."""
        return bucket in self._buckets_of(query_len)

    def _buckets_of(self, query_len: int) -> list[int]:
        return self.buckets if query_len == 1 else self.verify_buckets if query_len == self.verify_query_len else []

    def static_batch(self, bucket: int, query_len: int = 1) -> ForwardBatch:
        """The step a replay of (bucket, query_len) runs, as a batch over the static buffers."""
        return self._batches[bucket, query_len]

    def load(self, batch: ForwardBatch, bucket: int, query_len: int = 1) -> None:
        """Copy `batch` (its sequences of `query_len` tokens each) into the static buffers on the
        device, sequences past it up to `bucket` as padding: for steps whose inputs were not written
        there (a draft model's own steps, another runner's step)."""
        i, n, tokens = self.inputs, len(batch.query_lens), batch.token_ids.shape[0]
        i.token_ids[:tokens].copy_(batch.token_ids)
        i.positions[:tokens].copy_(batch.positions)
        i.slot_mapping[:tokens].copy_(batch.slot_mapping)
        i.context_lens[:n].copy_(batch.context_lens)
        tables = i.block_tables[: bucket * i.table_width].view(bucket, i.table_width)
        tables[:n, : batch.block_tables.shape[1]].copy_(batch.block_tables)
        write_padding(i.token_ids, i.positions, i.slot_mapping, i.context_lens, tables, n, bucket, query_len,
                      self.block_size)

    def replay(self, bucket: int, rows: int, query_len: int = 1) -> torch.Tensor:
        """Logits [rows * query_len, vocab] of the step whose inputs fill the static buffers' rows,
        sequence after sequence; sequences up to `bucket` must hold padding. The result is
        overwritten by the next replay."""
        if self.model.device.type == "cuda":
            self._graphs[bucket, query_len].replay()
        else:
            self._step((bucket, query_len))
        return self._logits[: rows * query_len]

    def capture(self, pool=None) -> CaptureSummary:
        """Record every graph's step (CPU), or warm up and capture it (CUDA), most rows first, into
        `pool` (a `torch.cuda.graph_pool_handle`; a new one by default)."""
        self.pool = pool
        with frozen_gc():
            return self._capture()

    def _capture(self) -> CaptureSummary:
        started = time.perf_counter()
        if self.model.device.type != "cuda":
            return CaptureSummary(self.buckets, time.perf_counter() - started, 0, [], self.verify_query_len,
                                  self.verify_buckets)
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        dropped: list[Key] = []
        keys = sorted(self._batches, key=lambda key: (key[0] * key[1], key[1]), reverse=True)
        with torch.inference_mode(), torch.cuda.stream(stream):
            for key in tqdm(keys, desc="capturing CUDA graphs", unit="graph"):
                if dropped:  # a larger graph did not fit: this one is captured only if it does
                    torch.cuda.empty_cache()
                self._fill_padding(key[1])
                try:
                    self._step(key)  # warm-up: compiles the kernels; its peak is the graph's
                except torch.cuda.OutOfMemoryError:
                    dropped.append(key)
                    continue
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self._step(key)
                self._graphs[key] = graph
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # what the warm-ups left cached is not the graphs' memory
        self.buckets = sorted(bucket for bucket, q in self._graphs if q == 1)
        if not self.buckets:
            raise RuntimeError("no CUDA graph fits in GPU memory, not even for one sequence: use --enforce-eager")
        self.verify_buckets = sorted(bucket for bucket, q in self._graphs if q != 1)
        memory = free_before - torch.cuda.mem_get_info()[0] + self._logits.nbytes
        summary = CaptureSummary(self.buckets, time.perf_counter() - started, memory,
                                 sorted(bucket for bucket, q in dropped if q == 1), self.verify_query_len,
                                 self.verify_buckets, sorted(bucket for bucket, q in dropped if q != 1))
        logger.info("captured %s", summary.describe(self.model.device))
        return summary

    @torch.inference_mode()
    def _step(self, key: Key) -> None:
        """What a graph holds: the forward over the static inputs, logits into the shared buffer."""
        batch = self._batches[key]
        logits = self.model.forward(batch, self.kv_cache)
        self._logits[: batch.token_ids.shape[0]].copy_(logits)

    def _static_batch(self, bucket: int, query_len: int) -> ForwardBatch:
        i, width, rows = self.inputs, self.inputs.table_width, bucket * query_len
        return ForwardBatch(
            token_ids=i.token_ids[:rows],
            positions=i.positions[:rows],
            slot_mapping=i.slot_mapping[:rows],
            block_tables=i.block_tables[: bucket * width].view(bucket, width),
            context_lens=i.context_lens[:bucket],
            query_start_loc=self._arange[: rows + 1 : query_len].to(torch.int32),
            query_lens=[query_len] * bucket,
            logits_indices=self._arange[:rows],
        )

    def _fill_padding(self, query_len: int) -> None:
        """Every sequence a padding one, so that warm-ups and captures store nothing in the cache."""
        i, width = self.inputs, self.inputs.table_width
        bucket = min(i.context_lens.shape[0], i.token_ids.shape[0] // query_len)
        write_padding(i.token_ids, i.positions, i.slot_mapping, i.context_lens,
                      i.block_tables[: bucket * width].view(bucket, width), 0, bucket, query_len, self.block_size)
