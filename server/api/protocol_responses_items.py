"""Responses input items as OpenAI accepts them, and as chat-template messages.

An item may come back as the client got it (with its `id` and `status`, which are ignored), as a
reference to a stored item (`{"type": "item_reference", "id": …}`, or an `id` alone), or rebuilt
by hand. A function's output is a string or a list of content parts (text parts are joined; image
and file parts are refused by name). A reasoning item's text is its `content`, else what its
`encrypted_content` holds (see server.api.sealed_reasoning); one with neither adds nothing.
"""

from typing import Any, Literal

from pydantic import model_validator

from server.api.errors import invalid_request
from server.api.protocol import RequestModel, random_id
from server.api.protocol_tools import template_tool_call

CALL_TYPES = {"function_call_output": "function_call", "custom_tool_call_output": "custom_tool_call"}


class ContentPart(RequestModel):
    type: Literal["input_text", "output_text", "reasoning_text", "summary_text", "refusal"]
    text: str | None = None
    refusal: str | None = None  # a refusal part's text


class OutputPart(RequestModel):
    """A part of a function's output."""

    type: Literal["input_text", "input_image", "input_file"]
    text: str | None = None


class InputItem(RequestModel):
    """A message (`type` may be left out, as in OpenAI's easy input), an earlier reasoning item, an
    earlier function or custom tool call, the output the client's tool gave for it, or a reference
    to a stored item."""

    type: Literal["message", "reasoning", "function_call", "function_call_output", "custom_tool_call",
                  "custom_tool_call_output", "item_reference"] = "message"
    id: str | None = None
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: str | list[ContentPart] | None = None
    call_id: str | None = None  # the calls and their outputs
    name: str | None = None  # the calls
    namespace: str | None = None  # a function_call of a namespaced function
    arguments: str | None = None  # function_call
    input: str | None = None  # custom_tool_call
    output: str | list[OutputPart] | None = None  # the outputs
    encrypted_content: str | None = None  # reasoning

    @model_validator(mode="before")
    @classmethod
    def _reference_without_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and "type" not in data and "role" not in data and "id" in data:
            return data | {"type": "item_reference"}
        return data

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or part.refusal or "" for part in self.content or [])

    @property
    def output_text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text or "" for p in self.output or [])

    def missing(self) -> str | None:
        """The first required field this item lacks."""
        required = {"message": ("role", "content"), "reasoning": (), "function_call": ("call_id", "name", "arguments"),
                    "function_call_output": ("call_id", "output"), "custom_tool_call": ("call_id", "name", "input"),
                    "custom_tool_call_output": ("call_id", "output"), "item_reference": ("id",)}[self.type]
        return next((name for name in required if getattr(self, name) is None), None)

    def check(self, param: str) -> None:
        """400 for a required field left out, or an output part this server cannot show the model."""
        if (missing := self.missing()) is not None:
            raise invalid_request(f"Missing required parameter: '{param}.{missing}'.", param=f"{param}.{missing}")
        for j, part in enumerate(self.output if isinstance(self.output, list) else []):
            if part.type != "input_text":
                raise invalid_request(f"Invalid '{param}.output[{j}].type': '{part.type}' parts are not supported "
                                      "by this server (text only).", param=f"{param}.output[{j}].type")


def check_call_ids(history: list[dict], items: list[InputItem]) -> None:
    """Every tool output answers a call made earlier in the conversation, as OpenAI requires."""
    calls = {call["id"] for message in history for call in message.get("tool_calls") or []}
    for item in items:
        if item.type in CALL_TYPES.values():
            calls.add(item.call_id)
        elif item.type in CALL_TYPES and item.call_id not in calls:
            kind = "function call" if item.type == "function_call_output" else "custom tool call"
            raise invalid_request(f"No tool call found for {kind} output with call_id {item.call_id}.", param="input")


def chat_messages(items: list[InputItem]) -> list[dict]:
    """Input items as chat-template messages: a reasoning item goes with the assistant turn after
    it, calls join the assistant turn before them (or make one), and each tool's output becomes a
    tool message."""
    messages, reasoning = [], None
    for item in items:
        if item.type == "reasoning":
            reasoning = item.text if item.content else None
            continue
        if item.type in CALL_TYPES:
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output_text})
            continue
        if item.type in CALL_TYPES.values():
            if not messages or messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": ""})
            custom = item.type == "custom_tool_call"
            call = template_tool_call(item.call_id, item.name, item.input if custom else item.arguments, raw=custom)
            messages[-1].setdefault("tool_calls", []).append(call)
            message = messages[-1]
        else:
            message = {"role": "system" if item.role == "developer" else item.role, "content": item.text}
            messages.append(message)
        if message["role"] == "assistant" and reasoning is not None:
            message["reasoning_content"], reasoning = reasoning, None
    return messages


def listed_input_items(items: list[InputItem]) -> list[dict]:
    """Input items as `GET /v1/responses/{id}/input_items` lists them (an item keeps the id it came with)."""
    listed = []
    for item in items:
        if item.type == "reasoning":
            listed.append({"id": item.id or random_id("rs_"), "type": "reasoning", "summary": [],
                           "content": [{"type": "reasoning_text", "text": item.text}]})
        elif item.type == "function_call":
            listed.append({"id": item.id or random_id("fc_"), "type": "function_call", "call_id": item.call_id,
                           "name": item.name, "arguments": item.arguments, "status": "completed"}
                          | ({"namespace": item.namespace} if item.namespace else {}))
        elif item.type == "custom_tool_call":
            listed.append({"id": item.id or random_id("ctc_"), "type": "custom_tool_call", "call_id": item.call_id,
                           "name": item.name, "input": item.input, "status": "completed"})
        elif item.type in CALL_TYPES:
            prefix = "fco_" if item.type == "function_call_output" else "ctco_"
            listed.append({"id": item.id or random_id(prefix), "type": item.type, "call_id": item.call_id,
                           "output": item.output_text, "status": "completed"})
        else:
            part_type = "output_text" if item.role == "assistant" else "input_text"
            listed.append({"id": item.id or random_id("msg_"), "type": "message", "role": item.role,
                           "status": "completed", "content": [{"type": part_type, "text": item.text}]})
    return listed
