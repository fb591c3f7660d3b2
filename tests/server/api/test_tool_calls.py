"""Qwen3 `<tool_call>` blocks split out of reply text: hand-written texts, one piece at a time at
every cut point, live (grammar-forced) and judged whole (free-running)."""

import pytest

from server.api.tool_calls import ToolCallArguments, ToolCallParser, ToolCallStart

NAMES = {"get_weather", "search"}
WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
SEARCH = '<tool_call>\n{"name": "search", "arguments": {"q": "a}b \\"x\\"", "n": {"k": [1, 2]}}}\n</tool_call>'


def assemble(events) -> tuple[str | None, list[tuple[str, str]]]:
    """(content or None, [(name, arguments)]) as a client would rebuild them from the events."""
    content, calls = "", []
    for event in events:
        if isinstance(event, str):
            content += event
        elif isinstance(event, ToolCallStart):
            assert event.index == len(calls)
            calls.append([event.name, ""])
        else:
            assert isinstance(event, ToolCallArguments) and event.index == len(calls) - 1 and event.delta
            calls[-1][1] += event.delta
    return content or None, [tuple(call) for call in calls]


def parse(text: str, live: bool = False, pieces: list[str] | None = None):
    parser = ToolCallParser(NAMES, live)
    events = [event for piece in (pieces or [text]) for event in parser.feed(piece)] + parser.finish()
    return assemble(events)


W_ARGS = '{"city": "Paris", "unit": "c"}'
S_ARGS = '{"q": "a}b \\"x\\"", "n": {"k": [1, 2]}}'
BAD_JSON = '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>'
UNKNOWN = '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>'
UNCLOSED = 'text\n<tool_call>\n{"name": "search", "argu'
CASES = [  # (text, content, calls)
    ("Hello there.", "Hello there.", []),
    (WEATHER, None, [("get_weather", W_ARGS)]),
    (WEATHER + "\n" + SEARCH, None, [("get_weather", W_ARGS), ("search", S_ARGS)]),
    ("Let me check.\n" + WEATHER + "\n\nDone <tool_ca", "Let me check.Done <tool_ca", [("get_weather", W_ARGS)]),
    (BAD_JSON + " after", BAD_JSON + " after", []),
    ("x\n" + UNKNOWN, "x\n" + UNKNOWN, []),
    (UNCLOSED, UNCLOSED, []),
    ("a <b> </tool_call> c\n\n", "a <b> </tool_call> c\n\n", []),
]


@pytest.mark.parametrize("text, content, calls", CASES,
                         ids=["text", "one", "two", "text-around", "bad-json", "unknown-name", "unclosed", "stray-tags"])
def test_free_running_text_parses_whole_and_in_every_split(text, content, calls):
    assert parse(text) == (content, calls)
    for cut in range(1, len(text)):
        assert parse(text, pieces=[text[:cut], text[cut:]]) == (content, calls), cut
    assert parse(text, pieces=list(text)) == (content, calls)


def test_live_calls_stream_their_arguments_before_the_block_ends():
    parser = ToolCallParser(NAMES, live=True)
    header = len('<tool_call>\n{"name": "get_weather", "arguments": ')
    assert parser.feed(WEATHER[:header]) == []  # the name may not be complete yet
    head, rest = WEATHER[header:header + 12], WEATHER[header + 12:]
    events = parser.feed(head)
    assert events == [ToolCallStart(0, "get_weather"), ToolCallArguments(0, '{"city": "Pa')]
    events += parser.feed(rest[:-len("}\n</tool_call>")])  # up to the arguments' own }
    assert assemble(events)[1] == [("get_weather", '{"city": "Paris", "unit": "c"')]  # } may close the block
    events += parser.feed(rest[-len("}\n</tool_call>"):]) + parser.finish()
    assert assemble(events) == (None, [("get_weather", '{"city": "Paris", "unit": "c"}')])


@pytest.mark.parametrize("text", [WEATHER, WEATHER + "\n" + SEARCH, "Sure.\n" + SEARCH + "\n" + WEATHER])
def test_live_parsing_is_chunking_invariant_and_equals_whole_parsing(text):
    whole = parse(text, live=True)
    assert whole == parse(text, live=False)
    for cut in range(1, len(text)):
        assert parse(text, live=True, pieces=[text[:cut], text[cut:]]) == whole, cut
    assert parse(text, live=True, pieces=list(text)) == whole


def test_a_live_call_cut_short_keeps_what_was_sent():
    text = WEATHER[:60]
    assert parse(text, live=True) == (None, [("get_weather", WEATHER[len('<tool_call>\n{"name": "get_weather", "arguments": '):60])])
