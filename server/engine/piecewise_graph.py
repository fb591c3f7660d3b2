"""Piecewise CUDA graphs: the steps that bring prompt tokens, captured around their attention.

A step that admits prompt tokens (a prefill, a prompt chunk beside decodes, a speculative
verification window) has a different sequence structure every time: how many sequences, how long
each one's query is, how much context each has cached. Attention reads that structure (query
start offsets, context lengths, block tables, the longest query as a grid size), so it cannot sit
in a graph captured once. Everything else in the forward pass sees only per-token tensors: the
embedding, the norms, the projections, the attention front-end (q/k norm, rotary embedding and
the K/V cache store at each token's slot), the MLP. So, as vLLM v1 does, the forward pass over
a flat batch of T tokens is cut at every layer's attention (`Qwen3Model.attention_input`,
`attention`, `attention_output`) into L + 1 pieces, and each piece is captured once per
token-count bucket:

- piece 0: the embedding and layer 0 up to its attention (its q and the K/V store);
- piece l (1..L-1): layer l-1 after its attention (o_proj, norm, MLP), then layer l up to its own;
- piece L: the last layer after its attention.

Between the pieces attention runs eagerly, over the real tokens only; after the last piece the
final norm and the LM head run eagerly too, on the rows that need logits (`logits_indices`, whose
count varies with sampling rows, drafts and prompt scoring: inside a graph the LM head would have
to run over a padded, fixed number of rows, which costs more GPU time than its three launches).
Per layer that leaves the host a graph replay, the attention launches (one kernel, two or three
in a mixed step) and a copy, where an eager step launches about a dozen kernels.

- A step of n tokens runs in the smallest bucket T >= n: 16, 32, 64, 128, 256, steps of 128 to
  1,024, steps of 512 up to `max_num_batched_tokens` (`token_buckets`; 25 buckets at the CUDA
  default of 8,192): above 256 tokens at most a third of the rows are padding; chunked prefill
  fills its steps to the budget, the last bucket, exactly. Steps with more tokens than the
  largest bucket (none, unless memory dropped buckets) run eagerly.
- The pieces read the runner's input buffers (token ids, positions, slot mapping) at rows [0, T);
  rows past n are padding written before the replay: token 0 at position 0, slot -1, so the
  front-end stores nothing for them, and as every op in a piece works row by row they change no
  real token's values. Between pieces the activations live in static buffers of the largest
  bucket's rows: q and the attention output ([T, Hq, D] each), the residual and the last hidden
  state ([T, hidden] each); attention writes its rows [0, n) of its output buffer, the rows past
  n keep values of earlier steps (finite, and read only by padding rows).
- Memory: the static buffers, 2 x T x (Hq * D + hidden) elements of the model dtype (Qwen3-8B at
  8,192 tokens: 256 MiB), and the graphs' shared pool, which the largest bucket's largest piece
  sizes (its MLP: about 4 x T x intermediate elements at its peak, 0.75 GiB for Qwen3-8B at
  8,192 tokens).
  Every graph returns nothing, so every buffer a piece allocates is free again when it ends and
  any other piece, of any bucket, may reuse it: graphs are captured largest bucket first into one
  pool and may replay in any order. The startup line gives what the capture held.
- As for decode graphs (`cuda_graph.py`): each bucket's pieces run once eagerly before their
  capture (Triton compiles then), a bucket whose warm-up runs out of memory is dropped (its
  steps run eagerly), and the garbage collector is frozen for the capture.

Not through here (they run eagerly, see `ModelRunner.launch`): tensor parallelism (the pieces
would hold the all-reduces, and the workers would have to replay them), draft-model steps (the
draft model mirrors the target's eager batch), and a model with a `layer_hook` (`nanoserve check`).

On CPU there is no graph: "capture" records the pieces and "replay" calls them over the same
static buffers, so that the buffer logic (bucket choice, padding, rows left from a larger step)
runs on CPU exactly as under CUDA graphs, and is tested there. It saves nothing there: the
pieces run the eager ops plus two copies per layer (hence eager on CPU by default).
"""

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from model import batch as batches
from model.batch import ForwardBatch
from model.qwen3 import KVCache, Qwen3Model
from server.engine.cuda_graph import frozen_gc, pad_tokens

