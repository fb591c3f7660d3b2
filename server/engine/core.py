"""`EngineCore`: requests, scheduler, KV blocks and model runner, and one step over all of them.

A step schedules a batch, runs the model on it, samples, applies stops and detokenizes. The core
is touched by one thread only (the loop thread of `AsyncEngine`), so it needs no locks.

With async scheduling (vLLM's `--async-scheduling`, SGLang's overlap scheduler) a step launches
step n+1 before it reads back step n: the host schedules and prepares while the device computes,
and step n+1's decodes read their tokens from step n's sampled ids on the device. Each sequence
that step n samples holds an unresolved token until then, so the scheduler counts it. Stops stay
exact: a sequence that step n finishes was already scheduled in step n+1, whose token for it is
dropped (its blocks go back after that step, in stream order). A step whose sequences follow a
grammar is read back before the next is scheduled: the next step's masks need its tokens.
"""

import itertools
import logging
import math
from concurrent.futures import ThreadPoolExecutor

from model.load import load_model
from model.qwen3 import Qwen3Model
from model.tokenizer import Tokenizer
from server.engine.block_manager import BlockManager
from server.engine.config import EngineConfig
from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.draft_model import DraftModel, check_vocabularies
from server.engine.model_runner import LaunchedStep, ModelRunner
from server.engine.request import ChoiceDelta, GenerationRequest, RequestFailed, RequestOutput, RequestRejected
from server.engine.scheduler import ScheduledBatch, Scheduler
from server.engine.sequence import RequestState, Sequence
from server.engine.spec_cutoff import measure_cutoff
from server.engine.speculative import Speculator
from server.engine.structured import GrammarCompiler

logger = logging.getLogger("nanoserve.engine")

MAX_LOGPROBS = 20


