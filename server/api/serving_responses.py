"""The Responses API: `POST /v1/responses` (one object or an event stream), and the stored
responses behind `GET|DELETE /v1/responses/{id}`, `GET …/input_items` and `POST …/cancel`.

A response is stored as `in_progress` once the engine has admitted it and replaced by its final
form before the terminal event is sent, so a client that reads it back after the stream always
sees the finished object. Responses being generated are also tracked here, by id, so that
`cancel` can abort the engine request and answer with the cancelled response; one that another
replica sharing the store is generating is cancelled through the store (response_store.py).
"""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from quart import Response

from server.api import sse
from server.api.engine_stream import EngineStreams
from server.api.errors import APIError, as_api_error, invalid_request
from server.api.protocol import is_ascii_number, parse_request, random_id
from server.api.protocol_chat import ChatChoice
from server.api.protocol_responses import (
    InputTokensRequest,
    ResponseBuilder,
    ResponsesRequest,
    response_object,
    response_usage,
)
from server.api.protocol_responses_items import (
    ContentPart,
    InputItem,
    chat_messages,
    check_call_ids,
    listed_input_items,
)
from server.api.protocol_tools import grammar_params, template_tool_call
from server.api.reasoning import THINK_END, THINK_START
from server.api.response_store import UNFINISHED, ResponseStore, StoredResponse
from server.api.sealed_reasoning import ReasoningSeal
from server.api.serving import ServingContext, json_response, sse_response
from server.api.serving_render import generate_request
from server.engine.request import ChoiceDelta, GenerationRequest, TokenLogprob


def text_logprobs(delta: ChoiceDelta) -> list[TokenLogprob]:
    """The delta's token logprobs less a stop token's (the EOS or a stop token id that ended the
    choice): its text is never shown, so an output_text's logprobs spell out its text. Its entry
    would otherwise go out with the held-back bytes the end of a reply flushes in the same delta."""
    logprobs = delta.logprobs or []
    if delta.finish_reason == "stop" and isinstance(delta.stop_reason, int) and logprobs:
        return logprobs[:-1]
    return logprobs


@dataclass
class _InFlight:
    request_id: str
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    response: dict | None = None


def _not_found(response_id: str, param: str = "response_id") -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param=param)


