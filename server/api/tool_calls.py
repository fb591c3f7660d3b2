"""Qwen3's tool calls, `<tool_call>\\n{"name": "…", "arguments": {…}}\\n</tool_call>`, split out of
a reply's text as it streams in.

The parser turns the answer text (reasoning already split off) into content and calls, in order:
plain strings are content, `ToolCallStart` opens call number `index` with its function's name, and
`ToolCallArguments` adds to its arguments, which are the JSON text the model wrote for them. The
newlines the chat template puts between text and calls are dropped (a reply sent back as history
renders as it was generated). Anything that may still turn out to be part of a tag is held back
until the next piece decides, so the events add up to the same content and calls whatever the
cut points of the text.

A call streams in one of two ways:
- `live` (a grammar forced the calls, so every block is well formed): the call opens as soon as
  its name is read, and its arguments stream as they arrive, less an end that may be the
  closing `}` of the block;
- otherwise (a free-running model, which may write anything) a block is judged once it is
  complete: a declared function's name and an object for arguments make a call, sent whole;
  anything else, or a block the reply never closes, is returned as plain content.

A custom tool (one of `raw_names`) takes raw text where a function's JSON arguments go,
`{"name": "apply_patch", "arguments": *** Begin Patch …}`, which is how Qwen3's chat template
writes string arguments back into the history; its arguments are that text, kept exactly
(whitespace included), whatever it is.
"""

import json
import re
from dataclasses import dataclass

from server.api.reasoning import partial_tag_length

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
# The template writes `": "` before the arguments: one space, which a custom tool's raw input does not own.
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]*)"\s*,\s*"arguments"\s*: ?')


@dataclass
class ToolCallStart:
    index: int
    name: str


@dataclass
class ToolCallArguments:
    index: int
    delta: str


Event = str | ToolCallStart | ToolCallArguments


def _arguments_end(pending: str, raw: bool) -> int:
    """Where the arguments in `pending` may end: the start of its longest suffix that could still
    become the block's closing `}` and `</tool_call>` (whitespace around both allowed, and before
    the `}` too unless the arguments are `raw` input, which keeps its own)."""
    brace = pending.rfind("}")
    if brace >= 0 and TOOL_CALL_END.startswith(pending[brace + 1:].lstrip()):
        end = brace
    else:
        end = len(pending.rstrip())
    while end > 0 and pending[end - 1].isspace() and not raw:
        end -= 1
    return end


def _whole_call(block: str, names: set[str], raw_names: frozenset[str]) -> tuple[str, str] | None:
    """(name, arguments text) of a complete block's text, or None when it is not a valid call."""
    header = _HEADER.match(block)
    rest = block[header.end():].rstrip() if header else ""
    if header is None or header.group(1) not in names or not rest.endswith("}"):
        return None
    if header.group(1) in raw_names:
        return header.group(1), rest[:-1]
    arguments = rest[:-1].strip()
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return None
    return (header.group(1), arguments) if isinstance(parsed, dict) else None


class ToolCallParser:
    def __init__(self, names: set[str], live: bool, raw_names: frozenset[str] = frozenset()):
        self._names = names
        self._raw_names = raw_names
        self._live = live
        self._raw = False  # live: the open call's arguments are a custom tool's raw input
        self._held = ""  # content that may still be part of a tag, or newlines that may be dropped
        self._in_block = False
        self._block = ""  # the open block's text after <tool_call>
        self._newlines_before = ""  # dropped before the open block: given back if it is no call
        self._arguments_at: int | None = None  # live: where the open call's arguments start in _block
        self._sent = 0  # live: how much of them was sent
        self._strip_leading_newlines = False  # right after a call
        self.num_calls = 0

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        self._held += text
        while self._held:
            if self._in_block:
                self._feed_block(events)
                if self._in_block:
                    break
            else:
                self._feed_text(events)
                if not self._in_block:
                    break
        return events

    def finish(self) -> list[Event]:
        """What is still held back once the reply is complete."""
        events: list[Event] = []
        if self._in_block:
            if self._arguments_at is not None:  # a forced call cut short (max_tokens): it was sent as it came
                self._send_arguments(events, self._block[self._arguments_at:])
            else:
                events.append(self._newlines_before + TOOL_CALL_START + self._block)
        elif self._held:
            events.append(self._held)
        self._held, self._block, self._in_block = "", "", False
        return events

    def _feed_text(self, events: list[Event]) -> None:
        if self._strip_leading_newlines:
            self._held = self._held.lstrip("\n")
            if not self._held:
                return
            self._strip_leading_newlines = False
        start = self._held.find(TOOL_CALL_START)
        if start >= 0:
            content = self._held[:start].rstrip("\n")
            if content:
                events.append(content)
            self._newlines_before = self._held[len(content):start]
            self._held = self._held[start + len(TOOL_CALL_START):]
            self._in_block, self._block, self._arguments_at, self._sent = True, "", None, 0
            return
        keep = len(self._held) - partial_tag_length(self._held, TOOL_CALL_START)
        while keep > 0 and self._held[keep - 1] == "\n":
            keep -= 1
        if keep:
            events.append(self._held[:keep])
            self._held = self._held[keep:]

    def _feed_block(self, events: list[Event]) -> None:
        self._block += self._held
        self._held = ""
        end = self._block.find(TOOL_CALL_END)
        block = self._block if end < 0 else self._block[:end]
        if self._live and self._arguments_at is None:
            header = _HEADER.match(block)
            if header and header.end() < len(block):  # the arguments have begun: the name is whole
                events.append(ToolCallStart(self.num_calls, header.group(1)))
                self.num_calls += 1
                self._arguments_at = header.end()
                self._raw = header.group(1) in self._raw_names
        if end < 0:
            if self._arguments_at is not None:
                pending = block[self._arguments_at:]
                self._send_arguments(events, pending[:_arguments_end(pending, self._raw)])
            return
        self._held = self._block[end + len(TOOL_CALL_END):]
        self._in_block, self._block = False, ""
        if self._arguments_at is not None:
            pending = block[self._arguments_at:]
            self._send_arguments(events, pending[:_arguments_end(pending, self._raw)])
            self._strip_leading_newlines = True
        elif (call := _whole_call(block, self._names, self._raw_names)) is not None:
            events.append(ToolCallStart(self.num_calls, call[0]))
            events.append(ToolCallArguments(self.num_calls, call[1]))
            self.num_calls += 1
            self._strip_leading_newlines = True
        else:
            events.append(self._newlines_before + TOOL_CALL_START + block + TOOL_CALL_END)  # the model's text as it is

    def _send_arguments(self, events: list[Event], arguments: str) -> None:
        if len(arguments) > self._sent:
            events.append(ToolCallArguments(self.num_calls - 1, arguments[self._sent:]))
            self._sent = len(arguments)
