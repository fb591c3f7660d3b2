"""Qwen3 replies that think: `<think>reasoning</think>\\n\\nanswer`, split as the text streams in.

A reply holds reasoning only when it starts with `<think>`; the reasoning runs to `</think>`
(or to the end, when generation stops first) and the answer follows after the newlines right
after `</think>`. Newlines just inside the tags are dropped too, as the chat template drops them
when the reasoning goes back in as history. Text arrives in arbitrary pieces, so anything that
may still turn out to be part of a tag, or a newline that may still be dropped, is held back
until the next piece decides it; the pieces add up to the same split whatever the cut points.
"""

from dataclasses import dataclass
from typing import Literal

THINK_START = "<think>"
THINK_END = "</think>"

# OpenAI's reasoning efforts (chat `reasoning_effort`, Responses `reasoning.effort`). Qwen3 has one
# switch: "none" and "minimal" turn thinking off, every other effort leaves it on.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
_NO_THINKING = ("none", "minimal")


def thinking_for_effort(effort: str | None) -> bool | None:
    """The chat template's `enable_thinking` for a reasoning effort; None (the template's default) for none given."""
    return None if effort is None else effort not in _NO_THINKING


@dataclass
class SplitText:
    reasoning: str = ""
    content: str = ""


def partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


class ReasoningSplitter:
    def __init__(self) -> None:
        self._state = "start"  # start -> reasoning -> content, or start -> content
        self._held = ""
        self._strip_leading_newlines = False
        self.has_reasoning = False  # the reply opened with <think>

    def feed(self, text: str) -> SplitText:
        self._held += text
        if self._state == "start":
            if self._held.startswith(THINK_START):
                self._state, self.has_reasoning, self._strip_leading_newlines = "reasoning", True, True
                self._held = self._held[len(THINK_START):]
            elif THINK_START.startswith(self._held):
                return SplitText()  # still undecided: "<thi" may become "<think>"
            else:
                self._state = "content"
        if self._state == "reasoning":
            return self._feed_reasoning()
        return SplitText(content=self._take_content())

    def finish(self) -> SplitText:
        """What is still held back once the reply is complete."""
        held, self._held = self._held, ""
        if self._state == "start":
            return SplitText(content=held)  # a reply that is only a beginning of "<think>"
        if held.strip("\n") == "":
            return SplitText()  # newlines next to a tag or at the end are dropped
        if self._strip_leading_newlines:
            held = held.lstrip("\n")
        if self._state == "reasoning":
            return SplitText(reasoning=held)
        return SplitText(content=held)

    def _feed_reasoning(self) -> SplitText:
        end = self._held.find(THINK_END)
        if end >= 0:
            reasoning = self._clean_reasoning(self._held[:end].rstrip("\n"))
            self._held = self._held[end + len(THINK_END):]
            self._state, self._strip_leading_newlines = "content", True
            return SplitText(reasoning=reasoning, content=self._take_content())
        # Hold back a possible start of "</think>" and the newlines right before it.
        cut = len(self._held) - partial_tag_length(self._held, THINK_END)
        while cut > 0 and self._held[cut - 1] == "\n":
            cut -= 1
        reasoning, self._held = self._held[:cut], self._held[cut:]
        return SplitText(reasoning=self._clean_reasoning(reasoning))

    def _clean_reasoning(self, text: str) -> str:
        if self._strip_leading_newlines:
            text = text.lstrip("\n")
            self._strip_leading_newlines = text == ""
        return text

    def _take_content(self) -> str:
        if self._strip_leading_newlines:
            self._held = self._held.lstrip("\n")
            if not self._held:
                return ""
            self._strip_leading_newlines = False
        content, self._held = self._held, ""
        return content
