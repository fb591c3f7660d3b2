"""What every generation endpoint shares: the engine, tokenizer and served name, prompts rendered
and tokenized, engine streams opened, and answers sent as JSON or as a server-sent event stream."""

import asyncio
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import jinja2
from quart import Response

from server.api import sse
from server.api.engine_stream import EngineStreams
from model.tokenizer import PromptTooLong
from server.api.errors import APIError, as_api_error, invalid_request, model_not_found
from server.api.metrics import ServerMetrics
from server.api.protocol_logprobs import LogprobFormatter
from server.engine.request import GenerationRequest, GrammarError, RequestRejected, StructuredOutput

if TYPE_CHECKING:  # the app never imports the engine's torch side at run time
    from server.engine.async_engine import AsyncEngine

T = TypeVar("T")


@dataclass
class ServingContext:
    engine: "AsyncEngine"
    model_name: str
    metrics: ServerMetrics

    def __post_init__(self) -> None:
        self.tokenizer = self.engine.tokenizer
        self.logprobs = LogprobFormatter(self.tokenizer)
        # Templating, tokenizing and detokenizing run on this one thread: a big input (megabytes
        # take seconds) must not stop the event loop, and one worker keeps the tokenizer's
        # not-thread-safe parts (its lazily built copies, the template cache) to one thread.
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

    def close(self) -> None:
        self._tokenizer_thread.shutdown(cancel_futures=True)

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise model_not_found(model)

    async def _on_tokenizer_thread(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, fn, *args)

    def _too_long(self, err: PromptTooLong, param: str) -> APIError:
        limit = self.engine.max_model_len
        return invalid_request(f"This model's maximum context length is {limit} tokens. However, your prompt is "
                               f"certainly longer: {err}.", param=param, code="context_length_exceeded")

    async def encode(self, text: str, param: str) -> list[int]:
        """Raw text as the tokenizer reads it (special-token text included); a text certainly
        longer than the context is refused from its length alone, before any tokenizing."""
        try:
            return await self._on_tokenizer_thread(self.tokenizer.encode, text, self.engine.max_model_len)
        except PromptTooLong as err:
            raise self._too_long(err, param) from None

    async def chat_prompt_ids(self, messages: list[dict], enable_thinking: bool | None, param: str,
                              add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
        """The chat template's prompt, special tokens only where the template put them."""
        try:
            return await self._on_tokenizer_thread(self.tokenizer.encode_chat, messages, add_generation_prompt,
                                                   enable_thinking, self.engine.max_model_len, tools)
        except jinja2.TemplateError as err:
            raise invalid_request(f"The chat template rejected the messages: {err}", param=param) from None
        except PromptTooLong as err:
            raise self._too_long(err, param) from None

    async def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return await self._on_tokenizer_thread(self.tokenizer.decode, token_ids, skip_special_tokens)

    async def compile_structured_output(self, constraint: StructuredOutput, param: str,
                                        function_params: list[str]) -> None:
        """Compile the request's grammar before it is queued: a schema the grammar engine cannot
        compile is a 400 naming `param` (the response format), or the function whose parameters
        it is (`function_params`, in the order of the constraint's functions)."""
        try:
            await self.engine.compile_structured_output(constraint)
        except GrammarError as err:
            where = param if err.function_index is None else function_params[err.function_index]
            raise invalid_request(f"Invalid '{where}': the grammar engine cannot compile this schema: {err}",
                                  param=where) from None

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        """Token ids must name tokens: ids past the tokenizer's (embedding rows without a token) too."""
        vocab_size = self.engine.vocab_size
        if not token_ids:
            raise invalid_request("The prompt must not be empty.", param=param)
        for token_id in token_ids:
            if not 0 <= token_id < vocab_size:
                raise invalid_request(f"Token id {token_id} is not in the vocabulary (0..{vocab_size - 1}).",
                                      param=param)

    async def open_streams(self, requests: list[GenerationRequest], prompt_param: str) -> EngineStreams:
        """Submit `requests`; admission failures raise here, before any response is sent. The
        engine names the prompt `prompt`; `prompt_param` is what this endpoint's body calls it."""
        streams = EngineStreams(self.engine, requests, self.metrics)
        try:
            await streams.start()
        except RequestRejected as err:
            await streams.close()
            raise RequestRejected(str(err), err.code, prompt_param if err.param == "prompt" else err.param) from None
        except BaseException:
            await streams.close()
            raise
        return streams


def json_response(payload: dict | list, status: int = 200) -> Response:
    return Response(sse.to_json(payload), status=status, mimetype="application/json")


def sse_response(events: AsyncIterator[str]) -> Response:
    response = Response(events, mimetype="text/event-stream", headers=sse.HEADERS)
    response.timeout = None  # a stream lasts as long as generation does
    return response


async def data_stream(streams: EngineStreams, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """A chat or completions stream: `chunks`, then `[DONE]`; a failure after the first byte
    becomes an error event. Closing the stream (also when the client has gone) aborts generation."""
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk
    except Exception as err:  # the status line is long gone: the error travels in the stream
        yield sse.data_event(as_api_error(err).body())
    finally:
        await streams.close()
    yield sse.DONE
