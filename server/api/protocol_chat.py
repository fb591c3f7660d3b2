"""`POST /v1/chat/completions`: the request model and the objects and chunks it answers with."""

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Literal

from pydantic import Field, model_validator

from server.api.errors import invalid_request, not_supported
from server.api.protocol import RequestModel, SamplingRequest, random_id
from server.api.protocol_tools import (
    NAME_PATTERN,
    FunctionDefinition,
    OfferedTool,
    check_tool_choice,
    check_unique_names,
    json_output,
    named,
    template_tool_call,
    tool_grammar,
)
from server.api.reasoning import ReasoningEffort, ReasoningSplitter, thinking_for_effort
from server.api.tool_calls import Event, ToolCallArguments, ToolCallParser, ToolCallStart
from server.engine.request import ChoiceDelta, SamplingParams, StructuredOutput, TokenLogprob


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class PredictionContent(RequestModel):
    """Predicted Outputs: the reply the client expects (e.g. the file it asks to have edited)."""

    type: Literal["content"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class CalledFunction(RequestModel):
    name: str
    arguments: str


class MessageToolCall(RequestModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None  # an earlier assistant turn's reasoning, for the template
    tool_calls: list[MessageToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def template_message(self) -> dict:
        """The message as the chat template takes it: text parts joined, `developer` as `system`."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            message["tool_calls"] = [template_tool_call(c.id, c.function.name, c.function.arguments)
                                     for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatTool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class ChosenFunction(RequestModel):
    name: str = Field(pattern=NAME_PATTERN)


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: ChosenFunction


class JSONSchemaFormat(RequestModel):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatTemplateKwargs(RequestModel):
    enable_thinking: bool | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: ChatTemplateKwargs | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    reasoning_effort: ReasoningEffort | None = None  # Qwen3's thinking switch (see server.api.reasoning)
    prediction: PredictionContent | None = None  # proposed as draft tokens (speculative decoding)
    # Stored chat completions (OpenAI's `store: true`) are not kept here: refused by name.
    store: bool | None = None
    # The deprecated forms of tools: refused by name rather than ignored.
    functions: list[Any] | None = None
    function_call: Any = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid_request("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
        for name in ("functions", "function_call"):
            if getattr(self, name):
                raise not_supported(name)
        if self.store:
            raise invalid_request("'store' is not supported by this server: chat completions are not stored (the "
                                  "Responses API stores responses).", param="store")
        check_unique_names(self.offered_tools)
        check_tool_choice(self.chosen_tool, self.offered_tools)
        if self.response_format and self.response_format.type == "json_schema" and (
                self.response_format.json_schema is None or self.response_format.json_schema.json_schema is None):
            raise invalid_request("Missing required parameter: 'response_format.json_schema.schema'.",
                                  param="response_format.json_schema.schema")
        for i, message in enumerate(self.messages):
            if message.tool_calls and message.role != "assistant":
                raise invalid_request(f"Only assistant messages can have 'tool_calls' (messages[{i}] is "
                                      f"{message.role}).", param=f"messages[{i}].tool_calls")
            if message.role == "tool" and message.tool_call_id is None:
                raise invalid_request(f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                                      param=f"messages[{i}].tool_call_id")
            if message.content is None and message.role != "assistant":
                raise invalid_request(f"Missing required parameter: 'messages[{i}].content'.",
                                      param=f"messages[{i}].content")
        return self

    @cached_property
    def offered_tools(self) -> list[OfferedTool]:
        return [tool.function.offered(f"tools[{i}].function") for i, tool in enumerate(self.tools or [])]

    @property
    def chosen_tool(self) -> str:
        """"none", "auto", "required" or the name of the function that must be called."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return named(self.tool_choice.function.name)
        return self.tool_choice or ("auto" if self.tools else "none")

    def template_tools(self) -> list[dict] | None:
        """The tools the chat template offers the model: none under tool_choice "none"."""
        if self.chosen_tool == "none":
            return None
        return [tool.template for tool in self.offered_tools]

    @cached_property
    def _reply_format(self) -> StructuredOutput | None:
        if self.response_format is None:
            return None
        schema = self.response_format.json_schema
        return json_output(self.response_format.type, schema.json_schema if schema else None,
                           schema.strict if schema else None, schema.name if schema else None,
                           "response_format.json_schema.schema")

    def structured_output(self) -> StructuredOutput | None:
        return tool_grammar(self.offered_tools, self.chosen_tool, self.parallel_tool_calls is not False,
                            self._reply_format)

    def chat_sampling_params(self) -> SamplingParams:
        params = self.sampling_params(self.max_new_tokens, self.logprobs_count)
        return replace(params, structured_output=self.structured_output())

    def new_choice(self, index: int) -> "ChatChoice":
        return ChatChoice.offering(index, self.offered_tools, self.chosen_tool, self.structured_output())

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def enable_thinking(self) -> bool | None:
        """`chat_template_kwargs.enable_thinking` if given, else what `reasoning_effort` says."""
        if self.chat_template_kwargs and self.chat_template_kwargs.enable_thinking is not None:
            return self.chat_template_kwargs.enable_thinking
        return thinking_for_effort(self.reasoning_effort)

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


@dataclass
class ChoiceUpdate:
    """What one engine delta added to a choice: reasoning, then content (strings) and tool call
    events in the order they came."""

    reasoning: str = ""
    events: list[Event] = field(default_factory=list)


class ChatChoice:
    """One choice as its deltas arrive: reasoning, content and tool calls split apart, logprobs gathered.

    With tools on offer (`names`; `raw_names` those whose input is raw text), the answer's
    `<tool_call>` blocks become calls; `live` when a grammar writes them (see `server.api.tool_calls`)."""

    def __init__(self, index: int, names: set[str] | None = None, live: bool = False,
                 raw_names: frozenset[str] = frozenset()):
        self.index = index
        self.reasoning = ""
        self.content = ""
        self.tool_calls: list[dict] = []  # OpenAI's shape: {"id", "type", "function": {"name", "arguments"}}
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self._splitter = ReasoningSplitter()
        self._tool_parser = ToolCallParser(names, live, raw_names) if names else None
        self.forced_calls = False  # a grammar allows only calls: the reply has no content
        self._logprobs_sent = 0

    @classmethod
    def offering(cls, index: int, tools: list[OfferedTool], chosen_tool: str,
                 structured: StructuredOutput | None) -> "ChatChoice":
        """A choice of a request that offers `tools` (tool_choice `chosen_tool`)."""
        offered = tools if chosen_tool != "none" else []
        live = structured is not None and structured.kind == "tool_calls"
        choice = cls(index, {t.name for t in offered}, live, frozenset(t.name for t in offered if t.custom))
        choice.forced_calls = live and structured.or_reply is None
        return choice

    def add(self, delta: ChoiceDelta) -> ChoiceUpdate:
        """What `delta` adds to the visible reasoning, content and tool calls."""
        split = self._splitter.feed(delta.text)
        reasoning, content = split.reasoning, split.content
        if delta.finish_reason is not None:
            rest = self._splitter.finish()
            reasoning, content = reasoning + rest.reasoning, content + rest.content
        events: list[Event] = [content] if content else []
        if self._tool_parser is not None:
            events = self._tool_parser.feed(content)
            if delta.finish_reason is not None:
                events += self._tool_parser.finish()
        self.reasoning += reasoning
        for event in events:
            if isinstance(event, str):
                self.content += event
            elif isinstance(event, ToolCallStart):
                self.tool_calls.append({"id": random_id("call_"), "type": "function",
                                        "function": {"name": event.name, "arguments": ""}})
            else:
                self.tool_calls[event.index]["function"]["arguments"] += event.delta
        if delta.finish_reason is not None:  # as OpenAI: a reply that ends calling tools says so
            called = self.tool_calls and delta.finish_reason == "stop"
            self.finish_reason = "tool_calls" if called else delta.finish_reason
        self.logprobs += delta.logprobs or []
        return ChoiceUpdate(reasoning, events)

    def unsent_logprobs(self) -> list[TokenLogprob]:
        """Logprobs not yet attached to a chunk (a token's text can arrive after its logprob)."""
        unsent = self.logprobs[self._logprobs_sent:]
        self._logprobs_sent = len(self.logprobs)
        return unsent

    @property
    def has_reasoning(self) -> bool:
        return self._splitter.has_reasoning


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int,
          prediction_tokens: tuple[int, int] | None = None) -> dict:
    """Chat and completions usage; `cached_tokens`: prompt tokens whose KV came from the prefix cache;
    `prediction_tokens`: with a prediction, its tokens accepted and rejected (verified and dropped)."""
    out = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
    if prediction_tokens is not None:
        accepted, rejected = prediction_tokens
        out["completion_tokens_details"] = {"accepted_prediction_tokens": accepted,
                                            "rejected_prediction_tokens": rejected}
    return out


def chat_completion(completion_id: str, created: int, model: str, choices: list[dict], usage: dict) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage}


def message_choice(choice: ChatChoice, logprobs: list[dict] | None) -> dict:
    reasoning = choice.reasoning if choice.has_reasoning else None
    content = None if choice.tool_calls and not choice.content else choice.content
    message = {"role": "assistant", "content": content, "reasoning_content": reasoning, "reasoning": reasoning}
    if choice.tool_calls:
        message["tool_calls"] = choice.tool_calls
    return {"index": choice.index, "message": message, "logprobs": _logprobs(logprobs),
            "finish_reason": choice.finish_reason}


def delta_payloads(choice: ChatChoice, update: ChoiceUpdate) -> list[dict]:
    """The chunk deltas of one update, in order: reasoning, then runs of content and tool call
    pieces (a call's first piece carries its id and name, later ones arguments)."""
    deltas = []
    if update.reasoning:
        deltas.append({"reasoning_content": update.reasoning, "reasoning": update.reasoning})
    for event in update.events:
        if isinstance(event, str):
            if deltas and "content" in deltas[-1]:
                deltas[-1]["content"] += event
            else:
                deltas.append({"content": event})
        elif isinstance(event, ToolCallStart):
            call = choice.tool_calls[event.index]
            deltas.append({"tool_calls": [{"index": event.index, "id": call["id"], "type": "function",
                                           "function": {"name": event.name, "arguments": ""}}]})
        elif isinstance(event, ToolCallArguments):
            deltas.append({"tool_calls": [{"index": event.index, "function": {"arguments": event.delta}}]})
    return deltas


def chunk(completion_id: str, created: int, model: str, choices: list[dict], include_usage: bool) -> dict:
    payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": choices}
    if include_usage:
        payload["usage"] = None  # only the last chunk carries usage
    return payload


def chunk_choice(index: int, delta: dict, logprobs: list[dict] | None = None, finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": _logprobs(logprobs), "finish_reason": finish_reason}


def _logprobs(entries: list[dict] | None) -> dict | None:
    return None if entries is None else {"content": entries, "refusal": None}
