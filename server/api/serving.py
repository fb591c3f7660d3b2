"""What every generation endpoint shares: the engine, tokenizer and served name, prompts rendered
and tokenized, engine streams opened, and answers sent as JSON or as a server-sent event stream."""

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING

import jinja2
from quart import Response

from server.api import sse
from server.api.engine_stream import EngineStreams
from server.api.errors import as_api_error, invalid_request, model_not_found
from server.api.metrics import ServerMetrics
from server.api.protocol_logprobs import LogprobFormatter
from server.engine.request import GenerationRequest, GrammarError, RequestRejected, StructuredOutput

if TYPE_CHECKING:  # the app never imports the engine's torch side at run time
    from server.engine.async_engine import AsyncEngine


@dataclass
class ServingContext:
    engine: "AsyncEngine"
    model_name: str
    metrics: ServerMetrics

    def __post_init__(self) -> None:
        self.tokenizer = self.engine.tokenizer
        self.logprobs = LogprobFormatter(self.tokenizer)

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise model_not_found(model)

    # Tokenizing stays on the event-loop thread: one HF tokenizer must not encode in two threads
    # at once (it mutates its padding state), and prompts are cheap next to a model step.
    def chat_prompt_ids(self, messages: list[dict], enable_thinking: bool | None, param: str,
                        add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
        try:
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                        enable_thinking=enable_thinking, tools=tools)
        except jinja2.TemplateError as err:
            raise invalid_request(f"The chat template rejected the messages: {err}", param=param) from None
        return self.tokenizer.encode(prompt)

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
        vocab_size = len(self.tokenizer)
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


def json_response(payload: dict, status: int = 200) -> Response:
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
