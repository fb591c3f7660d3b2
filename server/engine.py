"""The engine: requests in, streamed outputs out, one model step at a time for all of them.

`EngineCore` holds the state (requests, scheduler, KV blocks, model runner) and runs a step:
schedule, forward, sample, apply stops and detokenize. It is touched by one thread only: the
loop thread of `AsyncEngine`, which blocks on model steps so the asyncio loop never does.
Requests and aborts cross into that thread through a queue; outputs cross back with
`loop.call_soon_threadsafe`, once per step and event loop.
"""

import argparse
import asyncio
import itertools
import logging
import math
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

from model.load import load_model, model_dir_or_demo
from model.qwen3 import Qwen3Model
from model.tokenizer import Tokenizer
from server.block_manager import BlockManager
from server.detokenizer import IncrementalDetokenizer
from server.model_runner import ModelRunner, kv_blocks_for_free_memory
from server.request import (
    ChoiceDelta,
    EngineDead,
    EngineOverloaded,
    EngineStats,
    GenerationRequest,
    RequestFailed,
    RequestOutput,
    RequestRejected,
)
from server.scheduler import ScheduledBatch, Scheduler
from server.sequence import RequestState, Sequence

logger = logging.getLogger("nanoserve.engine")

# Defaults where the engine flags are not given. On CPU the KV cache is sized from
# max_model_len x max_num_seqs, so the context is capped: the demo's 40960 positions would
# otherwise reserve 40960 x 8 tokens (1.3 GB) of cache for a model of a few MB.
CPU_MAX_MODEL_LEN = 2048
DEFAULT_MAX_NUM_SEQS = {"cpu": 8, "cuda": 256}
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cpu": 2048, "cuda": 8192}
MAX_LOGPROBS = 20


@dataclass
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from free memory on CUDA, max_model_len x max_num_seqs on CPU
    max_model_len: int | None = None  # None: the model's context (CPU: at most 2048), at most the cache
    max_num_seqs: int | None = None  # None: 256 on CUDA, 8 on CPU
    max_num_batched_tokens: int | None = None  # None: 8192 on CUDA, 2048 on CPU
    max_queue: int = 1024  # requests waiting for their first output before new ones are refused


