"""One engine step on the device: scheduled sequences in, sampled tokens (and logprobs) out.

A step may mix decodes (one new token each, first) and prompt chunks (after them, each over the
prefix its sequence has cached); logits are computed only where a sequence's last token is.
The step's inputs (token ids, positions, cache slots, block tables, context lengths) are written
into buffers allocated once, host side through numpy views; on CUDA they reach their device twins
with asynchronous copies from pinned memory. The step's results come back to the host behind one
synchronisation, the step's only one. A decode step that fits a captured batch size replays its
CUDA graph (`cuda_graph.py`) over those same buffers, and so does a verification step of
speculative decoding with no prompt chunk in it (each sequence on 1 + k rows, padded where it
brings fewer drafts); a draft model replays graphs of its own. Other steps (with prompt tokens)
that fit a captured token count replay the pieces of the forward pass between attentions
(`piecewise_graph.py`); the rest run the model eagerly.

`launch` only starts a step: its results come back when `LaunchedStep.results` is called, so the
host can schedule and prepare the next step while the device runs this one (async scheduling).
The next step then reads the tokens it decodes from this step's sampled ids on the device.
"""

from dataclasses import dataclass

import numpy as np
import torch

from nanoserve_kernels._triton import interpreting
from nanoserve_kernels.backend import use_triton
from model.batch import ForwardBatch, SequenceStep, make_batch, to_device
from model.qwen3 import KVCache, Qwen3Model
from server.engine.config import EngineConfig
from server.engine.cuda_graph import (DecodeGraphRunner, StaticInputs, graph_buckets, graphs_unavailable, pad_tokens,
                                      write_padding)
from server.engine.distributed import StepSender
from server.engine.draft_model import DraftModel
from server.engine.piecewise_graph import PiecewiseGraphRunner, TokenInputs, token_buckets
from server.engine.request import TokenLogprob
from server.engine.sampler import Sampler, SamplerOutput
from server.engine.scheduler import ScheduledBatch
from server.engine.sequence import Sequence
from server.engine.structured import TokenBitmask

# Verification graphs are captured for batches up to this many sequences: above it a step of
# (1 + k) tokens a sequence is bound by compute more than by launches, while each graph's logits
# rows (1 + k per sequence, vocabulary-wide) cost memory.
VERIFY_GRAPH_MAX_SEQS = 64


