"""Qwen3, hand-written: the whole forward pass over a paged KV cache in one file.

The batch is plain tensors (see `ForwardBatch`): the new tokens of every sequence concatenated,
their positions, the cache slot each one's K/V goes to, and each sequence's block table and
context length. Attention starts with `attention_frontend` (q/k norm, rotary embedding and the
K/V cache write: one kernel on CUDA). Sequences that bring one token (decodes) come first and run
`paged_decode_attention` over the cache; prompt chunks after them run `paged_prefill_attention`
over the prefix the cache already holds and themselves; one step may hold both. Every op beyond
matmuls and the embedding lookup goes through `nanoserve_kernels`, so the same code runs Triton kernels on
CUDA and torch references on CPU.

Weights are stored fused where that saves launches: `qkv_proj` is q, k and v stacked by rows,
`gate_up_proj` is gate and up stacked (the loader fills the row ranges from the HF tensors).

Under tensor parallelism (`model.parallel`) the model holds one rank's `Shard` of every weight and
its KV cache holds that rank's KV heads; the forward pass is the same code with an all-reduce after
o_proj, after down_proj and after the embedding lookup, and the LM head's logits gathered.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nanoserve_kernels import (
    attention_frontend,
    build_cos_sin_cache,
    fused_add_rms_norm,
    paged_decode_attention,
    paged_prefill_attention,
    rms_norm,
)
from nanoserve_kernels.backend import PLUGINS, use_triton
from model import batch as batches, cpu_avx2
from model.batch import ForwardBatch
from model.config import Qwen3Config
from model.cpu_plan import BATCHED_COPY, HELD_LAYOUTS, AttentionFn, CpuPlan, PlannedWeight, layout_of, measure_cpu_plan
from model.parallel import Collectives, Shard, shard_of

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k_cache, v_cache), each [blocks, block_size, Hk, D]


def _param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Qwen3Layer(nn.Module):
    def __init__(self, config: Qwen3Config, shard: Shard, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        c = config
        q_size, kv_size, inter = shard.num_heads * c.head_dim, shard.num_kv_heads * c.head_dim, shard.intermediate_size
        self.input_norm = _param(c.hidden_size, dtype=dtype, device=device)
        self.qkv_proj = _param(q_size + 2 * kv_size, c.hidden_size, dtype=dtype, device=device)
        self.q_norm = _param(c.head_dim, dtype=dtype, device=device)
        self.k_norm = _param(c.head_dim, dtype=dtype, device=device)
        self.o_proj = _param(c.hidden_size, q_size, dtype=dtype, device=device)
        self.post_attention_norm = _param(c.hidden_size, dtype=dtype, device=device)
        self.gate_up_proj = _param(2 * inter, c.hidden_size, dtype=dtype, device=device)
        self.down_proj = _param(c.hidden_size, inter, dtype=dtype, device=device)


class Qwen3Model(nn.Module):
    def __init__(self, config: Qwen3Config, dtype: torch.dtype, device: torch.device | str = "cpu",
                 shard: Shard | None = None, collectives: Collectives | None = None):
        """`shard`: this rank's part under tensor parallelism (default: all of it), whose
        `collectives` reach the other ranks."""
        super().__init__()
        c = config
        self.config = config
        self.shard = shard or shard_of(config)
        if self.shard.size > 1 and collectives is None:
            raise ValueError("a model sharded over several ranks needs their collectives")
        self.collectives = collectives
        self.dtype = dtype
        self.device = torch.device(device)
        vocab_rows = self.shard.vocab_rows
        self.embed_tokens = _param(vocab_rows, c.hidden_size, dtype=dtype, device=device)
        self.layers = nn.ModuleList(Qwen3Layer(c, self.shard, dtype, device) for _ in range(c.num_layers))
        self.norm = _param(c.hidden_size, dtype=dtype, device=device)
        self.lm_head = self.embed_tokens if c.tie_word_embeddings else _param(
            vocab_rows, c.hidden_size, dtype=dtype, device=device
        )
        self.cos_sin_cache = build_cos_sin_cache(c.max_position_embeddings, c.head_dim, c.rope_theta, self.device)
        self.scale = c.head_dim**-0.5
        self.cpu_plan: CpuPlan | None = None  # None: F.linear and the reference decode attention
        # Called with (layer index, the layer's output [T, hidden]) after every decoder layer; a
        # tensor it returns replaces that output. `nanoserve check` reads hidden states through it.
        self.layer_hook: Callable[[int, torch.Tensor], torch.Tensor | None] | None = None

    def plan_cpu_ops(self, max_batch: int, max_context: int, quantization: str | None = None) -> CpuPlan:
        """Time the CPU candidates of the ops that have several (see `model.cpu_plan`) on this model's
        weights and head shapes, and use the winners from now on; with `quantization` ("int8") the
        matmul weights are held quantized (`model.quant`). Run it on a thread that ends or on the
        thread that runs the model (see `server.engine.async_engine.create_engine`)."""
        c = self.config
        plan = measure_cpu_plan(self._planned_weights(), self.dtype, self.shard.num_heads, self.shard.num_kv_heads,
                                c.head_dim, max_batch, max_context, quantization, hidden_size=c.hidden_size)
        self._hold_weights(plan)
        self.cpu_plan = plan
        return plan

    def _matmul_weights(self) -> list[tuple[nn.Module, str]]:
        """(owner, attribute) of every weight that goes through `_linear`."""
        names = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
        return [(layer, name) for layer in self.layers for name in names] + [(self, "lm_head")]

    def _planned_weights(self) -> list[PlannedWeight]:
        """One entry per weight shape: a sample, how many weights of that shape a held layout
        replaces, and how many stay plain beside a held copy (a tied LM head's embedding table)."""
        planned: dict[tuple[int, ...], PlannedWeight] = {}
        for owner, name in self._matmul_weights():
            weight = getattr(owner, name)
            entry = planned.setdefault(tuple(weight.shape), PlannedWeight(weight, 0, prefill=name != "lm_head"))
            if name == "lm_head" and self.config.tie_word_embeddings:
                entry.copied += 1
            else:
                entry.replaced += 1
        return list(planned.values())

    def _hold_weights(self, plan: CpuPlan) -> None:
        """Hold the weights of the shapes the plan holds in another layout (packed, fp32) in place
        of the plain ones; a tied LM head gets a copy, the embedding keeps its table. A shape the
        plan splits keeps its plain weight, with the copy for several rows as its `BATCHED_COPY`."""
        for owner, name in self._matmul_weights():
            weight = getattr(owner, name)
            layout = plan.held_layout(tuple(weight.shape))
            if layout is not None and layout_of(weight, self.dtype) is None:
                held = HELD_LAYOUTS[layout](weight.detach())  # int8 ones come as Parameters that carry their scales
                setattr(owner, name, held if isinstance(held, nn.Parameter) else nn.Parameter(held, requires_grad=False))
            split = plan.batched_layout.get(tuple(weight.shape))
            if split is not None and getattr(weight, BATCHED_COPY, None) is None:  # a tied head: once, on the table
                setattr(weight, BATCHED_COPY, HELD_LAYOUTS[split](weight.detach()))

    def _linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight) if self.cpu_plan is None else self.cpu_plan.linear(x, weight)

    def attention_for(self, batch: ForwardBatch, k_cache: torch.Tensor) -> tuple[AttentionFn, AttentionFn]:
        """The step's (decode attention, prefill attention), chosen once for all its layers."""
        return self.decode_attention_for(batch, k_cache), self.prefill_attention_for(batch, k_cache)

    def decode_attention_for(self, batch: ForwardBatch, k_cache: torch.Tensor) -> AttentionFn:
        """The step's decode attention: the kernels' op, or on CPU what the plan measured fastest."""
        if self.cpu_plan is None or use_triton(k_cache, "decode_attention") or "decode_attention" in PLUGINS:
            return paged_decode_attention
        return self.cpu_plan.attention_for(max(batch.num_decodes, 1), batch.block_tables.shape[1] * k_cache.shape[1])

    def prefill_attention_for(self, batch: ForwardBatch, k_cache: torch.Tensor) -> AttentionFn:
        """The step's prefill attention: the kernels' op, or on CPU for chunks as short as a
        speculative verification window what the plan measured fastest."""
        if self.cpu_plan is None or use_triton(k_cache, "prefill_attention") or "prefill_attention" in PLUGINS:
            return paged_prefill_attention
        d = batch.num_decodes
        if d == len(batch.query_lens):
            return paged_prefill_attention  # a pure decode step has no prompt chunk
        window = self.cpu_plan.window_attention_for(max(batch.query_lens[d:]), batch.block_tables.shape[1] * k_cache.shape[1])
        return window or paged_prefill_attention

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> KVCache:
        c = self.config
        shape = (num_blocks, block_size, self.shard.num_kv_heads, c.head_dim)
        return [
            (torch.empty(shape, dtype=self.dtype, device=self.device), torch.empty(shape, dtype=self.dtype, device=self.device))
            for _ in range(c.num_layers)
        ]

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_cache: KVCache) -> torch.Tensor:
        """Stores the batch's K/V in `kv_cache` and returns fp32 logits [N, vocab] for `logits_indices`."""
        if batches.CHECK_BATCHES and not (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            batches.check_batch(batch, *kv_cache[0][0].shape[:2])
        attention = self.attention_for(batch, kv_cache[0][0])
        hidden, residual = self.embed(batch.token_ids), None
        for index in range(len(self.layers)):
            q, k, v, residual = self.attention_input(index, hidden, residual, batch.positions, batch.slot_mapping,
                                                     kv_cache)
            out = self.attention(index, q, k, v, batch, kv_cache, *attention)
            hidden, residual = self.attention_output(index, out, residual)
        return self.final_logits(hidden, residual, batch.logits_indices)

    # The forward pass in the pieces that `forward` chains, cut at attention, the one op that reads
    # the batch's sequence structure: the pieces between attentions see only per-token tensors, so
    # `server.engine.piecewise_graph` captures them over padded token counts.

    def attention_input(
        self, index: int, hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
        slot_mapping: torch.Tensor, kv_cache: KVCache,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """Layer `index` up to its attention: the input norm (added to the residual, but for the
        first layer, whose residual is `hidden`), the QKV projection and the attention front-end,
        which stores k and v in the layer's cache at `slot_mapping`. Returns (q, k, v, residual);
        k and v as `attention_frontend` returns them."""
        layer, (k_cache, v_cache), c = self.layers[index], kv_cache[index], self.config
        x, residual = self._add_norm(hidden, residual, layer.input_norm)
        # k and v come back only where the unfused references ran (on CPU); the fused kernel
        # writes them into the cache alone, and attention reads them from there.
        front = cpu_avx2.attention_front if self._c_small_ops(hidden) else attention_frontend
        q, k, v = front(self._linear(x, layer.qkv_proj), layer.q_norm, layer.k_norm, c.rms_norm_eps, positions,
                        self.cos_sin_cache, k_cache, v_cache, slot_mapping)
        return q, k, v, residual

    def _c_small_ops(self, x: torch.Tensor) -> bool:
        """Whether the norms and the attention front-end run the plan's C passes (`model.cpu_avx2`):
        when the CPU plan timed them faster, and no plug-in or Triton backend claims those ops."""
        return (self.cpu_plan is not None and self.cpu_plan.small_ops == "avx2" and not PLUGINS
                and not use_triton(x, "rms_norm") and not use_triton(x, "attention_frontend"))

    def _add_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None,
                  weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normed, residual): `hidden` added to `residual` and RMS-normed; a `residual` of None
        (the first layer's) makes `hidden` itself the residual."""
        eps = self.config.rms_norm_eps
        if self._c_small_ops(hidden):
            return cpu_avx2.add_rms_norm(hidden, residual, weight, eps)
        if residual is None:
            return rms_norm(hidden, weight, eps), hidden
        return fused_add_rms_norm(hidden, residual, weight, eps)

    def attention(self, index: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None,
                  batch: ForwardBatch, kv_cache: KVCache, decode_attention: AttentionFn,
                  prefill_attention: AttentionFn = paged_prefill_attention) -> torch.Tensor:
        """Layer `index`'s attention [T, Hq, D] of the batch's q over the cache, which already holds
        the batch's own k and v (`attention_input` stored them; given here, or None, they are read
        from the cache)."""
        k_cache, v_cache = kv_cache[index]
        return _paged_attention(q, k, v, batch, k_cache, v_cache, self.scale, decode_attention, prefill_attention)

    def attention_output(self, index: int, out: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index` after its attention `out` [T, Hq, D]: o_proj, the post-attention norm and
        the MLP. Returns the layer's (hidden, residual)."""
        layer = self.layers[index]
        hidden = self._all_reduce(self._linear(out.reshape(out.shape[0], -1), layer.o_proj))
        x, residual = self._add_norm(hidden, residual, layer.post_attention_norm)
        hidden = self._all_reduce(self._mlp(layer, x))
        if self.layer_hook is not None:
            hidden, residual = self._call_layer_hook(index, hidden, residual)
        return hidden, residual

    def final_logits(self, hidden: torch.Tensor, residual: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """fp32 logits of `rows`: only the rows that need logits go through the final norm and the LM head."""
        x, _ = self._add_norm(hidden[rows], residual[rows], self.norm)
        return self._logits(x)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.shard.size == 1:
            return F.embedding(token_ids, self.embed_tokens)
        # This rank's vocabulary rows only: other ids look up row 0 and are zeroed, and the sum
        # over the ranks gives every id its row.
        local = token_ids - self.shard.vocab_start
        outside = (local < 0) | (local >= self.shard.vocab_rows)
        hidden = F.embedding(local.masked_fill(outside, 0), self.embed_tokens)
        return self._all_reduce(hidden.masked_fill_(outside[:, None], 0.0))

    def _all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of a row-parallel result (each rank's is partial); in place."""
        if self.shard.size > 1:
            self.collectives.all_reduce(partial)
        return partial

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits over the full vocabulary: this rank's rows, gathered from every rank."""
        logits = self._linear(x, self.lm_head)
        if self.shard.size > 1:  # [ranks, N, rows] -> [N, ranks * rows], cut to the vocabulary
            gathered = self.collectives.all_gather(logits.contiguous())
            logits = gathered.permute(1, 0, 2).reshape(x.shape[0], -1)[:, : self.config.vocab_size]
        return logits.float()

    def _call_layer_hook(self, index: int, hidden: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The layer's output is hidden + residual, added in the dtype as the next fused add (and
        # HF) adds them; a replacement goes on as the residual, beside zeros, so it passes unchanged.
        replaced = self.layer_hook(index, hidden + residual)
        return (hidden, residual) if replaced is None else (torch.zeros_like(replaced), replaced)

    def _mlp(self, layer: Qwen3Layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._linear(x, layer.gate_up_proj).chunk(2, dim=-1)
        return self._linear(F.silu(gate) * up, layer.down_proj)


def _paged_attention(
    q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, batch: ForwardBatch, k_cache: torch.Tensor,
    v_cache: torch.Tensor, scale: float, decode_attention: AttentionFn,
    prefill_attention: AttentionFn = paged_prefill_attention,
) -> torch.Tensor:
    """Attention of the batch's new tokens over their cached context: decode attention for the
    leading one-token sequences, prefill attention for the prompt chunks after them. `k`/`v`, the
    new tokens' keys and values, are None when they exist only in the cache."""
    d = batch.num_decodes
    if d == len(batch.query_lens):
        return decode_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale)
    prefill_args = (k_cache, v_cache, batch.block_tables[d:], batch.prefill_query_start_loc, batch.context_lens[d:],
                    batch.max_query_len, scale)
    if d == 0:
        return prefill_attention(q, k, v, *prefill_args)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    out[:d] = decode_attention(q[:d], k_cache, v_cache, batch.block_tables[:d], batch.context_lens[:d], scale)
    new_kv = (None, None) if k is None else (k[d:], v[d:])
    out[d:] = prefill_attention(q[d:], *new_kv, *prefill_args)
    return out