logger = logging.getLogger("nanoserve.engine")


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts to capture: 16, 32, 64, 128, 256, steps of 128 to 1,024, steps of 512 beyond,
    and `max_tokens`. At most a third of a bucket's rows are padding above 256 tokens; below,
    where a step's GPU time hardly grows with its rows, up to half. (Fewer than 16 tokens run in
    the 16-token bucket: a graph of 16 rows costs no more than one of 1.)"""
    sizes = [16, 32, 64, 128, 256, *range(384, 1025, 128), *range(1536, max_tokens, 512)]
    return [size for size in sizes if size < max_tokens] + [max_tokens]


@dataclass
class TokenInputs:
    """The per-token inputs the pieces read, flat buffers on the device ([max tokens] int64 each);
    a step of bucket T reads rows [0, T)."""

    token_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor


@dataclass
class PiecewiseCaptureSummary:
    buckets: list[int]  # token counts
    seconds: float
    memory_bytes: int  # device memory the graphs hold: their pool, the static buffers (0 on CPU)
    dropped: list[int]  # buckets whose warm-up ran out of memory, smallest first
    pieces: int  # graphs per bucket

    def describe(self, device: torch.device) -> str:
        what = "piecewise CUDA graphs" if device.type == "cuda" else "recorded prompt-step pieces (CPU replay)"
        if not self.buckets:
            return f"eager ({what} for {self.dropped[0]} tokens and more did not fit in memory)"
        text = (f"{what} for {len(self.buckets)} token counts ({self.buckets[0]}-{self.buckets[-1]}), "
                f"{self.pieces} pieces each, in {self.seconds:.1f} s")
        if device.type == "cuda":
            text += f", {self.memory_bytes / 2**30:.2f} GiB of GPU memory"
        if self.dropped:
            text += f"; larger steps run eagerly ({self.dropped[-1]} tokens did not fit in memory)"
        return text


class PiecewiseGraphRunner:
    """The forward pass of steps of up to `buckets[-1]` tokens: its pieces between attentions
    captured per bucket over `inputs` on CUDA, recorded on CPU; attention and the LM head eager."""

    def __init__(self, model: Qwen3Model, kv_cache: KVCache, inputs: TokenInputs, buckets: list[int]):
        if model.shard.size > 1:
            raise ValueError("piecewise graphs hold no all-reduce: tensor-parallel steps run eagerly")
        self.model = model
        self.kv_cache = kv_cache
        self.inputs = inputs
        self.buckets = sorted(buckets)
        c, largest, device = model.config, self.buckets[-1], model.device
        q_heads = model.shard.num_heads
        with torch.inference_mode():
            # zeroed: the rows past a step's tokens are read (by padding rows) before any step wrote them
            self._q = torch.zeros(largest, q_heads, c.head_dim, dtype=model.dtype, device=device)
            self._attention_out = torch.zeros_like(self._q)
            self._residual = torch.zeros(largest, c.hidden_size, dtype=model.dtype, device=device)
            self._hidden = torch.zeros_like(self._residual)
        # per bucket, its pieces in order: graph replays on CUDA, the piece functions on CPU
        self._steps: dict[int, list[Callable[[], None]]] = {}
        self.summary: PiecewiseCaptureSummary | None = None  # set by `capture`

    @property
    def num_pieces(self) -> int:
        return len(self.model.layers) + 1

    def bucket_for(self, tokens: int) -> int | None:
        """The smallest bucket holding `tokens` tokens, or None when the step is larger than all."""
        index = bisect.bisect_left(self.buckets, tokens)
        return self.buckets[index] if index < len(self.buckets) else None

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, bucket: int) -> torch.Tensor:
        """What `Qwen3Model.forward(batch, kv_cache)` returns, with the pieces replayed for `bucket`.
        `batch`'s token ids, positions and slots must be the first rows of the runner's inputs,
        and the rows from there up to `bucket` padding (slot -1)."""
        tokens = batch.token_ids.shape[0]
        if batch.slot_mapping.data_ptr() != self.inputs.slot_mapping.data_ptr() or not tokens <= bucket:
            raise ValueError(f"a piecewise step reads the runner's own inputs, {tokens} tokens in a bucket of {bucket}")
        model, kv_cache = self.model, self.kv_cache
        if batches.CHECK_BATCHES:
            batches.check_batch(batch, *kv_cache[0][0].shape[:2])
            assert bool((self.inputs.slot_mapping[tokens:bucket] == -1).all()), "a padding row would store K/V"
        attention = model.attention_for(batch, kv_cache[0][0])
        for index, piece in enumerate(self._steps[bucket]):
            piece()
            if index < len(model.layers):
                out = model.attention(index, self._q[:tokens], None, None, batch, kv_cache, *attention)
                self._attention_out[:tokens].copy_(out)
        return model.final_logits(self._hidden, self._residual, batch.logits_indices)

    def _pieces(self, bucket: int) -> list[Callable[[], None]]:
        """The bucket's pieces, in order; each reads and writes only the static buffers' rows [0, bucket)."""
        model, kv_cache, i = self.model, self.kv_cache, self.inputs
        positions, slots = i.positions[:bucket], i.slot_mapping[:bucket]
        q, attention_out = self._q[:bucket], self._attention_out[:bucket]
        residual, last = self._residual[:bucket], len(model.layers) - 1

        def up_to_attention(index: int, hidden: torch.Tensor, residual_in: torch.Tensor | None) -> None:
            q_out, _, _, residual_out = model.attention_input(index, hidden, residual_in, positions, slots, kv_cache)
            q.copy_(q_out)
            residual.copy_(residual_out)

        def first() -> None:
            up_to_attention(0, model.embed(i.token_ids[:bucket]), None)

        def between(index: int) -> Callable[[], None]:
            def piece() -> None:
                hidden, residual_out = model.attention_output(index - 1, attention_out, residual)
                up_to_attention(index, hidden, residual_out)
            return piece

        def after_last() -> None:
            hidden, residual_out = model.attention_output(last, attention_out, residual)
            self._hidden[:bucket].copy_(hidden)
            residual.copy_(residual_out)

        return [first, *(between(index) for index in range(1, last + 1)), after_last]

    def capture(self) -> PiecewiseCaptureSummary:
        """Record every bucket's pieces (CPU), or warm up and capture them (CUDA), largest first."""
        with frozen_gc():
            return self._capture()

    def _capture(self) -> PiecewiseCaptureSummary:
        started = time.perf_counter()
        if self.model.device.type != "cuda":
            self._steps = {bucket: self._pieces(bucket) for bucket in self.buckets}
            return self._summary(started, 0, [])
        self._fill_padding()
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        dropped = []
        with torch.inference_mode(), torch.cuda.stream(stream):
            for bucket in tqdm(self.buckets[::-1], desc="capturing piecewise CUDA graphs", unit="token count"):
                if dropped:  # a larger bucket did not fit: this one is captured only if it does
                    torch.cuda.empty_cache()
                pieces = self._pieces(bucket)
                try:
                    for piece in pieces:  # warm-up: compiles the kernels for these shapes
                        piece()
                except torch.cuda.OutOfMemoryError:
                    dropped.append(bucket)
                    continue
                graphs = []
                for piece in pieces:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        piece()
                    graphs.append(graph)
                self._steps[bucket] = [graph.replay for graph in graphs]
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # what the warm-ups left cached is not the graphs' memory
        self.buckets = sorted(self._steps)  # none at all: every prompt step runs eagerly
        buffers = sum(t.nbytes for t in (self._q, self._attention_out, self._residual, self._hidden))
        return self._summary(started, free_before - torch.cuda.mem_get_info()[0] + buffers, dropped)

    def _summary(self, started: float, memory: int, dropped: list[int]) -> PiecewiseCaptureSummary:
        summary = PiecewiseCaptureSummary(self.buckets, time.perf_counter() - started, memory, sorted(dropped),
                                          self.num_pieces)
        logger.info("captured %s", summary.describe(self.model.device))
        self.summary = summary
        return summary

    def _fill_padding(self) -> None:
        """Every row a padding row, so that warm-ups and captures store nothing in the cache."""
        pad_tokens(self.inputs.token_ids, self.inputs.positions, self.inputs.slot_mapping, slice(None))
