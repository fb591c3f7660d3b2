"""The Responses API's shapes: the request model, the Response object, and the builder that grows
a Response's output while emitting the stream events that describe each step (`sequence_number`
from 0, every `added` closed by its `done`). Tools are in protocol_responses_tools, input items in
protocol_responses_items."""

import copy
from collections.abc import Callable
from functools import cached_property
from typing import Any, Literal

from pydantic import Field, model_validator

from server.api.errors import invalid_request, not_supported, prediction_not_here
from server.api.protocol import RequestModel, random_id
from server.api.protocol_chat import ChoiceUpdate
from server.api.protocol_responses_items import InputItem
from server.api.protocol_responses_tools import (
    ResponsesTool,
    ToolChoice,
    ToolChoiceByName,
    HostedToolChoice,
    check_tool_types,
    chosen_tool,
    offered_tools,
)
from server.api.protocol_tools import (
    NAME_PATTERN,
    OfferedTool,
    check_tool_choice,
    check_unique_names,
    json_output,
    tool_grammar,
)
from server.api.reasoning import ReasoningEffort, thinking_for_effort
from server.api.tool_calls import ToolCallArguments, ToolCallStart
from server.engine.request import SamplingParams, StructuredOutput

OUTPUT_TEXT_LOGPROBS = "message.output_text.logprobs"
ENCRYPTED_REASONING = "reasoning.encrypted_content"


class TextFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, pattern=NAME_PATTERN)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    def echo(self) -> dict:
        return self.model_dump(by_alias=True, exclude_none=True)


class TextConfig(RequestModel):
    format: TextFormat | None = None


class ReasoningConfig(RequestModel):
    effort: ReasoningEffort | None = None  # Qwen3's thinking switch (see server.api.reasoning)
    summary: Literal["auto", "concise", "detailed"] | None = None  # accepted; no summaries are written
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # the deprecated name of `summary`


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
    # Of these, "message.output_text.logprobs" and "reasoning.encrypted_content" add something here.
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ResponsesTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # Accepted only as "nothing asked for": it would change the answer in ways not implemented.
    background: bool | None = None
    conversation: Any = None  # the Conversations API is not implemented
    prompt: Any = None  # nor stored prompt templates
    prediction: Any = None  # chat completions only: refused by name

    @model_validator(mode="before")
    @classmethod
    def _known_tool_types(cls, data: Any) -> Any:
        if isinstance(data, dict):
            check_tool_types(data.get("tools"))
        return data

    @model_validator(mode="after")
    def _check_responses(self):
        check_unique_names(self.offered_tools)
        check_tool_choice(self.chosen_tool, self.offered_tools)
        text_format = self.text.format if self.text else None
        if text_format and text_format.type == "json_schema" and (text_format.json_schema is None or not text_format.name):
            missing = "name" if not text_format.name else "schema"
            raise invalid_request(f"Missing required parameter: 'text.format.{missing}'.", param=f"text.format.{missing}")
        if self.background:
            raise not_supported("background")
        for name in ("conversation", "prompt"):
            if getattr(self, name) is not None:
                raise not_supported(name)
        if self.prediction is not None:
            raise prediction_not_here("/v1/responses")
        if self.input in ("", []):
            raise invalid_request("'input' must not be empty.", param="input")
        for i, item in enumerate(self.input if isinstance(self.input, list) else []):
            item.check(f"input[{i}]")
        return self

    @cached_property
    def offered_tools(self) -> list[OfferedTool]:
        return offered_tools(self.tools or [])

    @cached_property
    def chosen_tool(self) -> str:
        """"none", "auto", "required" or the name of the tool that must be called."""
        return chosen_tool(self.tool_choice, self.offered_tools, bool(self.tools))

    def template_tools(self) -> list[dict] | None:
        if self.chosen_tool == "none":
            return None
        return [tool.template for tool in self.offered_tools] or None

    @cached_property
    def _reply_format(self) -> StructuredOutput | None:
        text_format = self.text.format if self.text else None
        if text_format is None:
            return None
        return json_output(text_format.type, text_format.json_schema, text_format.strict, text_format.name,
                           "text.format.schema")

    def structured_output(self) -> StructuredOutput | None:
        return tool_grammar(self.offered_tools, self.chosen_tool, self.parallel_tool_calls is not False,
                            self._reply_format)

    def items(self) -> list[InputItem]:
        return [InputItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input

    @property
    def enable_thinking(self) -> bool | None:
        return thinking_for_effort(self.reasoning.effort if self.reasoning else None)

    @property
    def seals_reasoning(self) -> bool:
        return ENCRYPTED_REASONING in (self.include or [])

    @property
    def logprobs_count(self) -> int | None:
        """Alternatives per token when the output text's logprobs are asked for, else None."""
        return (self.top_logprobs or 0) if OUTPUT_TEXT_LOGPROBS in (self.include or []) else None

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p or 1.0,
            max_tokens=self.max_output_tokens,
            logprobs=self.logprobs_count,
            structured_output=self.structured_output(),
        )


