"""What crosses between the protocol layer and the engine: requests in, incremental outputs out.

The protocol layer (OpenAI shapes) builds a `GenerationRequest` from validated JSON; the engine
streams back `RequestOutput`s, each holding what every choice gained since the previous one.
Nothing here knows HTTP or tensors.
"""

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FunctionSchema:
    name: str
    parameters: str  # the JSON schema its arguments must match, as JSON text


@dataclass(frozen=True)
class CustomToolSchema:
    """A tool whose input is raw text, written where a function's JSON arguments would go."""

    name: str
    syntax: str = "text"  # "text" (anything) | "lark" | "regex": the grammar `definition` is written in
    definition: str = ""


@dataclass(frozen=True)
class StructuredOutput:
    """What a reply must be, from its first token on; the engine compiles it into a grammar (cached
    by this value) and masks every token that would break it, and the reply ends with EOS as soon as
    it is complete."""

    kind: str  # "json_object" | "json_schema" | "tool_calls"
    json_schema: str | None = None  # json_schema: the schema the reply matches, as JSON text
    functions: tuple[FunctionSchema | CustomToolSchema, ...] = ()  # tool_calls: each <tool_call> block calls one
    parallel: bool = False  # tool_calls: one block, or one or more separated by newlines
    # tool_calls: a reply may be this (a json_object or json_schema output) instead of calls, as when
    # tool_choice "auto" meets a response format
    or_reply: "StructuredOutput | None" = None


@dataclass
class SamplingParams:
    n: int = 1  # independent choices generated for the one prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass, (0, 1]
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # drop tokens below min_p * p(best); 0 = off
    seed: int | None = None  # same seed + same prompt => same text, whatever shares the batch
    presence_penalty: float = 0.0  # OpenAI: subtract once from each token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # HF/vLLM: divide positive (multiply negative) logits of prompt+generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    max_tokens: int | None = None  # None = until the context (max_model_len) is full; 0 = only the prompt
    min_tokens: int = 0  # EOS and stop token ids are suppressed before this many tokens
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)  # stop strings; never part of the returned text
    stop_token_ids: list[int] = field(default_factory=list)  # besides the checkpoint's EOS ids
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token's logprob + top-k alternatives
    # None: none; k >= 0: each prompt token's logprob (the first has none) + top-k alternatives. Such a
    # request computes every prompt token (no prefix-cache reuse: `uses_prefix_cache` is False); with
    # max_tokens 0 the prompt is scored and nothing is generated.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True  # drop special tokens (e.g. <|im_end|>) from the text
    structured_output: StructuredOutput | None = None  # a grammar the reply must follow

    @property
    def uses_prefix_cache(self) -> bool:
        """Whether the prompt's cached K/V may be reused: not when its tokens' logprobs are wanted,
        which needs the logits of every prompt position."""
        return self.prompt_logprobs is None


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    # Predicted Outputs: the reply the client expects (token ids); proposed as draft tokens.
    prediction_token_ids: list[int] | None = None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # log-softmax of the raw logits (before temperature, penalties and filters)
    top: list[tuple[int, float]]  # the `logprobs` most likely (token id, logprob), best first


@dataclass
class ChoiceDelta:
    """What one choice gained since the previous output."""

    index: int  # 0 .. n-1
    text: str  # new text; never ends inside a UTF-8 character or a possible stop string
    token_ids: list[int]  # new tokens (including ones whose text is still held back)
    logprobs: list[TokenLogprob] | None  # one per new token when logprobs were asked for
    finish_reason: str | None = None  # "stop" (EOS, stop token or stop string) | "length" | "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended the choice


@dataclass
class RequestOutput:
    request_id: str
    choices: list[ChoiceDelta]  # only choices that advanced
    prompt_tokens: int
    completion_tokens: int  # generated so far, summed over choices
    finished: bool  # every choice has a finish_reason: this is the last output
    # With `prompt_logprobs`, once, in the first output: one per prompt token after the first
    # (the first has nothing before it to be predicted from).
    prompt_logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    # Predicted Outputs, summed over choices: prediction tokens verified and kept, and verified and dropped.
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class RequestRejected(ValueError):
    """The request can never be served (e.g. longer than the model's context or the whole KV cache).

    `code` is the OpenAI error code to report (e.g. "context_length_exceeded"), `param` the field."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param


class GrammarError(ValueError):
    """The engine cannot compile a structured output; the message is the grammar engine's reason and
    `function_index` the tool whose parameters schema (or input grammar) it rejected, if that was the cause."""

    def __init__(self, message: str, function_index: int | None = None):
        super().__init__(message)
        self.function_index = function_index


class EngineOverloaded(RuntimeError):
    """The waiting queue is full (`--max-queue`); the client should retry later."""


class EngineDead(RuntimeError):
    """The engine's step loop has stopped; no request can be served."""


class RequestFailed(RuntimeError):
    """The engine failed while stepping a batch that held this request; other requests go on."""


@dataclass
class EngineStats:
    """A snapshot for metrics and health; read from any thread."""

    num_running: int  # requests that have produced output and are not finished
    num_waiting: int  # requests submitted that have produced no output yet (queued or in their first prefill)
    kv_blocks_used: int  # held by running sequences
    kv_blocks_total: int
    num_preemptions: int  # sequences preempted (KV freed, recomputed later) since start
    kv_blocks_cached: int = 0  # free blocks that still hold cached K/V (reusable until evicted)
    prefix_cache_queries: int = 0  # tokens of admitted sequences looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found
    spec_decode_drafts: int = 0  # speculative decoding: verification steps of one sequence
    spec_decode_draft_tokens: int = 0  # draft tokens verified
    spec_decode_accepted_tokens: int = 0  # of those, accepted
    spec_decode_accepted_per_position: tuple[int, ...] = ()  # [i]: drafts accepted at place i of their window
