"""`POST /v1/completions`: raw prompts (text or token ids, one or many) into the engine, one
engine request per prompt; choice `i * n + j` is the j-th choice of prompt i, as in OpenAI.

`echo` with `logprobs` scores the prompt too, as OpenAI's legacy models did (and scorers such as
lm-eval-harness use): the echoed prompt's tokens lead the logprob columns, the first with null
logprobs; `max_tokens: 0` then scores a prompt without generating."""

import time
from collections.abc import AsyncIterator
from dataclasses import replace

from quart import Response

from server.api import sse
from server.api.engine_stream import EngineStreams
from server.api.protocol import parse_request, random_id
from server.api.protocol_chat import usage
from server.api.protocol_completions import (
    CompletionChoice,
    CompletionRequest,
    completion,
    completion_choice,
    joined_columns,
)
from server.engine.request import ChoiceDelta, GenerationRequest, RequestOutput, SamplingParams
from server.api.serving import ServingContext, data_stream, json_response, sse_response


async def create_completion(ctx: ServingContext, body: bytes) -> Response:
    request = parse_request(CompletionRequest, body)
    ctx.check_model(request.model)
    prompt_ids = await completion_prompts(ctx, request)
    echoes = [(prompt if isinstance(prompt, str) else await ctx.decode(prompt)) if request.echo else ""
              for prompt in request.prompts]
    params = completion_params(request)
    completion_id = random_id("cmpl-")
    generation_requests = [GenerationRequest(f"{completion_id}-{i}", ids, params) for i, ids in enumerate(prompt_ids)]
    streams = await ctx.open_streams(generation_requests, "prompt")
    reply = _CompletionReply(ctx, request, completion_id, int(time.time()), echoes, [ids[0] for ids in prompt_ids])
    if request.stream:
        return sse_response(data_stream(streams, reply.chunks(streams)))
    try:
        async for prompt_index, output in streams.outputs():
            reply.add(prompt_index, output)
    finally:
        await streams.close()
    return json_response(reply.completion())


async def completion_prompts(ctx: ServingContext, request: CompletionRequest) -> list[list[int]]:
    """Each prompt's token ids: text as the tokenizer reads it, token ids checked."""
    prompt_ids = []
    for prompt in request.prompts:
        if isinstance(prompt, str):
            prompt_ids.append(await ctx.encode(prompt, param="prompt"))
        else:
            ctx.check_token_ids(prompt, param="prompt")
            prompt_ids.append(prompt)
    return prompt_ids


def completion_params(request: CompletionRequest) -> SamplingParams:
    return replace(request.sampling_params(request.max_tokens, request.logprobs),
                   prompt_logprobs=request.prompt_logprobs)


class _CompletionReply:
    def __init__(self, ctx: ServingContext, request: CompletionRequest, completion_id: str, created: int,
                 echoes: list[str], first_tokens: list[int]):
        self._ctx = ctx
        self._request = request
        self._id = completion_id
        self._created = created
        self._n = request.n or 1
        self._choices = [CompletionChoice(i, echoes[i // self._n]) for i in range(len(echoes) * self._n)]
        self._first_tokens = first_tokens
        self._last_outputs: dict[int, RequestOutput] = {}

    def _prompt_choices(self, prompt_index: int) -> list[CompletionChoice]:
        return self._choices[prompt_index * self._n : (prompt_index + 1) * self._n]

    def add(self, prompt_index: int, output: RequestOutput) -> list[tuple[CompletionChoice, ChoiceDelta]]:
        """Fold in one engine output; returns each choice it advanced, with its delta."""
        self._last_outputs[prompt_index] = output
        if output.prompt_logprobs is not None:  # comes first, with the prompt's first output
            columns = self._ctx.logprobs.completion(output.prompt_logprobs, 0, self._first_tokens[prompt_index])
            for choice in self._prompt_choices(prompt_index):
                choice.prompt_logprobs = columns
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

    def _all_logprobs(self, choice: CompletionChoice) -> dict | None:
        generated = self._logprobs(choice, choice.logprobs)
        return generated if choice.prompt_logprobs is None else joined_columns(choice.prompt_logprobs, generated)

    def completion(self) -> dict:
        choices = [completion_choice(c.index, c.text, self._all_logprobs(c), c.finish_reason) for c in self._choices]
        return completion(self._id, self._created, self._ctx.model_name, choices, self._usage())

    def _chunk(self, choices: list[dict]) -> str:
        payload = completion(self._id, self._created, self._ctx.model_name, choices, None)
        if self._request.include_usage:
            payload["usage"] = None  # only the last chunk carries usage
        return sse.data_event(payload)

    async def chunks(self, streams: EngineStreams) -> AsyncIterator[str]:
        scored = self._request.prompt_logprobs is not None
        for choice in self._choices:
            if choice.echo and not scored:  # the echoed prompt comes first
                yield self._chunk([completion_choice(choice.index, choice.echo, None, None)])
        async for item in streams.outputs(keepalive=True):
            if item is None:
                yield sse.KEEPALIVE
                continue
            prompt_index, output = item
            advanced = self.add(prompt_index, output)
            if output.prompt_logprobs is not None:  # a scored prompt comes first, with its logprobs
                for choice in self._prompt_choices(prompt_index):
                    yield self._chunk([completion_choice(choice.index, choice.echo, choice.prompt_logprobs, None)])
            for choice, delta in advanced:
                if delta.text or delta.finish_reason is not None:
                    logprobs = self._logprobs(choice, delta.logprobs)
                    yield self._chunk([completion_choice(choice.index, delta.text, logprobs, delta.finish_reason)])
        if self._request.include_usage:
            yield sse.data_event(completion(self._id, self._created, self._ctx.model_name, [], self._usage()))
