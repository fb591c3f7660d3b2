"""What chat, completions and responses requests share: strict JSON parsing with 400s that name
the field, the sampling fields and their mapping to the engine's `SamplingParams`, and ids.

Models are strict (a string is not a number, `1` is not `true`) because OpenAI rejects such
bodies too; unknown fields are ignored, except the ones each endpoint rejects by name because
they would change the answer in ways this server does not implement.
"""

import json
import math
import re
import uuid
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from server.api.errors import APIError, invalid_request
from server.engine.request import SamplingParams

# Union members and dict keys show up in pydantic's error locations; a `param` names fields only.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class RequestModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(RequestModel):
    include_usage: bool | None = False


class SamplingRequest(RequestModel):
    """Fields that chat and completions requests share; `None` (JSON null) means the default, as in OpenAI."""

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=128)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as it only identifies the end user
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)  # -1 and 0 both mean off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = False

    @model_validator(mode="after")
    def _check_combinations(self):
        if self.stream_options is not None and not self.stream:
            raise invalid_request("'stream_options' is only allowed when 'stream' is true.", param="stream_options")
        for token, bias in (self.logit_bias or {}).items():
            if not is_ascii_number(token):
                raise invalid_request(f"Invalid key in 'logit_bias': {token!r} is not a token id.", param="logit_bias")
            if not -100 <= bias <= 100:
                raise invalid_request(f"Invalid 'logit_bias' for token {token}: {bias} is outside [-100, 100].",
                                      param="logit_bias")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The engine's parameters; it rejects what only it can judge (token ids, context length)."""
        return SamplingParams(
            n=self.n or 1,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=self.top_p or 1.0,
            top_k=max(self.top_k or 0, 0),
            min_p=self.min_p or 0.0,
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias={int(token): bias for token, bias in (self.logit_bias or {}).items()},
            max_tokens=max_tokens,
            min_tokens=self.min_tokens or 0,
            ignore_eos=bool(self.ignore_eos),
            stop=stop_strings(self.stop),
            logprobs=logprobs,
        )


def is_ascii_number(text: str) -> bool:
    """A non-negative integer in ASCII digits ("²" and "٣" are digits to `str.isdigit`, not to
    OpenAI), short enough to be read without Python's limit on long integer strings."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop or []
    return [s for s in stops if s]  # an empty stop string would end every reply before it starts


M = TypeVar("M", bound=BaseModel)


def parse_request(model_class: type[M], body: bytes) -> M:
    data = parse_json_object(body)
    try:
        return model_class.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


# Deeper than any request needs (a JSON schema in a tool definition included), far below the
# depth at which Python's JSON parser runs out of stack.
MAX_JSON_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json_object(body: bytes) -> dict:
    """The body as a JSON object whose every string is valid Unicode and every number finite, so
    that nothing unreadable is ever stored or streamed; 400 naming the field otherwise."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise invalid_request(f"The JSON body is nested more than {MAX_JSON_DEPTH} levels deep.") from None
    except ValueError as err:
        raise invalid_request(f"We could not parse the JSON body of your request ({err}).") from None
    if not isinstance(data, dict):
        raise invalid_request("The request body must be a JSON object.")
    _check_values(data)
    return data


def _check_values(data: dict) -> None:
    # Iterative, so a deep body costs no stack; json.loads has already built it within its own limit.
    pending: list[tuple[object, str, int]] = [(data, "", 1)]
    while pending:
        value, param, depth = pending.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise invalid_request(f"Invalid '{param}': the string holds an unpaired UTF-16 surrogate, which is "
                                      "not valid Unicode.", param=param)
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise invalid_request(f"Invalid '{param}': {value} is not a finite number.", param=param)
        elif isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise invalid_request(f"Invalid '{param}': nested more than {MAX_JSON_DEPTH} levels deep.",
                                      param=param)
            if isinstance(value, list):
                pending += ((item, f"{param}[{i}]", depth + 1) for i, item in enumerate(value))
                continue
            for key, item in value.items():
                if _SURROGATE.search(key):
                    raise invalid_request(f"Invalid '{param or 'body'}': a key holds an unpaired UTF-16 surrogate, "
                                          "which is not valid Unicode.", param=param or None)
                pending.append((item, f"{param}.{key}" if param else key, depth + 1))


def _param(loc: tuple) -> str:
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif not ("[" in part or part[:1].isupper() or part in _TYPE_TAGS):
            param += f".{part}" if param else part
    return param


def validation_error(err: ValidationError) -> APIError:
    """One 400 for the most specific failure; a value that fits no member of a union lists them all."""
    errors = err.errors(include_url=False)
    params = [_param(e["loc"]) for e in errors]
    param = max(params, key=lambda p: p.count(".") + p.count("["))
    same = [e for e, p in zip(errors, params) if p == param]
    if any(e["type"] == "missing" for e in same):
        return invalid_request(f"Missing required parameter: '{param}'.", param=param)
    reasons = dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in same)
    reason = " or ".join(r[0].lower() + r[1:] for r in reasons)
    return invalid_request(f"Invalid '{param}': {reason}.", param=param)


def random_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"
