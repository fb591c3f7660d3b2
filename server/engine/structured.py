"""Structured outputs: a grammar per constrained sequence decides which tokens may come next.

llguidance (the Rust grammar engine of guidance) does the work: a `StructuredOutput` becomes a
Lark grammar whose JSON parts are `%json` schemas, compiled once per distinct constraint (cached),
and every constrained sequence gets its own cheap copy of the compiled matcher. Each step the
matchers write one packed bitmask row per constrained row into a host buffer (pinned on CUDA, so
the copy to the device is asynchronous), on a thread of their own while the model runner runs the
forward pass, and the sampler applies the rows to the logits. A matcher advances with each token its sequence accepts, once:
a preempted sequence is recomputed from its tokens without replaying them. Once the grammar is
complete it allows only the EOS tokens, so the reply ends there.

JSON is written the way Qwen3's chat template writes tool arguments (Python's `json.dumps`
style: ", " and ": ", no other whitespace), so a reply reads like the model's own history, and a
model with random weights cannot wander off into endless whitespace.

Why llguidance rather than xgrammar: on this project's test schemas xgrammar 0.2.9 produced
invalid JSON (raw control characters inside strings with `maxLength`, its open issue #800);
bench/RESULTS.md has the measured mask times of both.
"""

import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import torch

from model.batch import to_device
from model.tokenizer import Tokenizer
from server.engine.request import CustomToolSchema, FunctionSchema, GrammarError, StructuredOutput

logger = logging.getLogger("nanoserve.engine")

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Qwen3's tool call block; <tool_call> and </tool_call> are single tokens of its vocabulary.
TOOL_CALL_HEAD = '\n{"name": "'
TOOL_CALL_ARGUMENTS = '", "arguments": '
TOOL_CALL_TAIL = "}\n"
MAX_CACHED_GRAMMARS = 256


def _json_rule(schema_text: str) -> str:
    schema = json.loads(schema_text)
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return "%json " + json.dumps(schema | {"x-guidance": JSON_STYLE})


def _whole_input(pattern: str) -> str:
    """`pattern` (Rust regex syntax, as OpenAI's custom tools take it) as a group for a Lark regex,
    which matches the whole input anyway: the anchors a client may write around it go."""
    pattern = pattern.removeprefix("^")
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1]
    return "(?:" + pattern.replace("/", "\\/") + ")"


def _input_rules(i: int, tool: CustomToolSchema) -> list[str]:
    """A custom tool's raw input and the `}` that closes the block after it. Free text and a regex
    are one lexeme together with that `}` (a `}` inside the input cannot end it early: only
    `</tool_call>` can follow the lexeme); a Lark grammar is nested as a grammar of its own."""
    if tool.syntax == "text":
        return [f"arguments_{i}: INPUT_{i}", f'INPUT_{i}: /(?s:.*)\\}}\\n/']
    if tool.syntax == "regex":
        return [f"arguments_{i}: INPUT_{i}", f"INPUT_{i}: /{_whole_input(tool.definition)}\\}}\\n/"]
    if tool.syntax == "lark":
        return [f"arguments_{i}: input_{i} {json.dumps(TOOL_CALL_TAIL)}", f"input_{i}: %lark {{\n{tool.definition}\n}}"]
    raise GrammarError(f"unknown custom tool syntax {tool.syntax!r}")


def _tool_rules(i: int, tool: FunctionSchema | CustomToolSchema) -> list[str]:
    head = json.dumps(TOOL_CALL_HEAD + tool.name + TOOL_CALL_ARGUMENTS)
    if isinstance(tool, CustomToolSchema):
        return [f"call_{i}: <tool_call> {head} arguments_{i} </tool_call>", *_input_rules(i, tool)]
    return [f"call_{i}: <tool_call> {head} arguments_{i} {json.dumps(TOOL_CALL_TAIL)} </tool_call>",
            f"arguments_{i}: " + _json_rule(tool.parameters)]


def _reply_rule(constraint: StructuredOutput) -> str:
    if constraint.kind == "json_object":
        return _json_rule('{"type": "object"}')
    if constraint.kind == "json_schema":
        return _json_rule(constraint.json_schema)
    raise GrammarError(f"unknown structured output {constraint.kind!r}")


def grammar_source(constraint: StructuredOutput) -> str:
    """The Lark grammar (llguidance's dialect) of a constraint."""
    if constraint.kind != "tool_calls":
        return "start: " + _reply_rule(constraint)
    if not constraint.functions:
        raise GrammarError("a tool call constraint needs at least one tool")
    calls = 'call ("\\n" call)*' if constraint.parallel else "call"
    lines = [f"start: {calls} | reply" if constraint.or_reply else f"start: {calls}",
             "call: " + " | ".join(f"call_{i}" for i in range(len(constraint.functions)))]
    if constraint.or_reply is not None:
        lines.append("reply: " + _reply_rule(constraint.or_reply))
    for i, tool in enumerate(constraint.functions):
        lines += _tool_rules(i, tool)
    return "\n".join(lines)


