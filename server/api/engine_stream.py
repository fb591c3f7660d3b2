"""The engine outputs behind one HTTP request (one engine request per prompt), merged as they come.

Each pending read of an engine iterator runs as its own task so that a wait can time out
without disturbing the iterator: a stream sends keep-alives while the engine is busy, and
admission failures (rejected, overloaded, engine dead) surface before the HTTP status is sent.
`close()` closes every engine iterator, which aborts whatever is unfinished and frees its KV
blocks; handlers call it in `finally`, so it also runs when the client has gone away and the
handler is being cancelled.
"""

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from server.api.metrics import RequestTimer, ServerMetrics
from server.engine.request import GenerationRequest, RequestOutput

if TYPE_CHECKING:  # the app never imports the engine's torch side at run time
    from server.engine.async_engine import AsyncEngine

# How long a stream waits for the first outputs before it commits to status 200 anyway; an
# admission failure is normally known at once, a long prefill or a queue wait is not.
ADMISSION_WAIT_SECONDS = 2.0
KEEPALIVE_SECONDS = 10.0


class EngineStreams:
    def __init__(self, engine: "AsyncEngine", requests: list[GenerationRequest], metrics: ServerMetrics):
        self._iterators = [engine.generate(request) for request in requests]
        self._timers = [RequestTimer(metrics, request.params.n) for request in requests]
        self._reads: dict[asyncio.Future, int] = {}

    def _read(self, index: int) -> None:
        self._reads[asyncio.ensure_future(anext(self._iterators[index]))] = index

    async def start(self) -> None:
        """Submit every request; raise the first admission failure seen within ADMISSION_WAIT_SECONDS."""
        for index in range(len(self._iterators)):
            self._read(index)
        done, _ = await asyncio.wait(self._reads, timeout=ADMISSION_WAIT_SECONDS, return_when=asyncio.FIRST_EXCEPTION)
        for read in sorted(done, key=self._reads.get):
            if read.exception() is not None:
                raise read.exception()

    async def outputs(self, keepalive: bool = False) -> AsyncIterator[tuple[int, RequestOutput] | None]:
        """(request index, output) until every request has finished; with `keepalive`, None after
        each KEEPALIVE_SECONDS without output. An engine iterator's exception is raised here."""
        idle_timeout = KEEPALIVE_SECONDS if keepalive else None
        while self._reads:
            done, _ = await asyncio.wait(self._reads, timeout=idle_timeout, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                yield None
                continue
            read = min(done, key=self._reads.get)  # lowest request index first: a stable order
            index = self._reads.pop(read)
            output = read.result()
            self._timers[index].observe(output)
            if not output.finished:
                self._read(index)
            yield index, output

    async def close(self) -> None:
        for read in self._reads:
            read.cancel()
        await asyncio.gather(*self._reads, return_exceptions=True)
        self._reads.clear()
        for iterator in self._iterators:
            await iterator.aclose()
        for timer in self._timers:
            timer.abandoned()