class _InputBuffer:
    """A flat host buffer and, on CUDA, its device twin: per-step inputs without per-step allocations.

    On CUDA two pinned host buffers take turns (`use`): the host writes a step's inputs into one
    while the copies of the step before may still be reading the other.
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device):
        self.device = torch.zeros(size, dtype=dtype, device=device)
        on_cuda = device.type == "cuda"
        self._hosts = [torch.zeros(size, dtype=dtype, pin_memory=True) for _ in range(2)] if on_cuda else [self.device]
        self.use(0)

    def use(self, turn: int) -> None:
        self.host = self._hosts[turn % len(self._hosts)]
        self.np = self.host.numpy()

    def load(self, n: int) -> torch.Tensor:
        """The device view of the first `n` entries, as written into `np`."""
        if self.device is not self.host:
            self.device[:n].copy_(self.host[:n], non_blocking=True)
        return self.device[:n]


class ModelRunner:
    def __init__(self, model: Qwen3Model, config: EngineConfig, eos_token_ids: tuple[int, ...], num_token_ids: int):
        """`config` is resolved: every size in it is set; ids from `num_token_ids` on have no token."""
        self.model = model
        self.block_size = config.block_size
        self.kv_cache: KVCache = model.allocate_kv_cache(config.num_kv_blocks, config.block_size)
        self.sampler = Sampler(model.config.vocab_size, model.device, eos_token_ids, num_token_ids)
        self.token_bitmask = TokenBitmask(config.max_num_seqs, model.config.vocab_size, model.device)
        device = model.device
        max_num_seqs, max_num_batched_tokens = config.max_num_seqs, config.max_num_batched_tokens
        max_blocks_per_seq = -(-config.max_model_len // config.block_size)
        self._token_ids = _InputBuffer(max_num_batched_tokens, torch.int64, device)
        self._positions = _InputBuffer(max_num_batched_tokens, torch.int64, device)
        self._slot_mapping = _InputBuffer(max_num_batched_tokens, torch.int64, device)
        self._block_tables = _InputBuffer(max_num_seqs * max_blocks_per_seq, torch.int32, device)
        self._context_lens = _InputBuffer(max_num_seqs, torch.int32, device)
        self._query_start_loc = _InputBuffer(max_num_seqs + 1, torch.int32, device)
        # one row per sampled token: a sequence verifying drafts samples several
        self._logits_indices = _InputBuffer(max_num_batched_tokens, torch.int64, device)
        self._buffers = [self._token_ids, self._positions, self._slot_mapping, self._block_tables,
                         self._context_lens, self._query_start_loc, self._logits_indices]
        self._turn = 0  # which host buffers the step being prepared writes
        # On CUDA, per turn: recorded after that turn's copies (waiting on one never recorded returns at once).
        self._copied = [torch.cuda.Event(), torch.cuda.Event()] if device.type == "cuda" else []
        # Under tensor parallelism the other ranks run every step too, on inputs sent from here.
        self._tensor_parallel = StepSender(max_num_seqs) if model.shard.size > 1 else None
        self._warm_up(config.max_num_seqs, config.max_model_len)  # before capture: nothing compiles inside one
        self._graphs, self.decode_mode = self._capture_graphs(config, max_blocks_per_seq)
        self._piecewise = self._capture_piecewise(config) if self._graphs is not None else None
        if self._piecewise is not None:
            self.decode_mode += f"; prompt steps: {self._piecewise.summary.describe(device)}"
        # speculative decoding's draft model (`draft_model.py`), which computes every step too
        self.draft_model: DraftModel | None = None

    def attach_draft(self, draft: DraftModel | None) -> None:
        """Speculative decoding's draft model: it mirrors every step, through graphs of its own
        (the same keys as the target's, over its own cache and buffers) where the target has them."""
        self.draft_model = draft
        if draft is not None and self._graphs is not None:
            summary = draft.capture_graphs(self._graphs)
            self.decode_mode += f"; draft model: {summary.describe(self.model.device)}"

    def _warm_up(self, max_num_seqs: int, max_model_len: int) -> None:
        """Where the attention kernels are Triton's: one eager step of every kind the engine can
        run, so each kernel variant the serving path reaches compiles now, before the server says
        it is ready, not seconds into a request. The kernels leave the arguments that vary between
        steps unspecialised (see `nanoserve_kernels._triton.jit`), so these steps reach them all: decode with
        many splits (batch 1, a full-width table) and with one (a full batch of one-block tables), a
        mixed step (prompt chunk tables and lengths as views past the decode rows), a prefill. They
        read block 0 and store nothing. The interpreter compiles nothing, so it skips them."""
        probe = self.kv_cache[0][0]
        if interpreting() or not (use_triton(probe, "decode_attention") or use_triton(probe, "prefill_attention")):
            return
        bs = self.block_size
        full_width = [0] * -(-max_model_len // bs)
        steps = [[SequenceStep([0], max_model_len - 1, full_width)],
                 [SequenceStep([0], 0, [0])] * max_num_seqs,
                 [SequenceStep([0], 2, [0]), SequenceStep([0, 0], 1, [0, 0])],
                 [SequenceStep([0] * min(bs, 3), 0, [0])]]
        for seqs in steps:
            batch = make_batch(seqs, bs, self.model.device)
            batch.slot_mapping.fill_(-1)
            self.model.forward(batch, self.kv_cache)

    def _capture_graphs(self, config: EngineConfig, table_width: int) -> tuple[DecodeGraphRunner | None, str]:
        """The decode graphs (after the KV cache: they hold its address) and how decode runs.

        The graphs' static inputs are this runner's own device buffers, not copies of them: a
        graph step writes its rows (and padding) host side as every step does, and the one
        asynchronous copy per buffer that any step makes lands where the graph reads. Copying
        into separate static buffers would add a device copy per input to every step.
        """
        if config.enforce_eager:
            if self.model.device.type == "cpu":
                return None, "eager decode (the CPU default; --no-enforce-eager replays recorded decode steps)"
            return None, "eager decode (--enforce-eager)"
        if reason := graphs_unavailable(self.model.device):
            return None, f"eager decode: {reason}"
        inputs = StaticInputs(self._token_ids.device, self._positions.device, self._slot_mapping.device,
                              self._context_lens.device, self._block_tables.device, table_width)
        query_len, verify_buckets = self._verify_graph_shape(config)
        graphs = DecodeGraphRunner(self.model, self.kv_cache, inputs, graph_buckets(config.max_num_seqs),
                                   query_len, verify_buckets)
        return graphs, graphs.capture().describe(self.model.device)

    def _capture_piecewise(self, config: EngineConfig) -> PiecewiseGraphRunner | None:
        """The prompt steps' piecewise graphs, where decode has graphs (the same flags choose both),
        over this runner's token buffers as the decode graphs are; none under tensor parallelism,
        whose prompt steps run eagerly on every rank (the pieces would hold its all-reduces), and
        none beside a draft model, which mirrors every step the target runs through the pieces'
        eager batch (`launch`)."""
        spec = config.speculative_config
        if self._tensor_parallel is not None or (spec is not None and spec.method == "draft_model"):
            return None
        inputs = TokenInputs(self._token_ids.device, self._positions.device, self._slot_mapping.device)
        piecewise = PiecewiseGraphRunner(self.model, self.kv_cache, inputs, token_buckets(config.max_num_batched_tokens))
        piecewise.capture()
        return piecewise

    def _verify_graph_shape(self, config: EngineConfig) -> tuple[int | None, list[int]]:
        """The verification graphs' tokens per sequence and batch sizes. Only a server started with
        --speculative-config gets them: q = 1 + its k, which also bounds every prediction's drafts
        (`Speculator.attach`). Without the flag only chat requests' predictions speculate (their
        DEFAULT_PREDICTION_TOKENS drafts a step), whose verification steps run eagerly rather
        than every server paying for graphs few requests use. Under tensor parallelism the
        workers hold decode graphs only, so verification runs eagerly there."""
        spec = config.speculative_config
        if spec is None or self.model.shard.size > 1 or graphs_unavailable(self.model.device, verification=True):
            return None, []
        query_len = 1 + spec.num_speculative_tokens
        largest = min(config.max_num_seqs, VERIFY_GRAPH_MAX_SEQS, config.max_num_batched_tokens // query_len)
        if largest < 1 or config.max_model_len <= query_len:
            return None, []
        return query_len, graph_buckets(largest)

    def run(self, batch: ScheduledBatch) -> list[tuple[int, TokenLogprob | None] | None]:
        """Per scheduled sequence: (sampled token, its logprobs if asked), or None for a prompt
        chunk that stops short of the prompt's end."""
        return self.launch(batch).results()

    def launch(self, batch: ScheduledBatch, previous: "LaunchedStep | None" = None) -> "LaunchedStep":
        """Start the step on the device and return without waiting for it. A decode whose last
        token is unresolved (sampled by `previous`, still on the device) reads it from there."""
        sampling_rows = [i for i in range(len(batch.seqs)) if batch.samples(i)]
        # One logits row per token to sample, so a sequence with k drafts has 1 + k: its sequence
        # repeated, and the draft each row checks (-1 where none).
        seqs = [batch.seqs[i] for i in sampling_rows for _ in range(1 + len(batch.drafts[i]))]
        draft_ids = [t for i in sampling_rows for t in [*batch.drafts[i], -1]] if batch.num_verifies else None
        key = self._graph_key(batch)  # (bucket, tokens per sequence) of the graph the step replays
        # Other steps replay the pieces between attentions where their token count has them. Not
        # with a draft model (it mirrors the eager batch) nor a layer hook (`nanoserve check`).
        # Prompt scoring, drafts to verify, grammars and prefix-cached prompts all go through: they
        # differ only in the step's rows, its attention and its logits rows, all eager.
        pieces = None
        if not key and self._piecewise is not None and self.draft_model is None and self.model.layer_hook is None:
            pieces = self._piecewise.bucket_for(sum(batch.num_new_tokens))
        scoring = None
        self._next_turn()
        if key:
            logits_rows = self._prepare_graph_step(batch, *key)
        else:
            forward_batch = self._prepare(batch, sampling_rows, pieces)
            scoring = _prompt_scoring(batch) if batch.num_decodes < len(batch.seqs) else None
            if scoring is not None:  # the prompt rows to score get logits too, after the sampling rows
                rows = to_device(scoring.rows, torch.int64, forward_batch.logits_indices.device)
                forward_batch.logits_indices = torch.cat([forward_batch.logits_indices, rows])
        self._end_turn()
        self._read_unresolved(batch.seqs[: batch.num_decodes], previous, key[1] if key else 1)
        if seqs:  # the sampler's host-to-device copies go before the forward pass, not behind it
            self.sampler.prepare(seqs)
        self.token_bitmask.start_fill([seq.grammar for seq in seqs])  # grammar masks: while the model runs
        if self._tensor_parallel is not None:
            if key:  # a decode graph: the workers capture no verification graphs
                self._tensor_parallel.send_graph(key[0], self._graphs.inputs)
            else:
                self._tensor_parallel.send(forward_batch)
        try:
            if key:
                logits = self._graphs.replay(key[0], len(batch.seqs), key[1])
                if logits_rows is not None:  # a verification step with padding rows
                    logits = logits.index_select(0, logits_rows)
            elif pieces:
                logits = self._piecewise.forward(forward_batch, pieces)
            else:
                logits = self.model.forward(forward_batch, self.kv_cache)
        except Exception as err:
            if self._tensor_parallel is not None:  # the other ranks wait inside this step's collectives
                self._tensor_parallel.abandon(err)
            raise
        if self.draft_model is not None:
            if key:
                self.draft_model.mirror(self._graphs.static_batch(*key), key)
            else:
                self.draft_model.mirror(forward_batch)
        if scoring is not None:
            self._score_prompts(logits[len(seqs):], scoring)
            logits = logits[: len(seqs)]
        if not sampling_rows:
            return LaunchedStep(batch, sampling_rows, None, None)
        sampled = self.sampler.sample(logits, seqs, self.token_bitmask.finish_fill(), draft_ids)
        copy = _HostCopy(sampled.token_ids, sampled.token_logprobs, sampled.top_ids, sampled.top_logprobs)
        return LaunchedStep(batch, sampling_rows, sampled, copy)

    def _graph_key(self, batch: ScheduledBatch) -> tuple[int, int] | None:
        """The (bucket, tokens per sequence) of the graph that runs the step, or None to run it
        eagerly. A step of decodes alone replays a decode graph; one of decodes and verifications
        (no prompt chunk) a verification graph, if every window fits its q tokens and every
        context holds q + 1 tokens (the padding rows' rule, `cuda_graph.py`)."""
        graphs, n = self._graphs, len(batch.seqs)
        if graphs is None or batch.num_decodes + batch.num_verifies != n:
            return None
        if not batch.num_verifies:
            bucket = graphs.bucket_for(n)
            return (bucket, 1) if bucket else None
        q = graphs.verify_query_len
        if q is None or any(num_new > q or seq.num_cached + num_new <= q
                            for seq, num_new in zip(batch.seqs, batch.num_new_tokens)):
            return None
        bucket = graphs.bucket_for(n, q)
        return (bucket, q) if bucket else None

    def _next_turn(self) -> None:
        """On CUDA, the host buffers the copies of the step before last read, once those are done."""
        if self._copied:
            self._turn ^= 1
            self._copied[self._turn].synchronize()
            for buffer in self._buffers:
                buffer.use(self._turn)

    def _end_turn(self) -> None:
        if self._copied:
            self._copied[self._turn].record()

    def _read_unresolved(self, decodes: list[Sequence], previous: "LaunchedStep | None", query_len: int = 1) -> None:
        """The decode rows whose token `previous` sampled take it from its ids on the device (the
        host wrote UNRESOLVED there); the same stream orders this after the inputs' copies. Without
        a `previous` that sampled, no token is unresolved (the core reads a step back first). In a
        verification graph's step a decode's token is the last of its `query_len` rows."""
        if previous is None or previous.sampled is None:
            return
        pairs = [(row * query_len + query_len - 1, seq.unresolved_row) for row, seq in enumerate(decodes)
                 if seq.unresolved_row is not None]
        if not pairs:
            return
        token_ids, sampled = self._token_ids.device, previous.sampled.token_ids
        if all(row == source == i for i, (row, source) in enumerate(pairs)):  # the steady state: rows 0..k-1, in order
            token_ids[: len(pairs)].copy_(sampled[: len(pairs)])
            return
        rows, sources = (to_device(column, torch.int64, token_ids.device) for column in zip(*pairs))
        token_ids.index_copy_(0, rows, sampled.index_select(0, sources))

    @torch.inference_mode()
    def _score_prompts(self, logits: torch.Tensor, scoring: "_PromptScoring") -> None:
        """Each scored row's next prompt token: its logprob and the top alternatives, over the
        tokens the sampler may pick (as sampled tokens' logprobs are), onto its sequence."""
        logits[:, self.sampler.num_token_ids :] = float("-inf")
        log_total = logits.logsumexp(-1, keepdim=True)
        targets = to_device(scoring.targets, torch.int64, logits.device)
        target_logprobs = logits.gather(-1, targets[:, None]).sub_(log_total).squeeze(-1)
        top_logits, top_ids = logits.topk(max(seq.params.prompt_logprobs for seq in scoring.seqs), -1)
        target_logprobs, top_ids, top_logprobs = _to_host(target_logprobs, top_ids, top_logits.sub_(log_total))
        row = 0
        for seq, count in zip(scoring.seqs, scoring.counts):
            k = seq.params.prompt_logprobs
            for target in scoring.targets[row : row + count]:
                top = list(zip(top_ids[row][:k], top_logprobs[row][:k]))
                seq.prompt_logprobs.append(TokenLogprob(target, target_logprobs[row], top))
                row += 1

    def _prepare(self, batch: ScheduledBatch, sampling_rows: list[int], pad_to: int | None = None) -> ForwardBatch:
        """The step's inputs in one pass: the decodes' single tokens first, then the prompt chunks;
        with `pad_to`, padding tokens after them up to that many rows, that store nothing (slot -1)."""
        seqs, bs, d = batch.seqs, self.block_size, batch.num_decodes
        self._write_decode_rows(seqs[:d])
        ends = list(range(1, d + 1))
        start = d
        for seq, num_new, draft in zip(seqs[d:], batch.num_new_tokens[d:], batch.drafts[d:]):
            end = start + num_new
            chunk = np.arange(seq.num_cached, seq.num_cached + num_new)
            self._token_ids.np[start:end] = seq.token_ids[seq.num_cached : seq.num_cached + num_new - len(draft)] + draft
            self._positions.np[start:end] = chunk
            self._slot_mapping.np[start:end] = np.asarray(seq.block_table)[chunk // bs] * bs + chunk % bs
            start = end
            ends.append(end)
        n = len(seqs)
        self._context_lens.np[d:n] = [seq.num_cached + num_new for seq, num_new in zip(seqs[d:], batch.num_new_tokens[d:])]
        self._query_start_loc.np[0] = 0
        self._query_start_loc.np[1 : n + 1] = ends
        rows = [row for i in sampling_rows for row in range(ends[i] - 1 - len(batch.drafts[i]), ends[i])]
        self._logits_indices.np[: len(rows)] = rows
        padded = pad_to or start
        self._pad_tokens(slice(start, padded))
        return ForwardBatch(
            token_ids=self._token_ids.load(padded)[:start],
            positions=self._positions.load(padded)[:start],
            slot_mapping=self._slot_mapping.load(padded)[:start],
            block_tables=self._load_block_tables(seqs),
            context_lens=self._context_lens.load(n),
            query_start_loc=self._query_start_loc.load(n + 1),
            query_lens=list(batch.num_new_tokens),
            logits_indices=self._logits_indices.load(len(rows)),
        )

    def _prepare_graph_step(self, batch: ScheduledBatch, bucket: int, query_len: int) -> torch.Tensor | None:
        """A graph step's inputs in the graphs' static buffers: the batch's sequences on
        `query_len` rows each, then padding sequences up to `bucket` that store nothing; block
        tables at their full width, the graphs' fixed shape. Returns the logits rows to sample in
        the order the sampler takes them, or None when they are the first ones, in order."""
        seqs, n = batch.seqs, len(batch.seqs)
        width = self._graphs.inputs.table_width
        rows = None
        if query_len == 1:
            self._write_decode_rows(seqs)
        else:
            rows = self._write_verify_rows(batch, query_len)
        tables = self._block_tables.np[: bucket * width].reshape(bucket, width)
        write_padding(self._token_ids.np, self._positions.np, self._slot_mapping.np, self._context_lens.np, tables,
                      n, bucket, query_len, self.block_size)
        for buffer in (self._token_ids, self._positions, self._slot_mapping):
            buffer.load(bucket * query_len)
        self._context_lens.load(bucket)
        self._load_block_tables(seqs, bucket, width)
        if rows is None or rows == list(range(len(rows))):
            return None
        self._logits_indices.np[: len(rows)] = rows
        return self._logits_indices.load(len(rows))

    def _write_verify_rows(self, batch: ScheduledBatch, query_len: int) -> list[int]:
        """Sequence s on rows [s * q, (s + 1) * q): padding rows first (slot -1), then its last
        token and drafts at their positions, so that they are the last rows of its window as the
        prefill path places a window at the end of the context. Returns the rows of its tokens."""
        bs, q = self.block_size, query_len
        rows = []
        for s, (seq, num_new, draft) in enumerate(zip(batch.seqs, batch.num_new_tokens, batch.drafts)):
            first, end, context = (s + 1) * q - num_new, (s + 1) * q, seq.num_cached + num_new
            self._pad_tokens(slice(s * q, first))
            window = np.arange(seq.num_cached, context)
            self._token_ids.np[first:end] = seq.token_ids[seq.num_cached : context - len(draft)] + draft
            self._positions.np[first:end] = window
            self._slot_mapping.np[first:end] = np.asarray(seq.block_table)[window // bs] * bs + window % bs
            self._context_lens.np[s] = context
            rows += range(first, end)
        return rows

    def _pad_tokens(self, rows: slice) -> None:
        pad_tokens(self._token_ids.np, self._positions.np, self._slot_mapping.np, rows)

    def _write_decode_rows(self, seqs: list[Sequence]) -> None:
        """Rows [0, len(seqs)) of the host buffers: each sequence's newest token, to be stored."""
        bs, n = self.block_size, len(seqs)
        positions = [seq.num_tokens - 1 for seq in seqs]
        self._token_ids.np[:n] = [seq.token_ids[-1] for seq in seqs]
        self._positions.np[:n] = positions
        self._slot_mapping.np[:n] = [seq.block_table[pos // bs] * bs + pos % bs for seq, pos in zip(seqs, positions)]
        self._context_lens.np[:n] = [pos + 1 for pos in positions]

    def _load_block_tables(self, seqs: list[Sequence], rows: int | None = None, width: int | None = None) -> torch.Tensor:
        # [rows, width], contiguous; by default one row per sequence, as wide as the longest table
        # in the batch (attention reads whole rows). Entries past a row's end keep whatever earlier
        # steps wrote there: block ids all, hence valid padding, which the model never reads.
        # Rows past the batch (graph padding, `write_padding`) read block 0.
        rows, width = rows or len(seqs), width or max(len(seq.block_table) for seq in seqs)
        tables = self._block_tables.np[: rows * width].reshape(rows, width)
        for row, seq in enumerate(seqs):
            tables[row, : len(seq.block_table)] = seq.block_table
        return self._block_tables.load(rows * width).view(rows, width)


@dataclass
class _PromptScoring:
    """Rows of a step whose logits score the prompt token after them, for `prompt_logprobs`."""

    seqs: list[Sequence]
    counts: list[int]  # rows per sequence
    rows: list[int]  # in the step's token order
    targets: list[int]  # the prompt token each row predicts


def _prompt_scoring(batch: ScheduledBatch) -> _PromptScoring | None:
    """The rows that predict a prompt token not scored yet (a recomputed prompt is not rescored):
    position p predicts token p + 1, and the prompt's last position predicts a generated token."""
    scoring = _PromptScoring([], [], [], [])
    start = 0
    for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
        if seq.wants_prompt_logprobs:
            first = max(seq.num_cached, len(seq.prompt_logprobs))
            end = min(seq.num_cached + num_new, seq.num_prompt_tokens - 1)
            if first < end:
                scoring.seqs.append(seq)
                scoring.counts.append(end - first)
                scoring.rows += range(start + first - seq.num_cached, start + end - seq.num_cached)
                scoring.targets += seq.token_ids[first + 1 : end + 1]
        start += num_new
    return scoring if scoring.seqs else None


class _HostCopy:
    """Device tensors on their way to the host: the copies start now, `lists` waits for them."""

    def __init__(self, *tensors: torch.Tensor | None):
        self._on_host = [None if t is None else t.to("cpu", non_blocking=True) for t in tensors]
        self._done = None
        if any(t is not None and t.is_cuda for t in tensors):
            self._done = torch.cuda.Event()
            self._done.record()

    def lists(self) -> list:
        """The tensors as Python lists, behind one synchronisation on CUDA."""
        if self._done is not None:
            self._done.synchronize()
        return [None if t is None else t.tolist() for t in self._on_host]


def _to_host(*tensors: torch.Tensor | None) -> list:
    """Device tensors as Python lists, through one synchronisation on CUDA."""
    return _HostCopy(*tensors).lists()


class LaunchedStep:
    """A step the device has been given: what it samples stays on the device (the next step may
    read it there) until `results` brings it to the host."""

    def __init__(self, batch: ScheduledBatch, sampling_rows: list[int], sampled: SamplerOutput | None,
                 copy: _HostCopy | None):
        self.batch = batch
        self.sampling_rows = sampling_rows  # the batch's rows that sample, in the order of `sampled`'s rows
        self.sampled = sampled
        self._copy = copy

    @property
    def needs_tokens_on_host(self) -> bool:
        """Whether the next step needs this one's tokens on the host first: a grammar must accept a
        token before it can say what may follow."""
        return any(self.batch.seqs[i].grammar is not None for i in self.sampling_rows)

    def results(self) -> list:
        """Per scheduled sequence: (sampled token, its logprobs if asked), or None for a prompt
        chunk that stops short of the prompt's end; a list of such pairs for a sequence with
        drafts: the tokens verification kept. Waits for the step."""
        results: list[tuple[int, TokenLogprob | None] | None] = [None] * len(self.batch.seqs)
        if self.sampled is None:
            return results
        token_ids, *logprobs = self._copy.lists()
        drafts = self.batch.drafts
        seqs = [self.batch.seqs[i] for i in self.sampling_rows for _ in range(1 + len(drafts[i]))]
        rows = self.sampled.logprob_rows
        logprob_of = dict(zip(rows, _token_logprobs(seqs, rows, token_ids, *logprobs)))
        row = 0
        for i in self.sampling_rows:
            if drafts[i]:
                results[i] = _verified(drafts[i], token_ids, row, logprob_of)
            else:
                results[i] = (token_ids[row], logprob_of.get(row))
            row += 1 + len(drafts[i])
        return results


def _verified(draft: list[int], token_ids: list[int], row: int, logprob_of: dict) -> list[tuple]:
    """A verified window's tokens: each row's token, up to the first that differs from the draft
    it checks (the target's own choice there), or through the row after the last draft. The
    sampler makes a row's token its draft exactly when it accepts the draft."""
    tokens = []
    for position in range(len(draft) + 1):
        tokens.append((token_ids[row + position], logprob_of.get(row + position)))
        if position == len(draft) or token_ids[row + position] != draft[position]:
            break
    return tokens


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
