"""Splitting a Qwen3 reply into reasoning and content, whole and as a stream cut anywhere."""

import itertools

import pytest

from server.api.reasoning import ReasoningSplitter

CASES = [
    # reply, reasoning, content, has_reasoning
    ("<think>\nLet me add.\n</think>\n\n4", "Let me add.", "4", True),
    ("<think>\na\n\nb\n</think>\n\n\nc\n\nd\n", "a\n\nb", "c\n\nd\n", True),
    ("<think></think>answer", "", "answer", True),
    ("<think>\n\n</think>\n\n", "", "", True),
    ("<think>\nstill thinking\n", "still thinking", "", True),
    ("<think>cut at </th", "cut at </th", "", True),
    ("<think>x </thinking> y</think>z", "x </thinking> y", "z", True),
    ("<think>a</think>b</think>c", "a", "b</think>c", True),
    ("Hello <think>x</think>", "", "Hello <think>x</think>", False),
    ("\n<think>x</think>", "", "\n<think>x</think>", False),
    ("<thi", "", "<thi", False),
    ("<thinking>", "", "<thinking>", False),
    ("", "", "", False),
]


def _run(pieces: list[str]) -> tuple[str, str, bool]:
    splitter = ReasoningSplitter()
    reasoning = content = ""
    for piece in [*pieces, None]:
        split = splitter.finish() if piece is None else splitter.feed(piece)
        reasoning += split.reasoning
        content += split.content
    return reasoning, content, splitter.has_reasoning


@pytest.mark.parametrize("reply, reasoning, content, has_reasoning", CASES)
def test_whole_reply(reply, reasoning, content, has_reasoning):
    assert _run([reply]) == (reasoning, content, has_reasoning)


@pytest.mark.parametrize("reply, reasoning, content, has_reasoning", CASES)
def test_stream_cut_at_every_pair_of_positions(reply, reasoning, content, has_reasoning):
    for i, j in itertools.combinations_with_replacement(range(len(reply) + 1), 2):
        pieces = [reply[:i], reply[i:j], reply[j:]]
        assert _run(pieces) == (reasoning, content, has_reasoning), pieces


@pytest.mark.parametrize("reply, reasoning, content, has_reasoning", CASES)
def test_stream_one_character_at_a_time(reply, reasoning, content, has_reasoning):
    assert _run(list(reply)) == (reasoning, content, has_reasoning)


def test_text_is_released_as_soon_as_it_is_decided():
    splitter = ReasoningSplitter()
    assert splitter.feed("<thi").reasoning == ""  # could still be the tag
    assert splitter.feed("nk>\nStep one").reasoning == "Step one"
    assert splitter.feed("\n</").reasoning == ""  # a newline and a possible end tag wait
    assert splitter.feed("b>").reasoning == "\n</b>"  # it was not the tag after all
    split = splitter.feed("</think>\n\nAns")
    assert (split.reasoning, split.content) == ("", "Ans")
