"""The render endpoints, as vLLM names and shapes them: a request's prompt token ids and sampling
parameters, worked out as the generating endpoint would and nothing generated.

Routers route by them: vllm-router's cache-aware policy posts each chat, completions or Responses
request it routes to `/v1/chat/completions/render`, `/v1/completions/render` or
`/v1/responses/render` on every replica, and sends it where the token ids share the longest prefix
with what that replica was sent before (without these it falls back on `/tokenize`, then on text).

The answer is vLLM's `GenerateRequest` (a list of them for completions, one per prompt):
`{request_id, token_ids, features, sampling_params, model, stream, stream_options, cache_salt,
priority, kv_transfer_params}`, with vLLM's names in `sampling_params` for what nanoserve's sampling
parameters hold, `max_tokens` resolved against the context as vLLM resolves it. A grammar that
nanoserve makes for forced tool calls has no vLLM form and is left out of `structured_outputs`.
"""

import json

from quart import Response

from server.api.protocol import parse_request, random_id
from server.api.protocol_chat import ChatCompletionRequest
from server.api.protocol_completions import CompletionRequest
from server.api.serving import ServingContext, json_response
from server.api.serving_chat import chat_prompt
from server.api.serving_completions import completion_params, completion_prompts
from server.engine.request import SamplingParams, StructuredOutput


def _structured_outputs(constraint: StructuredOutput | None) -> dict | None:
    if constraint is None or constraint.kind == "tool_calls":
        return None
    if constraint.kind == "json_object":
        return {"json_object": True}
    return {"json": json.loads(constraint.json_schema)}


def vllm_sampling_params(params: SamplingParams, prompt_tokens: int, max_model_len: int) -> dict:
    return {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "seed": params.seed,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty,
        "logit_bias": params.logit_bias or None,
        "max_tokens": max_model_len - prompt_tokens if params.max_tokens is None else params.max_tokens,
        "min_tokens": params.min_tokens,
        "ignore_eos": params.ignore_eos,
        "stop": params.stop,
        "stop_token_ids": params.stop_token_ids,
        "logprobs": params.logprobs,
        "prompt_logprobs": params.prompt_logprobs,
        "skip_special_tokens": params.skip_special_tokens,
        "structured_outputs": _structured_outputs(params.structured_output),
    }


def generate_request(ctx: ServingContext, request_id: str, token_ids: list[int], params: SamplingParams,
                     stream: bool | None, stream_options: dict | None) -> dict:
    return {
        "request_id": request_id,
        "token_ids": token_ids,
        "features": None,
        "sampling_params": vllm_sampling_params(params, len(token_ids), ctx.engine.max_model_len),
        "model": ctx.model_name,
        "stream": bool(stream),
        "stream_options": stream_options if stream else None,
        "cache_salt": None,
        "priority": 0,
        "kv_transfer_params": None,
    }


async def render_chat_completion(ctx: ServingContext, body: bytes) -> Response:
    request = parse_request(ChatCompletionRequest, body)
    ctx.check_model(request.model)
    token_ids = await chat_prompt(ctx, request)
    options = request.stream_options.model_dump() if request.stream_options else None
    return json_response(generate_request(ctx, random_id("chatcmpl-"), token_ids, request.chat_sampling_params(),
                                          request.stream, options))


async def render_completion(ctx: ServingContext, body: bytes) -> Response:
    request = parse_request(CompletionRequest, body)
    ctx.check_model(request.model)
    params = completion_params(request)
    options = request.stream_options.model_dump() if request.stream_options else None
    return json_response([generate_request(ctx, random_id("cmpl-"), token_ids, params, request.stream, options)
                          for token_ids in await completion_prompts(ctx, request)])
