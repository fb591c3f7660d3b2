"""The Responses API's shapes: the request model, input items as chat messages, the Response
object, and the builder that grows a Response's output while emitting the stream events that
describe each step (`sequence_number` from 0, every `added` closed by its `done`)."""

import copy
from typing import Any, Literal

from pydantic import Field, model_validator

from server.api.errors import invalid_request, not_supported
from server.api.protocol import RequestModel, random_id
from server.api.reasoning import SplitText
from server.engine.request import SamplingParams


class ContentPart(RequestModel):
    type: Literal["input_text", "output_text", "reasoning_text"]
    text: str


class InputItem(RequestModel):
    """A message (`type` may be left out, as in OpenAI's easy input), or an earlier reasoning item."""

    type: Literal["message", "reasoning"] = "message"
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: str | list[ContentPart] | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])


class TextFormat(RequestModel):
    type: str


class TextConfig(RequestModel):
    format: TextFormat | None = None


class ResponsesRequest(RequestModel):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool | None = False
    store: bool | None = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None  # accepted and ignored, as it only identifies the end user
    # Accepted only as "nothing asked for": each would change the answer in ways not implemented.
    tools: list[Any] | None = None
    tool_choice: Any = None
    text: TextConfig | None = None
    background: bool | None = None

    @model_validator(mode="after")
    def _check_responses(self):
        if self.tools:
            raise not_supported("tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise not_supported("tool_choice")
        if self.text and self.text.format and self.text.format.type != "text":
            raise not_supported("text.format")
        if self.background:
            raise not_supported("background")
        if self.input in ("", []):
            raise invalid_request("'input' must not be empty.", param="input")
        for i, item in enumerate(self.input if isinstance(self.input, list) else []):
            if item.type == "message" and (item.role is None or item.content is None):
                missing = "role" if item.role is None else "content"
                raise invalid_request(f"Missing required parameter: 'input[{i}].{missing}'.", param=f"input[{i}].{missing}")
        return self

    def items(self) -> list[InputItem]:
        return [InputItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p or 1.0,
            max_tokens=self.max_output_tokens,
        )


def chat_messages(items: list[InputItem]) -> list[dict]:
    """Input items as chat-template messages; a reasoning item goes with the assistant turn after it."""
    messages, reasoning = [], None
    for item in items:
        if item.type == "reasoning":
            reasoning = item.text
            continue
        message = {"role": "system" if item.role == "developer" else item.role, "content": item.text}
        if item.role == "assistant" and reasoning is not None:
            message["reasoning_content"], reasoning = reasoning, None
        messages.append(message)
    return messages


def listed_input_items(items: list[InputItem]) -> list[dict]:
    """Input items as `GET /v1/responses/{id}/input_items` lists them."""
    listed = []
    for item in items:
        if item.type == "reasoning":
            listed.append({"id": random_id("rs_"), "type": "reasoning", "summary": [],
                           "content": [{"type": "reasoning_text", "text": item.text}]})
            continue
        part_type = "output_text" if item.role == "assistant" else "input_text"
        listed.append({"id": random_id("msg_"), "type": "message", "role": item.role, "status": "completed",
                       "content": [{"type": part_type, "text": item.text}]})
    return listed


def response_object(request: ResponsesRequest, response_id: str, created_at: int, model: str) -> dict:
    """A Response as it starts: in progress, no output yet."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "model": model,
        "previous_response_id": request.previous_response_id,
        "store": request.store is not False,
        "output": [],
        "parallel_tool_calls": True,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "truncation": "disabled",
        "metadata": request.metadata or {},
        "usage": None,
    }


def response_usage(input_tokens: int, output_tokens: int, reasoning_tokens: int, cached_tokens: int) -> dict:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    }


# How each final status ends a stream; OpenAI has no event for a cancelled response.
_TERMINAL_EVENTS = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "cancelled": "response.incomplete",
    "failed": "response.failed",
}

# (item type, id prefix, content part type, delta/done event prefix) per kind of output item
_ITEM_KINDS = {
    "reasoning": ("reasoning", "rs_", "reasoning_text", "response.reasoning_text"),
    "message": ("message", "msg_", "output_text", "response.output_text"),
}


class ResponseBuilder:
    """Grows `response` from reasoning/content text; every method returns the events for its step
    as (event type, payload) pairs."""

    def __init__(self, response: dict):
        self.response = response
        self._sequence_number = 0
        self._kind: str | None = None  # the open output item's kind
        self._text = ""  # the open item's text so far
        self.message_text = ""
        self.reasoning_text: str | None = None

    def _event(self, event_type: str, **fields: Any) -> tuple[str, dict]:
        payload = {"type": event_type, "sequence_number": self._sequence_number, **fields}
        self._sequence_number += 1
        return event_type, payload

    def _snapshot(self, event_type: str) -> tuple[str, dict]:
        return self._event(event_type, response=copy.deepcopy(self.response))

    def start(self) -> list[tuple[str, dict]]:
        return [self._snapshot("response.created"), self._snapshot("response.in_progress")]

    def add(self, split: SplitText) -> list[tuple[str, dict]]:
        events = []
        for kind, text in (("reasoning", split.reasoning), ("message", split.content)):
            if text:
                events += self._open(kind)
                self._text += text
                events.append(self._event(f"{_ITEM_KINDS[kind][3]}.delta", **self._where(), delta=text,
                                          **self._logprobs_field()))
        return events

    def finish(self, status: str, usage: dict | None, incomplete_details: dict | None = None,
               error: dict | None = None) -> list[tuple[str, dict]]:
        """Close the open item and end the response with `status`; the last event is the terminal one."""
        item_status = "completed" if status == "completed" else "incomplete"
        events = self._close(item_status) if self._kind == "reasoning" else []
        if self._kind is None and status != "failed":
            events += self._open("message")  # a reply that ends while reasoning still gets its (empty) message
        if self._kind is not None:
            events += self._close(item_status)
        self.response.update(status=status, usage=usage, incomplete_details=incomplete_details, error=error)
        return events + [self._snapshot(_TERMINAL_EVENTS[status])]

    def _where(self) -> dict:
        return {"item_id": self.response["output"][-1]["id"], "output_index": len(self.response["output"]) - 1,
                "content_index": 0}

    def _logprobs_field(self) -> dict:
        return {"logprobs": []} if self._kind == "message" else {}

    def _part(self, text: str) -> dict:
        part = {"type": _ITEM_KINDS[self._kind][2], "text": text}
        return part | {"annotations": []} if self._kind == "message" else part

    def _open(self, kind: str) -> list[tuple[str, dict]]:
        if self._kind == kind:
            return []
        events = self._close("completed") if self._kind is not None else []
        item_type, prefix, _, _ = _ITEM_KINDS[kind]
        item = {"id": random_id(prefix), "type": item_type, "status": "in_progress"}
        item |= {"role": "assistant", "content": []} if kind == "message" else {"summary": [], "content": []}
        self.response["output"].append(item)
        self._kind, self._text = kind, ""
        where = self._where()
        events.append(self._event("response.output_item.added", output_index=where["output_index"],
                                  item=copy.deepcopy(item)))
        events.append(self._event("response.content_part.added", **where, part=self._part("")))
        return events

    def _close(self, item_status: str) -> list[tuple[str, dict]]:
        where, part = self._where(), self._part(self._text)
        item = self.response["output"][-1]
        item.update(status=item_status, content=[part])
        if self._kind == "message":
            self.message_text = self._text
        else:
            self.reasoning_text = self._text
        events = [
            self._event(f"{_ITEM_KINDS[self._kind][3]}.done", **where, text=self._text, **self._logprobs_field()),
            self._event("response.content_part.done", **where, part=part),
            self._event("response.output_item.done", output_index=where["output_index"], item=copy.deepcopy(item)),
        ]
        self._kind = None
        return events
