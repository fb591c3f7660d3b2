"""`POST /v1/completions`: raw prompts (text or token ids, one or many) into the engine, one
engine request per prompt; choice `i * n + j` is the j-th choice of prompt i, as in OpenAI."""

import time
from collections.abc import AsyncIterator

from quart import Response

from server.api import sse
from server.api.engine_stream import EngineStreams
from server.api.protocol import parse_request, random_id
from server.api.protocol_chat import usage
from server.api.protocol_completions import CompletionChoice, CompletionRequest, completion, completion_choice
from server.engine.request import ChoiceDelta, GenerationRequest, RequestOutput
from server.api.serving import ServingContext, data_stream, json_response, sse_response


async def create_completion(ctx: ServingContext, body: bytes) -> Response:
    request = parse_request(CompletionRequest, body)
    ctx.check_model(request.model)
    prompt_ids, echoes = [], []
    for prompt in request.prompts:
        ids = ctx.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        ctx.check_token_ids(ids, param="prompt")
        prompt_ids.append(ids)
        echoes.append((prompt if isinstance(prompt, str) else ctx.tokenizer.decode(prompt)) if request.echo else "")
    params = request.sampling_params(request.max_tokens, request.logprobs)
    completion_id = random_id("cmpl-")
    generation_requests = [GenerationRequest(f"{completion_id}-{i}", ids, params) for i, ids in enumerate(prompt_ids)]
    streams = await ctx.open_streams(generation_requests, "prompt")
    reply = _CompletionReply(ctx, request, completion_id, int(time.time()), echoes)
    if request.stream:
        return sse_response(data_stream(streams, reply.chunks(streams)))
    try:
        async for prompt_index, output in streams.outputs():
            reply.add(prompt_index, output)
    finally:
        await streams.close()
    return json_response(reply.completion())


class _CompletionReply:
    def __init__(self, ctx: ServingContext, request: CompletionRequest, completion_id: str, created: int,
                 echoes: list[str]):
        self._ctx = ctx
        self._request = request
        self._id = completion_id
        self._created = created
        self._n = request.n or 1
        self._choices = [CompletionChoice(i, echoes[i // self._n]) for i in range(len(echoes) * self._n)]
        self._last_outputs: dict[int, RequestOutput] = {}

    def add(self, prompt_index: int, output: RequestOutput) -> list[tuple[CompletionChoice, ChoiceDelta]]:
        """Fold in one engine output; returns each choice it advanced, with its delta."""
        self._last_outputs[prompt_index] = output
        advanced = []
        for delta in output.choices:
            choice = self._choices[prompt_index * self._n + delta.index]
            choice.add(delta)
            advanced.append((choice, delta))
        return advanced

    def _logprobs(self, choice: CompletionChoice, logprobs) -> dict | None:
        if self._request.logprobs is None:
            return None
        columns = self._ctx.logprobs.completion(logprobs or [], choice.text_offset)
        if columns["tokens"]:
            choice.text_offset = columns["text_offset"][-1] + len(columns["tokens"][-1])
        return columns

    def _usage(self) -> dict:
        outputs = self._last_outputs.values()
        return usage(sum(o.prompt_tokens for o in outputs), sum(o.completion_tokens for o in outputs),
                     sum(o.num_cached_tokens for o in outputs))

    def completion(self) -> dict:
        choices = [
            completion_choice(c.index, c.text, self._logprobs(c, c.logprobs), c.finish_reason) for c in self._choices
        ]
        return completion(self._id, self._created, self._ctx.model_name, choices, self._usage())

    def _chunk(self, choices: list[dict]) -> str:
        payload = completion(self._id, self._created, self._ctx.model_name, choices, None)
        if self._request.include_usage:
            payload["usage"] = None  # only the last chunk carries usage
        return sse.data_event(payload)

    async def chunks(self, streams: EngineStreams) -> AsyncIterator[str]:
        for choice in self._choices:
            if choice.text:  # the echoed prompt comes first
                yield self._chunk([completion_choice(choice.index, choice.text, None, None)])
        async for item in streams.outputs(keepalive=True):
            if item is None:
                yield sse.KEEPALIVE
                continue
            for choice, delta in self.add(*item):
                if delta.text or delta.finish_reason is not None:
                    logprobs = self._logprobs(choice, delta.logprobs)
                    yield self._chunk([completion_choice(choice.index, delta.text, logprobs, delta.finish_reason)])
        if self._request.include_usage:
            yield sse.data_event(completion(self._id, self._created, self._ctx.model_name, [], self._usage()))
