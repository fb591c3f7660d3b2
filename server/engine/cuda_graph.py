"""CUDA-graph decode: the decode forward (token ids in, logits out) captured once per batch size.

An eager decode step launches some fifteen kernels per layer from Python, and on a GPU the host
cannot launch them as fast as the GPU runs them. A CUDA graph replays every launch of the step
with one call. A graph fixes its kernels' arguments, pointers and grids, so:

- Each batch-size bucket (1, 2, 4, 8, then steps of 8 to 64 and of 16 beyond, up to the
  largest batch) has its own graph; a batch of n sequences runs in the smallest bucket that holds
  it. Rows past n are padding: they store nothing (slot -1), attend to one token (context
  length 1, block 0 of their table) and their logits are sliced off.
- The inputs live in static buffers that every replay reads: token ids, positions, slot mapping,
  context lengths and block tables at their full width (`cdiv(max_model_len, block_size)`
  columns, so the table's shape never changes). `query_start_loc` and the logits indices of a
  decode step of b rows are always 0..b: constants built here once.
- Graphs are captured largest first into one shared memory pool: a smaller graph reuses the
  memory of a larger one's activations (replays never overlap). Logits land in one buffer that
  every graph writes (one copy inside the graph), so no graph keeps a `[b, vocab]` output of its
  own. The sampler runs outside the graph, on a slice of that buffer.
- Each bucket runs once eagerly before its capture: Triton compiles its kernels then (nothing may
  compile, allocate through cudaMalloc or read the device from the host during a capture). A
  bucket whose warm-up runs out of memory is dropped, and larger batches run eagerly.

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
from dataclasses import dataclass

import torch
from tqdm import tqdm

from kernels.backend import use_triton
from model.batch import ForwardBatch
from model.qwen3 import KVCache, Qwen3Model

logger = logging.getLogger("nanoserve.engine")


def graph_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, steps of 8 to 64, steps of 16 beyond, and `max_batch`."""
    sizes = [1, 2, 4, *range(8, 64, 8), *range(64, max_batch, 16)]
    return [size for size in sizes if size < max_batch] + [max_batch]


def graphs_unavailable(device: torch.device) -> str | None:
    """Why decode cannot be captured on `device`, or None when it can."""
    # The references of these ops read lengths back to the host, which a CUDA graph cannot hold.
    probe = torch.empty(0, device=device)
    on_reference = [op for op in ("attention_frontend", "decode_attention") if not use_triton(probe, op)]
    if device.type == "cuda" and on_reference:
        return f"the torch reference of {' and '.join(on_reference)} (--kernels) reads lengths back to the host"
    return None


@dataclass
class StaticInputs:
    """A decode step's inputs on the device: flat buffers written before every replay; a step of
    bucket b reads rows [0, b), and row r's block table at [r * table_width, (r + 1) * table_width)."""

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

    def describe(self, device: torch.device) -> str:
        what = "CUDA graphs" if device.type == "cuda" else "recorded decode steps (CPU replay)"
        text = (f"{what} for {len(self.buckets)} batch sizes ({self.buckets[0]}-{self.buckets[-1]}) "
                f"in {self.seconds:.1f} s")
        if device.type == "cuda":
            text += f", {self.memory_bytes / 2**30:.2f} GiB of GPU memory"
        if self.dropped:
            text += f"; larger batches run eagerly ({self.dropped[-1]} did not fit in memory)"
        return text


@contextlib.contextmanager
def _frozen_gc() -> Iterator[None]:
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


class DecodeGraphRunner:
    """The decode forward per bucket over `inputs`, captured on CUDA, recorded on CPU."""

    def __init__(self, model: Qwen3Model, kv_cache: KVCache, inputs: StaticInputs, buckets: list[int]):
        self.model = model
        self.kv_cache = kv_cache
        self.inputs = inputs
        self.buckets = sorted(buckets)
        device, largest = model.device, self.buckets[-1]
        self._arange = torch.arange(largest + 1, device=device)
        self._query_start_loc = self._arange.to(torch.int32)
        with torch.inference_mode():
            self._logits = torch.empty(largest, model.config.vocab_size, dtype=torch.float32, device=device)
        self._batches = {bucket: self._static_batch(bucket) for bucket in self.buckets}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def bucket_for(self, rows: int) -> int | None:
        """The smallest bucket holding `rows` rows, or None when the batch is larger than all."""
        index = bisect.bisect_left(self.buckets, rows)
        return self.buckets[index] if index < len(self.buckets) else None

    def replay(self, bucket: int, rows: int) -> torch.Tensor:
        """Logits [rows, vocab] of the decode step whose inputs fill the static buffers' rows;
        rows up to `bucket` must hold padding. The result is overwritten by the next replay."""
        if self.model.device.type == "cuda":
            self._graphs[bucket].replay()
        else:
            self._step(bucket)
        return self._logits[:rows]

    def capture(self) -> CaptureSummary:
        """Record every bucket's step (CPU), or warm up and capture it (CUDA), largest first."""
        with _frozen_gc():
            return self._capture()

    def _capture(self) -> CaptureSummary:
        started = time.perf_counter()
        if self.model.device.type != "cuda":
            return CaptureSummary(self.buckets, time.perf_counter() - started, 0, [])
        self._fill_padding()
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        dropped = []
        with torch.inference_mode(), torch.cuda.stream(stream):
            for bucket in tqdm(self.buckets[::-1], desc="capturing CUDA graphs", unit="batch size"):
                if dropped:  # a larger bucket did not fit: this one is captured only if it does
                    torch.cuda.empty_cache()
                try:
                    self._step(bucket)  # warm-up: compiles the kernels; its peak is the graph's
                except torch.cuda.OutOfMemoryError:
                    dropped.append(bucket)
                    continue
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._step(bucket)
                self._graphs[bucket] = graph
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # what the warm-ups left cached is not the graphs' memory
        if not self._graphs:
            raise RuntimeError("no CUDA graph fits in GPU memory, not even for one sequence: use --enforce-eager")
        self.buckets = sorted(self._graphs)
        memory = free_before - torch.cuda.mem_get_info()[0] + self._logits.nbytes
        summary = CaptureSummary(self.buckets, time.perf_counter() - started, memory, sorted(dropped))
        logger.info("captured %s", summary.describe(self.model.device))
        return summary

    @torch.inference_mode()
    def _step(self, bucket: int) -> None:
        """What a graph holds: the forward over the static inputs, logits into the shared buffer."""
        logits = self.model.forward(self._batches[bucket], self.kv_cache)
        self._logits[:bucket].copy_(logits)

    def _static_batch(self, bucket: int) -> ForwardBatch:
        i, width = self.inputs, self.inputs.table_width
        return ForwardBatch(
            token_ids=i.token_ids[:bucket],
            positions=i.positions[:bucket],
            slot_mapping=i.slot_mapping[:bucket],
            block_tables=i.block_tables[: bucket * width].view(bucket, width),
            context_lens=i.context_lens[:bucket],
            query_start_loc=self._query_start_loc[: bucket + 1],
            query_lens=[1] * bucket,
            logits_indices=self._arange[:bucket],
        )

    def _fill_padding(self) -> None:
        """Every row a padding row, so that warm-ups and captures store nothing in the cache."""
        i = self.inputs
        i.token_ids.zero_()
        i.positions.zero_()
        i.slot_mapping.fill_(-1)
        i.context_lens.fill_(1)
        i.block_tables.zero_()
