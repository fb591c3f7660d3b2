"""`POST /v1/completions`: the request model and the objects and chunks it answers with."""

from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from server.api.errors import invalid_request, not_supported, prediction_not_here
from server.api.protocol import SamplingRequest
from server.engine.request import ChoiceDelta, TokenLogprob


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # 0 (with echo): score the prompt, generate nothing
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=5)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    prediction: Any = None  # chat completions only: refused by name

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _one_of_the_prompt_forms(cls, value, handler):
        try:
            return handler(value)
        except ValidationError:  # one message instead of one per union member
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of lists of "
                             "token ids") from None

    @model_validator(mode="after")
    def _check_completion(self):
        if isinstance(self.prompt, list) and (not self.prompt or any(p in ("", []) for p in self.prompt)):
            raise invalid_request("'prompt' must not be empty.", param="prompt")
        if self.suffix:
            raise not_supported("suffix")
        if self.prediction is not None:
            raise prediction_not_here("/v1/completions")
        if self.best_of is not None and self.best_of > (self.n or 1):
            raise not_supported("best_of")
        if self.max_tokens == 0 and not self.echo:
            raise invalid_request("'max_tokens' may be 0 only with 'echo' (to score the prompt).", param="max_tokens")
        return self

    @property
    def prompt_logprobs(self) -> int | None:
        """With echo, the echoed prompt's tokens get logprobs too (the first one's is null)."""
        return self.logprobs if self.echo else None

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """One entry per prompt: text, or token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return self.prompt


class CompletionChoice:
    """One choice as its deltas arrive."""

    def __init__(self, index: int, echo: str):
        self.index = index
        self.echo = echo
        self.text = echo
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: dict | None = None  # the echoed prompt's legacy columns
        self.finish_reason: str | None = None
        self.text_offset = len(echo)  # where the next token's text starts, for legacy logprobs

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.logprobs += delta.logprobs or []
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason


def completion(completion_id: str, created: int, model: str, choices: list[dict], usage: dict | None) -> dict:
    payload = {"id": completion_id, "object": "text_completion", "created": created, "model": model,
               "choices": choices}
    return payload if usage is None else payload | {"usage": usage}


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def joined_columns(first: dict, second: dict) -> dict:
    """Two runs of legacy logprob columns as one."""
    return {name: first[name] + second[name] for name in first}