class EngineCore:
    """Requests, scheduler, KV blocks and model runner; one thread calls it."""

    def __init__(self, model: Qwen3Model, tokenizer: Tokenizer, config: EngineConfig):
        self.tokenizer = tokenizer
        self.config = config
        # Ids past the tokenizer's (Qwen3 pads its embedding table to 151,936 rows for 151,669
        # tokens) have no text: no request may name them and the sampler never picks them.
        self.vocab_size = min(len(tokenizer), model.config.vocab_size)
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        spec = config.speculative_config
        draft = None
        if spec is not None and spec.method == "draft_model":
            draft = _on_own_thread(self._load_draft_model, model, spec)
        self.speculator = Speculator(spec, draft)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   self.speculator)
        self.runner = ModelRunner(model, config, tokenizer.eos_token_ids, self.vocab_size)
        self.runner.attach_draft(draft)
        if spec is not None:
            source = f"draft model {spec.model}" if draft else f"prompt lookup {spec.prompt_lookup_min}..{spec.prompt_lookup_max}"
            logger.info("speculative decoding: %s, %d draft tokens, %s%s", spec.method, spec.num_speculative_tokens,
                        source, f", off above {spec.disable_by_batch_size} decodes" if spec.disable_by_batch_size else "")
            if spec.disable_by_batch_size is None:
                cutoff, measured = _on_own_thread(measure_cutoff, model, self.runner.kv_cache, config.block_size,
                                                  spec.num_speculative_tokens, config.max_num_seqs)
                self.speculator.disable_by_batch_size = cutoff
                logger.info(measured)
        self.grammars = GrammarCompiler(tokenizer, model.config.vocab_size)  # thread-safe (see its docstring)
        self.requests: dict[str, RequestState] = {}
        self._seq_ids = itertools.count()
        self._launched: LaunchedStep | None = None  # async scheduling: the step not read back yet

    def _load_draft_model(self, model: Qwen3Model, spec) -> DraftModel:
        """The draft checkpoint on the target's device and in its dtype, with its own KV cache."""
        draft = load_model(spec.model, model.device.type, str(model.dtype).removeprefix("torch."))
        check_vocabularies(model.config.vocab_size, draft.config.vocab_size, len(self.tokenizer),
                           len(Tokenizer(spec.model)))
        return DraftModel(draft, self.config.num_kv_blocks, self.config.block_size, self.vocab_size)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self._launched is not None

    def add_request(self, request: GenerationRequest) -> None:
        params = request.params
        prompt_len = len(request.prompt_token_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.config.max_model_len - prompt_len
        seqs = []
        for index in range(params.n):
            detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            seq = Sequence(next(self._seq_ids), request, index, max_tokens, self.tokenizer.eos_token_ids, detokenizer)
            seq.sampling = self.runner.sampler.new_state(params, request.prompt_token_ids, index)
            if params.structured_output is not None:
                seq.grammar = self.grammars.matcher(params.structured_output)
            seq.prompt_leader = seqs[0] if seqs else None
            self.speculator.attach(seq, request.prediction_token_ids)
            seqs.append(seq)
        self.requests[request.request_id] = RequestState(request, seqs)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish the request's unfinished choices with "abort" and free their blocks."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for seq in state.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                state.add(seq.abort())
        return state.take_output()

    def step(self) -> list[tuple[str, RequestOutput | Exception]]:
        """Run one step; (request id, output) for every request that advanced, or the exception
        that failed it: a failing batch fails its own requests, not the engine. With async
        scheduling the outputs are those of the step launched before."""
        if self.config.async_scheduling:
            return self._step_overlapped()
        batch = self.scheduler.schedule()
        return [] if batch is None else self._run(batch)

    def _step_overlapped(self) -> list[tuple[str, RequestOutput | Exception]]:
        outputs: list[tuple[str, RequestOutput | Exception]] = []
        previous, self._launched = self._launched, None
        if previous is not None and (previous.needs_tokens_on_host or self._may_speculate()):
            outputs += self._read_back(previous)
            previous = None
        batch = self.scheduler.schedule()
        if batch is not None and batch.num_verifies:  # how many tokens it keeps decides the next step
            return outputs + self._run(batch)
        launched = None
        if batch is not None:
            try:
                launched = self.runner.launch(batch, previous)
            except Exception as err:  # the synchronous path splits or fails the batch
                logger.warning("launching a step failed (%s); running it again synchronously", err)
                if previous is not None:
                    outputs += self._read_back(previous)
                batch = batch.without_finished()
                return outputs + (self._run(batch) if batch.seqs else [])
        if previous is not None:
            outputs += self._read_back(previous)
        if launched is not None:
            outputs += self._advance(launched)
            self._launched = launched
        return outputs

    def _may_speculate(self) -> bool:
        """Whether a running sequence could bring drafts, once its tokens are all on the host."""
        return any(seq.speculation is not None for seq in self.scheduler.running)

    def _advance(self, launched: LaunchedStep) -> list[tuple[str, RequestOutput | Exception]]:
        """A launched step's effect on its sequences before its tokens are known: the K/V it
        writes and a token to come for each sequence it samples. Sequences that finished while it
        was launched (stopped by the step before, aborted) take nothing from it."""
        batch = launched.batch
        live = batch.without_finished()
        self._cache_computed(live)
        advanced: dict[str, RequestState] = {}
        for row, i in enumerate(launched.sampling_rows):
            seq = batch.seqs[i]
            if seq.is_finished:
                continue
            if seq.max_tokens:
                seq.append_unresolved(row)
            else:
                self._add_delta(seq, seq.finish_unsampled(), advanced)
        return self._outputs(advanced)

    def _read_back(self, launched: LaunchedStep) -> list[tuple[str, RequestOutput | Exception]]:
        """Wait for a launched step and give each sequence it sampled that token: stops, text."""
        try:
            results = launched.results()
        except Exception as err:
            return self._fail(launched.batch, err)
        advanced: dict[str, RequestState] = {}
        for seq, result in zip(launched.batch.seqs, results):
            if result is not None and seq.unresolved_row is not None and not seq.is_finished:
                self._add_delta(seq, seq.resolve_token(*result), advanced)
        return self._outputs(advanced)

    def _run(self, batch: ScheduledBatch) -> list[tuple[str, RequestOutput | Exception]]:
        try:
            results = self.runner.run(batch)
        except Exception as err:
            if 0 < batch.num_decodes < len(batch.seqs):
                # Running streams share every step with new prompts: run the two halves apart, so
                # that a failure fails only the half that brings it. Sequences advance only in
                # `_process`, so the halves redo the same work into the same cache slots.
                logger.warning("a mixed step failed (%s); running its decodes and prompt chunks apart", err)
                decodes, chunks = batch.split()
                return self._run(decodes) + self._run(chunks)
            return self._fail(batch, err)
        try:
            return self._process(batch, results)
        except Exception as err:
            return self._fail(batch, err)

    def _process(self, batch: ScheduledBatch, results: list) -> list[tuple[str, RequestOutput | Exception]]:
        self._cache_computed(batch)
        advanced: dict[str, RequestState] = {}
        for seq, draft, result in zip(batch.seqs, batch.drafts, results):
            if draft:
                self.speculator.record(seq, len(draft), len(result) - 1)
                delta = seq.append_tokens(result)
                # The window keeps the K/V of its last token and of the drafts it accepted, one per
                # token it yields (now in `token_ids`, so their blocks can be hashed); the rest is dropped.
                self._cache_tokens(seq, len(delta.token_ids))
                self._add_delta(seq, delta, advanced)
                if not seq.is_finished:
                    self.block_manager.trim(seq)
            elif result is not None:
                self._add_delta(seq, seq.append_token(*result) if seq.max_tokens else seq.finish_unsampled(), advanced)
        return self._outputs(advanced)

    def _cache_computed(self, batch: ScheduledBatch) -> None:
        """Count the tokens the batch computes as cached; blocks it fills become findable. A
        sequence with drafts counts its tokens once verified (`_process`)."""
        for seq, num_new, draft in zip(batch.seqs, batch.num_new_tokens, batch.drafts):
            if not draft:
                self._cache_tokens(seq, num_new)

    def _cache_tokens(self, seq: Sequence, num_new: int) -> None:
        full_blocks = seq.num_cached // self.config.block_size
        seq.num_cached += num_new
        if seq.num_cached // self.config.block_size > full_blocks:  # now written: findable by other sequences
            self.block_manager.cache_full_blocks(seq, full_blocks)

    def _add_delta(self, seq: Sequence, delta: ChoiceDelta, advanced: dict[str, RequestState]) -> None:
        state = self.requests[seq.request_id]
        state.add(delta)
        if seq.is_finished:
            self.scheduler.remove(seq)
        advanced[seq.request_id] = state

    def _outputs(self, advanced: dict[str, RequestState]) -> list[tuple[str, RequestOutput | Exception]]:
        outputs: list[tuple[str, RequestOutput | Exception]] = []
        for request_id, state in advanced.items():
            if not state.has_output:  # choice 0 is still scoring the prompt
                continue
            output = state.take_output()
            if output.finished:
                del self.requests[request_id]
            outputs.append((request_id, output))
        return outputs

    def _fail(self, batch: ScheduledBatch, err: Exception) -> list[tuple[str, RequestOutput | Exception]]:
        logger.error("engine step failed; failing the requests of its batch", exc_info=err)
        failed = []
        for request_id in dict.fromkeys(seq.request_id for seq in batch.seqs):
            state = self.requests.pop(request_id, None)
            if state is None:
                continue
            for seq in state.seqs:
                self.scheduler.remove(seq)
                if not seq.is_finished:  # so that a step launched with it takes nothing from it
                    seq.abort()
            message = f"the engine failed while running this request: {type(err).__name__}: {err}"
            failed.append((request_id, RequestFailed(message)))
        return failed


def _on_own_thread(fn, *args):
    """`fn(*args)` on a thread that then ends: only the loop thread keeps an OpenMP team of torch's
    CPU ops (see `async_engine.create_engine`)."""
    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(fn, *args).result()


def validate_request(request: GenerationRequest, vocab_size: int, max_model_len: int) -> None:
    """RequestRejected for a request the engine can never serve. Token ids must be below
    `vocab_size`, the ids that have a token."""
    p = request.params
    prompt_len = len(request.prompt_token_ids)

    def check(ok: bool, message: str, param: str, code: str | None = None) -> None:
        if not ok:
            raise RequestRejected(message, code=code, param=param)

    def check_ids(token_ids, param: str) -> None:
        outside = next((t for t in token_ids if not 0 <= t < vocab_size), None)
        check(outside is None, f"{param} token ids must be in [0, {vocab_size}); {outside} is not", param)

    check(prompt_len > 0, "the prompt is empty", "prompt")
    # 0 runs the prompt and generates nothing: how a prompt is scored (with prompt_logprobs).
    check(p.max_tokens is None or p.max_tokens >= 0, "max_tokens must be at least 0", "max_tokens")
    # Before the prompt's ids are read one by one: a prompt of millions of ids is refused at once.
    wanted = prompt_len + (1 if p.max_tokens is None else p.max_tokens)
    check(
        wanted <= max_model_len,
        f"This model's maximum context length is {max_model_len} tokens. However, you requested {wanted} tokens "
        f"({prompt_len} in the prompt, {wanted - prompt_len} in the completion). "
        "Please reduce the length of the prompt or completion.",
        "max_tokens" if prompt_len < max_model_len else "prompt",
        code="context_length_exceeded",
    )
    check_ids(request.prompt_token_ids, "prompt")
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        check(math.isfinite(getattr(p, name)), f"{name} must be a finite number", name)
    check(p.n >= 1, "n must be at least 1", "n")
    check(p.temperature >= 0, "temperature must be at least 0", "temperature")
    check(0 < p.top_p <= 1, "top_p must be in (0, 1]", "top_p")
    check(p.top_k >= -1, "top_k must be -1 or 0 (off) or positive", "top_k")
    check(0 <= p.min_p <= 1, "min_p must be in [0, 1]", "min_p")
    check(p.repetition_penalty > 0, "repetition_penalty must be positive", "repetition_penalty")
    check(p.min_tokens >= 0, "min_tokens must be at least 0", "min_tokens")
    check(p.max_tokens is None or p.min_tokens <= p.max_tokens, "min_tokens must not exceed max_tokens", "min_tokens")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(p, name)
        check(value is None or 0 <= value <= MAX_LOGPROBS, f"{name} must be in [0, {MAX_LOGPROBS}]", name)
    check_ids(p.logit_bias, "logit_bias")
    check(all(math.isfinite(bias) for bias in p.logit_bias.values()), "logit_bias values must be finite", "logit_bias")
    check_ids(p.stop_token_ids, "stop_token_ids")
    if p.structured_output is not None:  # the grammar ends the reply with EOS once it is complete
        check(not p.ignore_eos, "ignore_eos cannot be combined with structured output", "ignore_eos")
        check(p.min_tokens == 0, "min_tokens cannot be combined with structured output", "min_tokens")
