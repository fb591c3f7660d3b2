"""The engine's asynchronous front: requests in, streamed outputs out, one model step at a time
for all of them.

`AsyncEngine` owns an `EngineCore` and the one thread that drives it, which blocks on model steps
so the asyncio loop never does. Requests and aborts cross into that thread through a queue;
outputs cross back with `loop.call_soon_threadsafe`, once per step and event loop.
"""

import argparse
import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields, replace
from pathlib import Path

from model.config import load_config
from model.load import load_model, model_dir_or_demo
from model.qwen3 import Qwen3Model
from model.tokenizer import Tokenizer
from server.engine.config import EngineConfig, resolve_config
from server.engine.core import EngineCore, validate_request
from server.engine.request import (
    ChoiceDelta,
    EngineDead,
    EngineOverloaded,
    EngineStats,
    GenerationRequest,
    RequestFailed,
    StructuredOutput,
    RequestOutput,
    RequestRejected,
)

logger = logging.getLogger("nanoserve.engine")


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
    return replace(second, choices=[choices[index] for index in sorted(choices)],
                   prompt_logprobs=first.prompt_logprobs or second.prompt_logprobs)


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
        self._core = EngineCore(model, tokenizer, self.config)
        self.vocab_size = self._core.vocab_size
        # CUDA graphs or eager, and whether steps overlap, for the startup log
        self.decode_mode: str = self._core.runner.decode_mode + ("; async scheduling" if self.config.async_scheduling else "")
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
        blocks, speculation = self._core.block_manager, self._core.speculator.stats
        return EngineStats(
            num_running=num_running,
            num_waiting=num_waiting,
            kv_blocks_used=blocks.num_used,
            kv_blocks_total=blocks.num_blocks,
            num_preemptions=self._core.scheduler.num_preemptions,
            kv_blocks_cached=blocks.num_free_cached,
            prefix_cache_queries=blocks.prefix_cache_queries,
            prefix_cache_hits=blocks.prefix_cache_hits,
            spec_decode_drafts=speculation.num_drafts,
            spec_decode_draft_tokens=speculation.draft_tokens,
            spec_decode_accepted_tokens=speculation.accepted_tokens,
            spec_decode_accepted_per_position=tuple(speculation.accepted_per_position),
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; the last has `finished`. Stopping the iteration early
        (aclose, cancellation) aborts the request and frees its KV blocks."""
        validate_request(request, self.vocab_size, self.max_model_len)
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

    async def compile_structured_output(self, constraint: StructuredOutput) -> None:
        """Compile `constraint`'s grammar (cached for the request that uses it) off the event loop;
        GrammarError, with the grammar engine's reason, when it cannot be compiled."""
        await asyncio.get_running_loop().run_in_executor(None, self._core.grammars.compile, constraint)

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


def create_engine(args: argparse.Namespace) -> AsyncEngine:
    """Load the model and tokenizer that the CLI flags name and start an engine over them."""
    model_dir = model_dir_or_demo(args.model)
    config = EngineConfig(**{field.name: getattr(args, field.name) for field in fields(EngineConfig)})  # flag names
    # Loaded (and its CPU ops timed) on a thread that then ends, so that the engine's loop thread is
    # the only one that ever runs torch's parallel CPU ops: OpenMP (libgomp) keeps a worker team
    # for every such thread, and once teams outnumber the cores all of them sleep between ops,
    # halving CPU decode speed.
    load_config(model_dir)  # first the cheap checks, so a wrong directory or a broken tokenizer fails at once
    workers = None
    if config.tensor_parallel_size > 1:  # the other ranks' processes start loading their shards now
        from server.engine.distributed import TensorParallelWorkers

        workers = TensorParallelWorkers(model_dir, args.device, args.dtype, args.kernels, config)
    tokenizer = Tokenizer(model_dir)
    with ThreadPoolExecutor(max_workers=1) as loader:
        if workers is not None:
            model, config = loader.submit(workers.load_rank0).result()
        else:
            model, config = loader.submit(_load, model_dir, args.device, args.dtype, config).result()
    engine = AsyncEngine(model, tokenizer, model_dir, config)
    if workers is not None:
        workers.serving(engine._die)
    return engine


def _load(model_dir: Path, device: str, dtype: str, config: EngineConfig) -> tuple[Qwen3Model, EngineConfig]:
    model = load_model(model_dir, device, dtype, block_size=config.block_size)
    config = resolve_config(config, model)
    if model.device.type == "cpu":
        logger.info(model.plan_cpu_ops(config.max_num_seqs, config.max_model_len, config.quantization).describe())
    return model, config