def resolve_config(config: EngineConfig, model: Qwen3Model) -> EngineConfig:
    """`config` with every default filled in for this model and device, or ValueError."""
    for name in ("block_size", "num_kv_blocks", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_queue"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    device = model.device.type
    max_positions = model.config.max_position_embeddings
    if config.max_model_len and config.max_model_len > max_positions:
        raise ValueError(f"--max-model-len {config.max_model_len} exceeds the model's {max_positions} positions")
    max_num_seqs = config.max_num_seqs or DEFAULT_MAX_NUM_SEQS[device]
    max_num_batched_tokens = config.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS[device]
    if max_num_batched_tokens < max_num_seqs:
        raise ValueError(
            f"--max-num-batched-tokens {max_num_batched_tokens} is below --max-num-seqs {max_num_seqs}: "
            "a decode step takes one token from every running sequence"
        )
    max_model_len = config.max_model_len or (
        max_positions if device == "cuda" else min(max_positions, CPU_MAX_MODEL_LEN)
    )
    num_kv_blocks = config.num_kv_blocks
    if num_kv_blocks is None and device == "cuda":
        num_kv_blocks = kv_blocks_for_free_memory(model, config.block_size, max_num_batched_tokens, max_num_seqs)
    elif num_kv_blocks is None:
        num_kv_blocks = math.ceil(max_model_len / config.block_size) * max_num_seqs
    capacity = num_kv_blocks * config.block_size
    if config.max_model_len and config.max_model_len > capacity:
        raise ValueError(
            f"--max-model-len {config.max_model_len} does not fit the KV cache "
            f"({num_kv_blocks} blocks of {config.block_size} = {capacity} tokens)"
        )
    return replace(
        config,
        num_kv_blocks=num_kv_blocks,
        max_model_len=min(max_model_len, capacity),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
    )


class EngineCore:
    """Requests, scheduler, KV blocks and model runner; one thread calls it."""

    def __init__(self, model: Qwen3Model, tokenizer: Tokenizer, config: EngineConfig):
        self.tokenizer = tokenizer
        self.config = config
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, config, tokenizer.eos_token_ids)
        self.requests: dict[str, RequestState] = {}
        self._seq_ids = itertools.count()

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def add_request(self, request: GenerationRequest) -> None:
        params = request.params
        prompt_len = len(request.prompt_token_ids)
        max_tokens = params.max_tokens if params.max_tokens is not None else self.config.max_model_len - prompt_len
        seqs = []
        for index in range(params.n):
            detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            seq = Sequence(next(self._seq_ids), request, index, max_tokens, self.tokenizer.eos_token_ids, detokenizer)
            seq.sampling = self.runner.sampler.new_state(params, request.prompt_token_ids, index)
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
        that failed it: a failing batch fails its own requests, not the engine."""
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        try:
            return self._process(batch, self.runner.run(batch))
        except Exception as err:
            logger.exception("engine step failed; failing the requests of its batch")
            return self._fail(batch, err)

    def _process(self, batch: ScheduledBatch, results: list) -> list[tuple[str, RequestOutput | Exception]]:
        advanced: dict[str, RequestState] = {}
        for seq, num_new, result in zip(batch.seqs, batch.num_new_tokens, results):
            seq.num_cached += num_new
            if result is None:
                continue
            state = self.requests[seq.request_id]
            state.add(seq.append_token(*result))
            if seq.is_finished:
                self.scheduler.remove(seq)
            advanced[seq.request_id] = state
        outputs: list[tuple[str, RequestOutput | Exception]] = []
        for request_id, state in advanced.items():
            output = state.take_output()
            if output.finished:
                del self.requests[request_id]
            outputs.append((request_id, output))
        return outputs

    def _fail(self, batch: ScheduledBatch, err: Exception) -> list[tuple[str, RequestOutput | Exception]]:
        failed = []
        for request_id in dict.fromkeys(seq.request_id for seq in batch.seqs):
            state = self.requests.pop(request_id, None)
            if state is None:
                continue
            for seq in state.seqs:
                self.scheduler.remove(seq)
            message = f"the engine failed while running this request: {type(err).__name__}: {err}"
            failed.append((request_id, RequestFailed(message)))
        return failed


class _Stream:
    """One request's outputs on the asyncio side; `put` runs on `loop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.started = False  # has received anything: no longer counts as waiting
        self._items: deque[RequestOutput | Exception] = deque()
        self._ready = asyncio.Event()

    def put(self, item: RequestOutput | Exception) -> None:
        self._items.append(item)
        self._ready.set()

    async def get(self) -> RequestOutput:
        """The next output; outputs that piled up while the consumer was busy come as one."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, Exception):
            raise item
        while self._items and isinstance(self._items[0], RequestOutput):
            item = _merge(item, self._items.popleft())
        return item


def _merge(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    choices = {delta.index: delta for delta in first.choices}
    for delta in second.choices:
        if (earlier := choices.get(delta.index)) is None:
            choices[delta.index] = delta
            continue
        logprobs = None
        if earlier.logprobs is not None or delta.logprobs is not None:
            logprobs = (earlier.logprobs or []) + (delta.logprobs or [])
        choices[delta.index] = ChoiceDelta(
            index=delta.index,
            text=earlier.text + delta.text,
            token_ids=earlier.token_ids + delta.token_ids,
            logprobs=logprobs,
            finish_reason=delta.finish_reason,
            stop_reason=delta.stop_reason,
        )
    return replace(second, choices=[choices[index] for index in sorted(choices)])


def _put_all(items: list[tuple[_Stream, RequestOutput | Exception]]) -> None:
    for stream, item in items:
        stream.put(item)


class AsyncEngine:
    def __init__(
        self, model: Qwen3Model, tokenizer: Tokenizer, model_dir: str | Path, config: EngineConfig | None = None
    ):
        self.config = resolve_config(config or EngineConfig(), model)
        self.tokenizer = tokenizer
        self.model_dir = Path(model_dir)
        self.max_model_len: int = self.config.max_model_len
        self.vocab_size = model.config.vocab_size
        self._core = EngineCore(model, tokenizer, self.config)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _streams, _num_queued, _dead
        self._streams: dict[str, _Stream] = {}
        self._num_queued = 0
        self._dead: str | None = None
        self._thread = threading.Thread(target=self._loop, name="nanoserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        with self._lock:
            num_waiting = self._num_queued
            num_running = len(self._streams) - num_waiting
        blocks = self._core.block_manager
        return EngineStats(
            num_running=num_running,
            num_waiting=num_waiting,
            kv_blocks_used=blocks.num_used,
            kv_blocks_total=blocks.num_blocks,
            num_preemptions=self._core.scheduler.num_preemptions,
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; the last has `finished`. Stopping the iteration early
        (aclose, cancellation) aborts the request and frees its KV blocks."""
        _validate(request, self.vocab_size, self.max_model_len)
        request_id = request.request_id
        stream = _Stream(asyncio.get_running_loop())
        with self._lock:
            if self._dead is not None:
                raise EngineDead(self._dead)
            if request_id in self._streams:
                raise RequestRejected(f"request id {request_id!r} is already in use", param="request_id")
            if self._num_queued >= self.config.max_queue:
                raise EngineOverloaded(f"{self._num_queued} requests are already waiting (--max-queue); retry later")
            self._streams[request_id] = stream
            self._num_queued += 1
        self._inbox.put(("add", request))
        finished = False
        try:
            while not finished:
                output = await stream.get()
                finished = output.finished
                yield output
        finally:
            with self._lock:
                if self._streams.get(request_id) is stream:
                    del self._streams[request_id]
                    self._num_queued -= not stream.started
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort the request at the next step boundary; its iterator ends with finish_reason "abort"."""
        self._inbox.put(("abort", request_id))

    def shutdown(self) -> None:
        """Stop the loop; iterators still running raise EngineDead."""
        self._inbox.put(None)
        self._thread.join()

    def _loop(self) -> None:
        reason = "the engine was shut down"
        try:
            while self._take_commands(block=not self._core.has_work()):
                if self._core.has_work():
                    self._deliver(self._core.step())
        except Exception as err:
            logger.exception("the engine loop failed")
            reason = f"the engine loop failed: {type(err).__name__}: {err}"
        finally:
            self._die(reason)

    def _take_commands(self, block: bool) -> bool:
        """Apply the queued adds and aborts (waiting for one if `block`); False once told to stop."""
        while True:
            try:
                command = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if command is None:
                return False
            kind, payload = command
            if kind == "add":
                self._add(payload)
            elif (output := self._core.abort(payload)) is not None:
                self._deliver([(payload, output)])

    def _add(self, request: GenerationRequest) -> None:
        try:
            self._core.add_request(request)
        except Exception as err:
            logger.exception("could not add request %s", request.request_id)
            self._deliver([(request.request_id, RequestFailed(f"could not start the request: {err}"))])

    def _deliver(self, outputs: list[tuple[str, RequestOutput | Exception]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            for request_id, item in outputs:
                stream = self._streams.get(request_id)
                if stream is None:  # its consumer has gone; an abort is on its way
                    continue
                if not stream.started:
                    stream.started = True
                    self._num_queued -= 1
                if isinstance(item, Exception) or item.finished:  # over for the engine: id free, not running
                    del self._streams[request_id]
                by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, items in by_loop.items():
            _call_soon(loop, items)

    def _die(self, reason: str) -> None:
        with self._lock:
            self._dead = reason
            streams = list(self._streams.values())
        for stream in streams:
            _call_soon(stream.loop, [(stream, EngineDead(reason))])


def _call_soon(loop: asyncio.AbstractEventLoop, items: list[tuple[_Stream, RequestOutput | Exception]]) -> None:
    try:
        loop.call_soon_threadsafe(_put_all, items)
    except RuntimeError:  # the loop is closed: nobody is left to read these
        pass


def _validate(request: GenerationRequest, vocab_size: int, max_model_len: int) -> None:
    """RequestRejected for a request the engine can never serve."""
    p = request.params
    prompt_len = len(request.prompt_token_ids)

    def check(ok: bool, message: str, param: str, code: str | None = None) -> None:
        if not ok:
            raise RequestRejected(message, code=code, param=param)

    check(prompt_len > 0, "the prompt is empty", "prompt")
    def in_vocab(token_ids) -> bool:
        return all(0 <= t < vocab_size for t in token_ids)

    check(in_vocab(request.prompt_token_ids), f"prompt token ids must be in [0, {vocab_size})", "prompt")
    check(p.max_tokens is None or p.max_tokens >= 1, "max_tokens must be at least 1", "max_tokens")
    wanted = prompt_len + (p.max_tokens or 1)
    check(
        wanted <= max_model_len,
        f"This model's maximum context length is {max_model_len} tokens. However, you requested {wanted} tokens "
        f"({prompt_len} in the prompt, {wanted - prompt_len} in the completion). "
        "Please reduce the length of the prompt or completion.",
        "max_tokens" if prompt_len < max_model_len else "prompt",
        code="context_length_exceeded",
    )
    check(p.n >= 1, "n must be at least 1", "n")
    check(p.temperature >= 0, "temperature must be at least 0", "temperature")
    check(0 < p.top_p <= 1, "top_p must be in (0, 1]", "top_p")
    check(p.top_k >= -1, "top_k must be -1 or 0 (off) or positive", "top_k")
    check(0 <= p.min_p <= 1, "min_p must be in [0, 1]", "min_p")
    check(p.repetition_penalty > 0, "repetition_penalty must be positive", "repetition_penalty")
    check(p.min_tokens >= 0, "min_tokens must be at least 0", "min_tokens")
    check(p.max_tokens is None or p.min_tokens <= p.max_tokens, "min_tokens must not exceed max_tokens", "min_tokens")
    check(p.logprobs is None or 0 <= p.logprobs <= MAX_LOGPROBS, f"logprobs must be in [0, {MAX_LOGPROBS}]", "logprobs")
    check(in_vocab(p.logit_bias), f"logit_bias token ids must be in [0, {vocab_size})", "logit_bias")
    check(in_vocab(p.stop_token_ids), f"stop_token_ids must be in [0, {vocab_size})", "stop_token_ids")


def create_engine(args: argparse.Namespace) -> AsyncEngine:
    """Load the model and tokenizer that the CLI flags name and start an engine over them."""
    model_dir = model_dir_or_demo(args.model)
    # Loaded on a thread that then ends, so that the engine's loop thread is the only one that ever
    # runs torch's parallel CPU ops: OpenMP (libgomp) keeps a worker team for every such thread,
    # and once teams outnumber the cores all of them sleep between ops, halving CPU decode speed.
    with ThreadPoolExecutor(max_workers=1) as loader:
        model = loader.submit(load_model, model_dir, args.device, args.dtype).result()
    config = EngineConfig(**{field.name: getattr(args, field.name) for field in fields(EngineConfig)})  # flag names
    return AsyncEngine(model, Tokenizer(model_dir), model_dir, config)