def _tool_check_source(tool: FunctionSchema | CustomToolSchema) -> str:
    """A grammar of `tool`'s arguments alone, to name the tool whose schema or grammar fails."""
    if isinstance(tool, FunctionSchema):
        return "start: " + _json_rule(tool.parameters)
    return "\n".join(["start: arguments_0", *_input_rules(0, tool)])


def _reason(error: str) -> str:
    """llguidance's error without the grammar excerpt it quotes (which is ours, not the client's)."""
    first_line = error.strip().splitlines()[0] if error.strip() else "the grammar is invalid"
    return first_line.split(": ", 1)[1] if first_line.startswith("at ") and ": " in first_line else first_line


class GrammarCompiler:
    """Compiles constraints into matchers, caching the compiled grammar by constraint.

    Used from the engine's loop thread (new matchers) and from the API's worker threads (compiling
    a request's constraint before it is queued, so that a bad schema is a 400); one lock guards it.
    The token table is built on first use: about a second for Qwen3's 151,936 tokens.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self._source = tokenizer
        self.vocab_size = vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[StructuredOutput, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def _token_table(self) -> llguidance.LLTokenizer:
        if self._tokenizer is None:
            started = time.monotonic()
            self._tokenizer = llguidance.LLTokenizer(self._source.backend_json(), n_vocab=self.vocab_size,
                                                     eos_token=list(self._source.eos_token_ids))
            logger.info("grammar engine: llguidance token table built in %.1f s", time.monotonic() - started)
        return self._tokenizer

    def _build(self, source: str) -> llguidance.LLMatcher:
        matcher = llguidance.LLMatcher(self._token_table(), source, log_level=0)
        if matcher.is_error():
            raise GrammarError(_reason(matcher.get_error()))
        return matcher

    def compile(self, constraint: StructuredOutput) -> llguidance.LLMatcher:
        """The compiled grammar of `constraint` (a matcher at its start), or GrammarError."""
        with self._lock:
            if constraint in self._compiled:
                self._compiled.move_to_end(constraint)
                return self._compiled[constraint]
            for i, tool in enumerate(constraint.functions):  # name the tool whose schema fails
                try:
                    self._build(_tool_check_source(tool))
                except GrammarError as err:
                    raise GrammarError(str(err), function_index=i) from None
            compiled = self._build(grammar_source(constraint))
            self._compiled[constraint] = compiled
            if len(self._compiled) > MAX_CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
            return compiled

    def matcher(self, constraint: StructuredOutput) -> "GrammarMatcher":
        return GrammarMatcher(self.compile(constraint).deep_copy(), self._source.eos_token_ids)


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, eos_token_ids: tuple[int, ...]):
        self._matcher = matcher
        self._eos_token_ids = eos_token_ids

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token. The mask allowed it; should the grammar still refuse it,
        the matcher is left in its error state, where `fill` allows only EOS: the reply ends."""
        if not self._matcher.consume_token(token_id):
            logger.error("grammar refused a token it allowed: %s", self._matcher.get_error())

    def fill(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into `row` (int32 words, on the host)."""
        if self._matcher.is_error():
            row.zero_()
            for token in self._eos_token_ids:
                row[token // 32] |= _bit(token % 32)
            return
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())


def _bit(j: int) -> int:
    return (1 << j) - (1 << 32 if j == 31 else 0)  # bit 31 of an int32 word is its sign


class TokenBitmask:
    """The step's mask rows: one per constrained row of the batch, filled on the host by a thread of
    their own while the caller runs the forward pass, then applied on the device
    (`nanoserve_kernels.apply_token_bitmask_`). The thread only runs the grammar engine: no torch op that
    could start an OpenMP team of its own (see the README's Engine section)."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device):
        words = -(-vocab_size // 32)
        self.device = device
        self._host = torch.empty(max_rows, words, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._host_rows = list(self._host)  # one view per mask row, made once
        self._device = self._host if device.type == "cpu" else torch.empty_like(self._host, device=device)
        self._filler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")
        self._pending: tuple[list[int], Future] | None = None

    def start_fill(self, matchers: list["GrammarMatcher | None"]) -> None:
        """Start filling a mask row for each row of the batch that has a matcher."""
        rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
        self._pending = (rows, self._filler.submit(self._fill, [matchers[row] for row in rows])) if rows else None

    def _fill(self, matchers: list["GrammarMatcher"]) -> None:
        for matcher, mask_row in zip(matchers, self._host_rows):
            matcher.fill(mask_row)

    def finish_fill(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mask rows, the logits row of each) on the device, once filled; None when no row is constrained."""
        if self._pending is None:
            return None
        (rows, filled), self._pending = self._pending, None
        filled.result()
        masks = self._device[: len(rows)]
        if self.device.type != "cpu":
            masks.copy_(self._host[: len(rows)], non_blocking=True)
        return masks, to_device(rows, torch.int64, self.device)