class InputTokensRequest(ResponsesRequest):
    """`POST /v1/responses/input_tokens`: a would-be request; `model` and `input` may be left out."""

    model: str | None = None
    input: str | list[InputItem] | None = None

    def items(self) -> list[InputItem]:
        return [] if self.input is None else super().items()


def _tool_choice_echo(choice: ToolChoice | None) -> Any:
    if isinstance(choice, (ToolChoiceByName, HostedToolChoice)):
        return choice.model_dump()
    return choice or "auto"


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
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "text": {"format": request.text.format.echo() if request.text and request.text.format else {"type": "text"}},
        "tool_choice": _tool_choice_echo(request.tool_choice),
        "tools": [tool.echo() for tool in request.tools or []],
        "truncation": request.truncation or "disabled",
        "reasoning": {"effort": request.reasoning.effort if request.reasoning else None,
                      "summary": (request.reasoning.summary or request.reasoning.generate_summary)
                      if request.reasoning else None},
        "metadata": request.metadata or {},
        "top_logprobs": request.top_logprobs,
        "usage": None,
    }


def response_usage(input_tokens: int, output_tokens: int, reasoning_tokens: int, cached_tokens: int) -> dict:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cache_write_tokens": 0, "cached_tokens": cached_tokens},
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
    """Grows `response` from reasoning, content and tool calls; every method returns the events
    for its step as (event type, payload) pairs. `tools` are the offered tools by name (a custom
    tool's call is a `custom_tool_call` item, a namespaced function's call names its namespace);
    `seal` gives a reasoning item its `encrypted_content`, when the client asked for it."""

    def __init__(self, response: dict, tools: dict[str, OfferedTool] | None = None,
                 seal: Callable[[str], str] | None = None):
        self.response = response
        self._tools = tools or {}
        self._seal = seal
        self._sequence_number = 0
        self._kind: str | None = None  # the open output item's kind
        self._text = ""  # the open item's text (a function call's arguments) so far
        self.message_text = ""
        self.reasoning_text: str | None = None
        self.function_calls: list[dict] = []  # the function_call and custom_tool_call items, as they end
        self._logprobs: list[dict] = []  # the open message's token logprobs, when asked for
        self._unsent_logprobs: list[dict] = []  # of tokens whose text has not come out yet

    def _event(self, event_type: str, **fields: Any) -> tuple[str, dict]:
        payload = {"type": event_type, "sequence_number": self._sequence_number, **fields}
        self._sequence_number += 1
        return event_type, payload

    def _snapshot(self, event_type: str) -> tuple[str, dict]:
        return self._event(event_type, response=copy.deepcopy(self.response))

    def start(self) -> list[tuple[str, dict]]:
        return [self._snapshot("response.created"), self._snapshot("response.in_progress")]

    def add(self, update: ChoiceUpdate, calls: list[dict], logprobs: list[dict] | None = None) -> list[tuple[str, dict]]:
        """The events of one update; `calls` are the reply's tool calls so far (chat's shape).
        `logprobs`: entries of the tokens behind the update; they go with the message's text only (a
        token's text can come out a step after it), as OpenAI shows none for reasoning or calls."""
        self._unsent_logprobs += logprobs or []
        if update.reasoning and not any(isinstance(event, str) and event for event in update.events):
            self._unsent_logprobs = []
        events = self._add_text("reasoning", update.reasoning)
        for event in update.events:
            if isinstance(event, str):
                events += self._add_text("message", event)
                continue
            self._unsent_logprobs = []
            if isinstance(event, ToolCallStart):
                events += self._open_call(calls[event.index]["id"], event.name)
            elif isinstance(event, ToolCallArguments):
                self._text += event.delta
                events.append(self._event(f"{self._call_event_prefix()}.delta", **self._where(call=True),
                                          delta=event.delta))
        return events

    def _add_text(self, kind: str, text: str) -> list[tuple[str, dict]]:
        if not text:
            return []
        events = self._open(kind)
        self._text += text
        delta_logprobs = []
        if kind == "message":
            delta_logprobs, self._unsent_logprobs = self._unsent_logprobs, []
            self._logprobs += delta_logprobs
        events.append(self._event(f"{_ITEM_KINDS[kind][3]}.delta", **self._where(), delta=text,
                                  **self._logprobs_field(delta_logprobs)))
        return events

    def _call_event_prefix(self) -> str:
        if self._kind == "custom_tool_call":
            return "response.custom_tool_call_input"
        return "response.function_call_arguments"

    def _open_call(self, call_id: str, name: str) -> list[tuple[str, dict]]:
        events = self._close("completed") if self._kind is not None else []
        tool = self._tools.get(name)
        if tool is not None and tool.custom:
            item = {"id": random_id("ctc_"), "type": "custom_tool_call", "status": "in_progress", "input": "",
                    "call_id": call_id, "name": name}
        else:
            item = {"id": random_id("fc_"), "type": "function_call", "status": "in_progress", "arguments": "",
                    "call_id": call_id, "name": name}
        if tool is not None and tool.namespace is not None:
            item["namespace"] = tool.namespace
        self.response["output"].append(item)
        self._kind, self._text = item["type"], ""
        events.append(self._event("response.output_item.added", output_index=len(self.response["output"]) - 1,
                                  item=copy.deepcopy(item)))
        return events

    def finish(self, status: str, usage: dict | None, incomplete_details: dict | None = None,
               error: dict | None = None) -> list[tuple[str, dict]]:
        """Close the open item and end the response with `status`; the last event is the terminal one."""
        item_status = "completed" if status == "completed" else "incomplete"
        events = self._close(item_status) if self._kind == "reasoning" else []
        if self._kind is None and status != "failed" and not self.function_calls:
            events += self._open("message")  # a reply that ends while reasoning still gets its (empty) message
        if self._kind is not None:
            events += self._close(item_status)
        self.response.update(status=status, usage=usage, incomplete_details=incomplete_details, error=error)
        return events + [self._snapshot(_TERMINAL_EVENTS[status])]

    def _where(self, call: bool = False) -> dict:
        where = {"item_id": self.response["output"][-1]["id"], "output_index": len(self.response["output"]) - 1}
        return where if call else where | {"content_index": 0}

    def _logprobs_field(self, logprobs: list[dict]) -> dict:
        return {"logprobs": logprobs} if self._kind == "message" else {}

    def _part(self, text: str, logprobs: list[dict]) -> dict:
        part = {"type": _ITEM_KINDS[self._kind][2], "text": text}
        return part | {"annotations": [], "logprobs": logprobs} if self._kind == "message" else part

    def _open(self, kind: str) -> list[tuple[str, dict]]:
        if self._kind == kind:
            return []
        events = self._close("completed") if self._kind is not None else []
        item_type, prefix, _, _ = _ITEM_KINDS[kind]
        item = {"id": random_id(prefix), "type": item_type, "status": "in_progress"}
        item |= {"role": "assistant", "content": []} if kind == "message" else {"summary": [], "content": []}
        self.response["output"].append(item)
        self._kind, self._text, self._logprobs = kind, "", []
        where = self._where()
        events.append(self._event("response.output_item.added", output_index=where["output_index"],
                                  item=copy.deepcopy(item)))
        events.append(self._event("response.content_part.added", **where, part=self._part("", [])))
        return events

    def _close(self, item_status: str) -> list[tuple[str, dict]]:
        item = self.response["output"][-1]
        if self._kind in ("function_call", "custom_tool_call"):
            return self._close_call(item, item_status)
        where, part = self._where(), self._part(self._text, self._logprobs)
        item.update(status=item_status, content=[part])
        if self._kind == "message":
            self.message_text += self._text
        else:
            self.reasoning_text = self._text
            if self._seal is not None:
                item["encrypted_content"] = self._seal(self._text)
        events = [
            self._event(f"{_ITEM_KINDS[self._kind][3]}.done", **where, text=self._text,
                        **self._logprobs_field(self._logprobs)),
            self._event("response.content_part.done", **where, part=part),
            self._event("response.output_item.done", output_index=where["output_index"], item=copy.deepcopy(item)),
        ]
        self._kind = None
        return events

    def _close_call(self, item: dict, item_status: str) -> list[tuple[str, dict]]:
        field = "input" if self._kind == "custom_tool_call" else "arguments"
        item.update({"status": item_status, field: self._text})
        self.function_calls.append(item)
        where = self._where(call=True)
        done = self._event(f"{self._call_event_prefix()}.done", **where, **{field: self._text})
        self._kind = None
        return [
            done,
            self._event("response.output_item.done", output_index=where["output_index"], item=copy.deepcopy(item)),
        ]