class ResponsesAPI:
    def __init__(self, ctx: ServingContext, store: ResponseStore, seal: ReasoningSeal):
        self._ctx = ctx
        self._store = store
        self._seal = seal
        self._in_flight: dict[str, _InFlight] = {}
        self._think_ids = (ctx.tokenizer.encode(THINK_START), ctx.tokenizer.encode(THINK_END))

    async def _stored(self, response_id: str) -> StoredResponse:
        stored = await self._store.get(response_id)
        if stored is None:
            raise _not_found(response_id)
        return stored

    async def _history(self, request: ResponsesRequest) -> list[dict]:
        """The conversation so far that `previous_response_id` continues, as chat messages."""
        if request.previous_response_id is None:
            return []
        previous = await self._store.get(request.previous_response_id)
        if previous is None:
            raise _not_found(request.previous_response_id, param="previous_response_id")
        if previous.response["status"] in UNFINISHED:
            raise invalid_request(f"Response '{request.previous_response_id}' is still in progress.",
                                  param="previous_response_id")
        return previous.conversation

    async def _resolved(self, items: list[InputItem]) -> list[InputItem]:
        """The items with references replaced by the stored items and sealed reasoning opened."""
        references = [item.id for item in items if item.type == "item_reference"]
        found = await self._store.find_items(references) if references else {}
        resolved = []
        for i, item in enumerate(items):
            if item.type == "item_reference":
                if item.id not in found:
                    raise invalid_request(f"Item with id '{item.id}' not found (an item_reference names a stored "
                                          "item).", param=f"input[{i}].id")
                item = InputItem.model_validate(found[item.id])
            if item.type == "reasoning" and not item.content and item.encrypted_content:
                reasoning = self._seal.open(item.encrypted_content, f"input[{i}].encrypted_content")
                item = item.model_copy(update={"content": [ContentPart(type="reasoning_text", text=reasoning)]})
            resolved.append(item)
        return resolved

    async def _prompt_ids(self, request: ResponsesRequest, conversation: list[dict]) -> list[int]:
        """The prompt; with `truncation: "auto"`, the oldest messages go (never the instructions, nor
        the last message) until it fits with `max_output_tokens`, as OpenAI documents."""
        instructions = [{"role": "system", "content": request.instructions}] if request.instructions else []

        async def render(messages: list[dict]) -> list[int]:
            return await self._ctx.chat_prompt_ids(instructions + messages, request.enable_thinking, param="input",
                                                   tools=request.template_tools())

        if request.truncation != "auto":
            return await render(conversation)

        async def fitting(dropped: int) -> list[int] | None:
            kept = conversation[dropped:]
            while len(kept) > 1 and kept[0]["role"] == "tool":  # results whose call went
                kept = kept[1:]
            try:
                ids = await render(kept)
            except APIError as err:
                if err.code != "context_length_exceeded":
                    raise
                return None
            return ids if len(ids) + (request.max_output_tokens or 1) <= self._ctx.engine.max_model_len else None

        if (ids := await fitting(0)) is not None:
            return ids
        low, high, best = 1, len(conversation) - 1, None  # the fewest dropped that fit: a binary search
        while low <= high:
            middle = (low + high) // 2
            if (ids := await fitting(middle)) is not None:
                best, high = ids, middle - 1
            else:
                low = middle + 1
        return best if best is not None else await render(conversation[-1:])

    async def _conversation(self, request: ResponsesRequest) -> tuple[list[InputItem], list[dict]]:
        """The request's input items (resolved) and the whole conversation they continue."""
        history = await self._history(request)
        items = await self._resolved(request.items())
        check_call_ids(history, items)
        return items, history + chat_messages(items)

    async def count_input_tokens(self, body: bytes) -> Response:
        """`POST /v1/responses/input_tokens`: the input tokens the same `POST /v1/responses` would take."""
        request = parse_request(InputTokensRequest, body)
        if request.model is not None:
            self._ctx.check_model(request.model)
        _, conversation = await self._conversation(request)
        if not conversation:
            raise invalid_request("Missing required parameter: 'input'.", param="input")
        prompt_ids = await self._prompt_ids(request, conversation)
        return json_response({"object": "response.input_tokens", "input_tokens": len(prompt_ids)})

    async def create(self, body: bytes) -> Response:
        request = parse_request(ResponsesRequest, body)
        self._ctx.check_model(request.model)
        items, conversation = await self._conversation(request)
        prompt_ids = await self._prompt_ids(request, conversation)
        params = request.sampling_params()
        if params.structured_output is not None:
            await self._ctx.compile_structured_output(params.structured_output, "text.format",
                                                      grammar_params(request.offered_tools, params.structured_output))
        response_id = random_id("resp_")
        generation = GenerationRequest(response_id, prompt_ids, params)
        streams = await self._ctx.open_streams([generation], "input")
        seal = self._seal.seal if request.seals_reasoning else None
        builder = ResponseBuilder(response_object(request, response_id, int(time.time()), self._ctx.model_name),
                                  {tool.name: tool for tool in request.offered_tools}, seal)
        flight = self._in_flight[response_id] = _InFlight(response_id)
        try:
            if request.store is not False:
                await self._store.add(builder.response, listed_input_items(items), conversation,
                                      abort=lambda: self._ctx.engine.abort(response_id))
        except BaseException:
            await self._finished(flight, builder, conversation, store=False)
            await streams.close()
            raise
        reply = ChatChoice.offering(0, request.offered_tools, request.chosen_tool, params.structured_output)
        events = self._generate(streams, builder, reply, flight, conversation, store=request.store is not False)
        if request.stream:
            return sse_response(events)
        async with aclosing(events):
            async for _ in events:
                pass
        return json_response(builder.response)

    async def render(self, body: bytes) -> Response:
        """`POST /v1/responses/render` (serving_render.py): stateless, as vLLM's is, so a request that
        continues a stored response is refused; routers send those on without rendering them."""
        request = parse_request(ResponsesRequest, body)
        self._ctx.check_model(request.model)
        if request.previous_response_id is not None:
            raise invalid_request("Rendering is stateless: give the conversation in 'input' instead of "
                                  "'previous_response_id'.", param="previous_response_id")
        prompt_ids = await self._prompt_ids(request, chat_messages(request.items()))
        return json_response(generate_request(self._ctx, random_id("resp_"), prompt_ids, request.sampling_params(),
                                              request.stream, None))

    async def _generate(self, streams: EngineStreams, builder: ResponseBuilder, reply: ChatChoice, flight: _InFlight,
                        conversation: list[dict], store: bool) -> AsyncIterator[str]:
        """The stream's events; the terminal one goes out only once the final response is recorded."""
        token_ids, terminal, prompt_tokens, cached_tokens = [], None, 0, 0

        def usage() -> dict:
            return response_usage(prompt_tokens, len(token_ids), self._reasoning_tokens(token_ids), cached_tokens)

        try:
            for event in builder.start():
                yield sse.named_event(*event)
            async for item in streams.outputs(keepalive=True):
                if item is None:
                    yield sse.KEEPALIVE
                    continue
                output = item[1]
                prompt_tokens, cached_tokens = output.prompt_tokens, output.num_cached_tokens
                for delta in output.choices:
                    token_ids += delta.token_ids
                    logprobs = self._ctx.logprobs.chat(text_logprobs(delta)) if delta.logprobs else None
                    events = builder.add(reply.add(delta), reply.tool_calls, logprobs)
                    if delta.finish_reason is not None:
                        terminal = self._terminal(builder, delta.finish_reason, usage())
                    for event in events:
                        yield sse.named_event(*event)
        except Exception as err:
            error = as_api_error(err)
            terminal = builder.finish("failed", usage(), error={"code": error.code or error.type, "message": error.message})
        finally:
            await streams.close()
            if terminal is None:  # the client went away: nobody waits for this record, so do not wait either
                builder.finish("cancelled", usage())
                asyncio.ensure_future(self._finished(flight, builder, conversation, store))
        await self._finished(flight, builder, conversation, store)
        for event in terminal:
            yield sse.named_event(*event)

    @staticmethod
    def _terminal(builder: ResponseBuilder, finish_reason: str, usage: dict) -> list[tuple[str, dict]]:
        if finish_reason == "length":
            return builder.finish("incomplete", usage, incomplete_details={"reason": "max_output_tokens"})
        return builder.finish("cancelled" if finish_reason == "abort" else "completed", usage)

    def _reasoning_tokens(self, token_ids: list[int]) -> int:
        """Tokens from `<think>` to `</think>` (or to the end when the reply stopped while thinking)."""
        start, end = self._think_ids
        if token_ids[: len(start)] != start:
            return 0
        for i in range(len(start), len(token_ids) - len(end) + 1):
            if token_ids[i : i + len(end)] == end:
                return i + len(end)
        return len(token_ids)

    async def _finished(self, flight: _InFlight, builder: ResponseBuilder, conversation: list[dict],
                        store: bool) -> None:
        if flight.finished.is_set():
            return
        reply = {"role": "assistant", "content": builder.message_text}
        if builder.reasoning_text is not None:
            reply["reasoning_content"] = builder.reasoning_text
        if builder.function_calls:
            reply["tool_calls"] = [  # a custom tool's call keeps its raw input
                template_tool_call(item["call_id"], item["name"], item.get("arguments", item.get("input")),
                                   raw="input" in item) for item in builder.function_calls]
        if store:
            await self._store.update(builder.response, conversation + [reply])
        flight.response = builder.response
        flight.finished.set()
        del self._in_flight[builder.response["id"]]

    async def retrieve(self, response_id: str) -> Response:
        return json_response((await self._stored(response_id)).response)

    async def delete(self, response_id: str) -> Response:
        if not await self._store.delete(response_id):
            raise _not_found(response_id)
        return json_response({"id": response_id, "object": "response.deleted", "deleted": True})

    async def input_items(self, response_id: str, query: dict[str, str]) -> Response:
        items = (await self._stored(response_id)).input_items
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise invalid_request("'order' must be 'asc' or 'desc'.", param="order")
        limit = query.get("limit", "20")
        if not (is_ascii_number(limit) and 1 <= int(limit) <= 100):
            raise invalid_request("'limit' must be an integer from 1 to 100.", param="limit")
        if order == "desc":
            items = items[::-1]
        if "after" in query:
            ids = [item["id"] for item in items]
            if query["after"] not in ids:
                raise invalid_request(f"No input item with id '{query['after']}'.", param="after")
            items = items[ids.index(query["after"]) + 1:]
        page = items[: int(limit)]
        return json_response({
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > len(page),
        })

    async def cancel(self, response_id: str) -> Response:
        flight = self._in_flight.get(response_id)
        if flight is not None:
            self._ctx.engine.abort(flight.request_id)
            await flight.finished.wait()
            return json_response(flight.response)
        stored = await self._stored(response_id)
        status = stored.response["status"]
        if status in UNFINISHED:  # another replica sharing the store is generating it
            stored = await self._store.cancel(response_id)
            if stored is None:
                raise _not_found(response_id)
            return json_response(stored.response)
        if status != "cancelled":
            raise invalid_request(f"Only a response in progress can be cancelled; this one is {status}.",
                                  param="response_id")
        return json_response(stored.response)
