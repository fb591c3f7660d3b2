"""`POST /v1/chat/completions`: the request model and the objects and chunks it answers with."""

from typing import Any, Literal

from pydantic import Field, model_validator

from server.api.errors import invalid_request, not_supported
from server.api.protocol import RequestModel, SamplingRequest
from server.api.reasoning import ReasoningSplitter, SplitText
from server.engine.request import ChoiceDelta, TokenLogprob


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None  # an earlier assistant turn's reasoning, for the template
    tool_calls: list[Any] | None = None

    def template_message(self) -> dict:
        """The message as the chat template takes it: text parts joined, `developer` as `system`."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.reasoning_content is not None:
            message["reasoning_content"] = self.reasoning_content
        return message


class ChatTemplateKwargs(RequestModel):
    enable_thinking: bool | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: ChatTemplateKwargs | None = None
    # Accepted only as "nothing asked for": each would change the answer in ways not implemented.
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    function_call: Any = None
    response_format: Any = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise invalid_request("'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs")
        for name in ("tools", "functions", "function_call"):
            if getattr(self, name):
                raise not_supported(name)
        if self.tool_choice not in (None, "none", "auto"):
            raise not_supported("tool_choice")
        if self.response_format not in (None, {"type": "text"}):
            raise not_supported("response_format")
        for i, message in enumerate(self.messages):
            if message.tool_calls:
                raise not_supported(f"messages[{i}].tool_calls")
            if message.content is None and message.role != "assistant":
                raise invalid_request(f"Missing required parameter: 'messages[{i}].content'.",
                                      param=f"messages[{i}].content")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def enable_thinking(self) -> bool | None:
        return self.chat_template_kwargs.enable_thinking if self.chat_template_kwargs else None

    @property
    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ChatChoice:
    """One choice as its deltas arrive: reasoning and content split apart, logprobs gathered."""

    def __init__(self, index: int):
        self.index = index
        self.reasoning = ""
        self.content = ""
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self._splitter = ReasoningSplitter()
        self._logprobs_sent = 0

    def add(self, delta: ChoiceDelta) -> SplitText:
        """What `delta` adds to the visible reasoning and content."""
        split = self._splitter.feed(delta.text)
        if delta.finish_reason is not None:
            rest = self._splitter.finish()
            split = SplitText(split.reasoning + rest.reasoning, split.content + rest.content)
            self.finish_reason = delta.finish_reason
        self.reasoning += split.reasoning
        self.content += split.content
        self.logprobs += delta.logprobs or []
        return split

    def unsent_logprobs(self) -> list[TokenLogprob]:
        """Logprobs not yet attached to a chunk (a token's text can arrive after its logprob)."""
        unsent = self.logprobs[self._logprobs_sent:]
        self._logprobs_sent = len(self.logprobs)
        return unsent

    @property
    def has_reasoning(self) -> bool:
        return self._splitter.has_reasoning


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """Chat and completions usage; `cached_tokens`: prompt tokens whose KV came from the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_completion(completion_id: str, created: int, model: str, choices: list[dict], usage: dict) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage}


def message_choice(choice: ChatChoice, logprobs: list[dict] | None) -> dict:
    reasoning = choice.reasoning if choice.has_reasoning else None
    message = {"role": "assistant", "content": choice.content, "reasoning_content": reasoning, "reasoning": reasoning}
    return {"index": choice.index, "message": message, "logprobs": _logprobs(logprobs),
            "finish_reason": choice.finish_reason}


def delta_payload(split: SplitText) -> dict:
    delta = {}
    if split.reasoning:
        delta["reasoning_content"] = delta["reasoning"] = split.reasoning
    if split.content:
        delta["content"] = split.content
    return delta


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
