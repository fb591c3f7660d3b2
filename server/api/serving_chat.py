"""`POST /v1/chat/completions`: messages through the chat template into the engine, the reply
back as one object or as a chunk stream (role chunk, deltas, one finish chunk per choice, an
optional usage chunk, `[DONE]`)."""

import time
from collections.abc import AsyncIterator

from quart import Response

from server.api import sse
from server.api.engine_stream import EngineStreams
from server.api.protocol import parse_request, random_id
from server.api.protocol_chat import (
    ChatChoice,
    ChatCompletionRequest,
    ChoiceUpdate,
    chat_completion,
    chunk,
    chunk_choice,
    delta_payloads,
    message_choice,
    usage,
)
from server.api.protocol_tools import grammar_params
from server.engine.request import ChoiceDelta, GenerationRequest, RequestOutput
from server.api.serving import ServingContext, data_stream, json_response, sse_response


async def create_chat_completion(ctx: ServingContext, body: bytes) -> Response:
    request = parse_request(ChatCompletionRequest, body)
    ctx.check_model(request.model)
    prompt_ids = await chat_prompt(ctx, request)
    params = request.chat_sampling_params()
    if params.structured_output is not None:
        await ctx.compile_structured_output(params.structured_output, "response_format",
                                            grammar_params(request.offered_tools, params.structured_output))
    completion_id = random_id("chatcmpl-")
    prediction = await ctx.encode(request.prediction.text, "prediction") if request.prediction else None
    streams = await ctx.open_streams([GenerationRequest(completion_id, prompt_ids, params, prediction or None)],
                                     "messages")
    reply = _ChatReply(ctx, request, completion_id, int(time.time()))
    if request.stream:
        return sse_response(data_stream(streams, reply.chunks(streams)))
    try:
        async for _, output in streams.outputs():
            reply.add(output)
    finally:
        await streams.close()
    return json_response(reply.completion())


async def chat_prompt(ctx: ServingContext, request: ChatCompletionRequest) -> list[int]:
    """The request's messages through the chat template, with the tools it offers."""
    messages = [message.template_message() for message in request.messages]
    return await ctx.chat_prompt_ids(messages, request.enable_thinking, param="messages",
                                     tools=request.template_tools())


class _ChatReply:
    def __init__(self, ctx: ServingContext, request: ChatCompletionRequest, completion_id: str, created: int):
        self._ctx = ctx
        self._request = request
        self._id = completion_id
        self._created = created
        self._choices = [request.new_choice(i) for i in range(request.n or 1)]
        self._last_output: RequestOutput | None = None

    def add(self, output: RequestOutput) -> list[tuple[ChatChoice, ChoiceUpdate, ChoiceDelta]]:
        """Fold in one engine output; returns each choice it advanced, with what became visible."""
        self._last_output = output
        return [(self._choices[delta.index], self._choices[delta.index].add(delta), delta) for delta in output.choices]

    def _unsent_logprobs(self, choice: ChatChoice) -> list[dict] | None:
        if not self._request.logprobs:
            return None
        return self._ctx.logprobs.chat(choice.unsent_logprobs())

    def _usage(self) -> dict:
        last = self._last_output
        predicted = None
        if self._request.prediction is not None:
            predicted = (last.accepted_prediction_tokens, last.rejected_prediction_tokens)
        return usage(last.prompt_tokens, last.completion_tokens, last.num_cached_tokens, predicted)

    def completion(self) -> dict:
        choices = [
            message_choice(c, self._ctx.logprobs.chat(c.logprobs) if self._request.logprobs else None)
            for c in self._choices
        ]
        return chat_completion(self._id, self._created, self._ctx.model_name, choices, self._usage())

    def _chunk(self, choices: list[dict]) -> str:
        payload = chunk(self._id, self._created, self._ctx.model_name, choices, self._request.include_usage)
        return sse.data_event(payload)

    def _role_chunk(self, choice: ChatChoice, first: dict | None) -> str:
        """A choice's first chunk: its `content` is null when the reply is tool calls, as OpenAI sends it."""
        calls = choice.forced_calls or (first is not None and "tool_calls" in first)
        return self._chunk([chunk_choice(choice.index, {"role": "assistant", "content": None if calls else ""})])

    async def chunks(self, streams: EngineStreams) -> AsyncIterator[str]:
        # With tools on offer and no grammar forcing calls, a choice's first chunk waits for its
        # first delta, which says whether the reply is text or calls.
        waiting = {c.index for c in self._choices if self._request.template_tools() and not c.forced_calls}
        for choice in self._choices:
            if choice.index not in waiting:
                yield self._role_chunk(choice, None)
        async for item in streams.outputs(keepalive=True):
            if item is None:
                yield sse.KEEPALIVE
                continue
            for choice, update, delta in self.add(item[1]):
                for payload in delta_payloads(choice, update):
                    if choice.index in waiting:
                        waiting.discard(choice.index)
                        yield self._role_chunk(choice, payload)
                    yield self._chunk([chunk_choice(choice.index, payload, self._unsent_logprobs(choice))])
                if delta.finish_reason is not None and choice.index in waiting:
                    waiting.discard(choice.index)
                    yield self._role_chunk(choice, None)
                if delta.finish_reason is not None:
                    finish = chunk_choice(choice.index, {}, self._unsent_logprobs(choice), choice.finish_reason)
                    yield self._chunk([finish])
        if self._request.include_usage:
            payload = chunk(self._id, self._created, self._ctx.model_name, [], include_usage=False)
            yield sse.data_event(payload | {"usage": self._usage()})
