"""Tool calling over HTTP with the official client: chat `tools` and Responses function tools on the
random-weights checkpoint, where only the grammar (tool_choice "required" or a named function) makes
a call happen, and it must parse and match its schema every time."""

import json
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from model.tokenizer import Tokenizer
from server.api.protocol_chat import ChatChoice, delta_payloads
from server.engine.request import ChoiceDelta


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=16)
    unit: Literal["c", "f"]


class Search(BaseModel):
    model_config = ConfigDict(extra="forbid")
    query: str = Field(max_length=20)
    limit: int = Field(ge=1, le=10)


ARGUMENTS = {"get_weather": Weather, "search": Search}
CHAT_TOOLS = [
    {"type": "function", "function": {"name": name, "description": f"{name} tool", "parameters": model.model_json_schema()}}
    for name, model in ARGUMENTS.items()
]
RESPONSE_TOOLS = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
                   "parameters": t["function"]["parameters"], "strict": True} for t in CHAT_TOOLS]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def validate_call(name: str, arguments: str) -> None:
    ARGUMENTS[name].model_validate_json(arguments)


def test_forced_chat_call_round_trip(client, server, chat_checkpoint):
    first = client.chat.completions.create(model=server.model, messages=QUESTION, tools=CHAT_TOOLS,
                                           tool_choice="required", seed=5, max_tokens=120)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and all(call.type == "function" and call.id.startswith("call_") for call in calls)
    for call in calls:
        validate_call(call.function.name, call.function.arguments)
    history = QUESTION + [choice.message.model_dump(exclude_none=True)]
    history += [{"role": "tool", "tool_call_id": call.id, "content": f"result {i}"} for i, call in enumerate(calls)]
    second = client.chat.completions.create(model=server.model, messages=history, tools=CHAT_TOOLS, seed=5,
                                            max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The history went through the template as Qwen3 renders it: calls in the assistant turn,
    # results as one user turn of <tool_response> blocks.
    expected = Tokenizer(chat_checkpoint).apply_chat_template(
        QUESTION + [{"role": "assistant", "content": "", "tool_calls": [
            {"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                          "arguments": json.loads(c.function.arguments)}}
            for c in calls]}] + [{"role": "tool", "content": f"result {i}"} for i in range(len(calls))],
        tools=CHAT_TOOLS)
    assert '<tool_call>\n{"name": "' in expected and "<tool_response>\nresult 0\n</tool_response>" in expected
    assert second.usage.prompt_tokens == len(Tokenizer(chat_checkpoint).encode(expected))


def test_streamed_call_fragments_reassemble_to_the_unstreamed_call(client, server):
    kwargs = dict(model=server.model, messages=QUESTION, tools=CHAT_TOOLS, seed=11, max_tokens=120,
                  tool_choice={"type": "function", "function": {"name": "search"}}, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    assert [c.function.name for c in whole] == ["search"]
    validate_call("search", whole[0].function.arguments)
    calls, finish, fragments = {}, None, 0
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        assert not delta.content  # no markup, no text: the grammar allowed only the call
        for piece in delta.tool_calls or []:
            if piece.index not in calls:  # a call's first piece: id, type and name, no arguments yet
                assert piece.id.startswith("call_") and piece.type == "function" and piece.function.arguments == ""
                calls[piece.index] = [piece.function.name, ""]
            else:
                assert piece.id is None and piece.function.name is None
                calls[piece.index][1] += piece.function.arguments
                fragments += 1
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and fragments > 1  # the arguments streamed in pieces
    assert [tuple(calls[i]) for i in sorted(calls)] == [(c.function.name, c.function.arguments) for c in whole]


@pytest.mark.parametrize("seed", range(6))
def test_required_calls_always_parse_and_match_their_schemas(client, server, seed):
    choice = client.chat.completions.create(model=server.model, messages=QUESTION, tools=CHAT_TOOLS,
                                            tool_choice="required", seed=seed, max_tokens=200, n=2).choices
    for c in choice:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls
        for call in c.message.tool_calls:
            validate_call(call.function.name, call.function.arguments)


def test_tool_choice_none_offers_no_tools_and_auto_offers_them(client, server, chat_checkpoint):
    tokenizer = Tokenizer(chat_checkpoint)
    plain = len(tokenizer.encode(tokenizer.apply_chat_template(QUESTION)))
    with_tools = len(tokenizer.encode(tokenizer.apply_chat_template(QUESTION, tools=CHAT_TOOLS)))
    for choice, prompt_tokens in (("none", plain), ("auto", with_tools)):
        reply = client.chat.completions.create(model=server.model, messages=QUESTION, tools=CHAT_TOOLS,
                                               tool_choice=choice, max_tokens=4, seed=1)
        assert reply.usage.prompt_tokens == prompt_tokens


def test_reasoning_text_and_calls_split_apart_in_any_chunking():
    text = ('<think>\nweather first\n</think>\n\nLet me look.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris", "unit": "c"}}\n</tool_call>')
    for cut in range(1, len(text)):
        choice = ChatChoice(0, {"get_weather"})
        deltas = [ChoiceDelta(0, text[:cut], [], None), ChoiceDelta(0, text[cut:], [], None, finish_reason="stop")]
        streamed = [payload for delta in deltas for payload in delta_payloads(choice, choice.add(delta))]
        assert choice.reasoning == "weather first" and choice.content == "Let me look."
        assert choice.finish_reason == "tool_calls"
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in choice.tool_calls] == [
            ("get_weather", '{"city": "Paris", "unit": "c"}')]
        content = "".join(p.get("content", "") for p in streamed)
        assert content == "Let me look." and "<tool_call>" not in content


def test_forced_responses_call_round_trip(client, server):
    # Responses take no seed: one call (parallel_tool_calls false) keeps the reply short whatever is sampled.
    first = client.responses.create(model=server.model, input="What is the weather in Paris?", tools=RESPONSE_TOOLS,
                                    tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
                                    max_output_tokens=120)
    assert first.status == "completed" and first.tools[0].name == "get_weather"
    assert [item.type for item in first.output] == ["function_call"]
    call = first.output[0]
    assert call.status == "completed" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    validate_call(call.name, call.arguments)
    second = client.responses.create(model=server.model, previous_response_id=first.id, tools=RESPONSE_TOOLS,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "18 C and sunny"}], max_output_tokens=6)
    assert second.status in ("completed", "incomplete") and second.output[-1].type == "message"
    items = client.responses.input_items.list(second.id, order="asc").data
    assert [(i.type, i.call_id, i.output) for i in items] == [("function_call_output", call.call_id, "18 C and sunny")]
    # The whole conversation goes on: the stored call and its output are in the next prompt.
    explicit = client.responses.create(model=server.model, tools=RESPONSE_TOOLS, max_output_tokens=6, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"}])
    assert explicit.usage.input_tokens == second.usage.input_tokens


def test_streamed_responses_call_events(client, server):
    kwargs = dict(model=server.model, input="Search for nanoserve.", tools=RESPONSE_TOOLS, tool_choice="required",
                  parallel_tool_calls=False, temperature=1.0, max_output_tokens=120)
    events = list(client.responses.create(stream=True, **kwargs))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert types[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert set(types[3:-3]) == {"response.function_call_arguments.delta"} and len(types) > 7
    added, done, final = events[2].item, events[-2].item, events[-1].response
    assert added.type == "function_call" and added.arguments == "" and added.status == "in_progress"
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert events[-3].arguments == deltas == done.arguments and done.status == "completed"
    assert {e.item_id for e in events[3:-2]} == {added.id} and {e.output_index for e in events[3:-2]} == {0}
    validate_call(done.name, done.arguments)
    assert final.output[0].arguments == deltas and client.responses.retrieve(final.id).output[0].arguments == deltas


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": CHAT_TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [CHAT_TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools[1].function.parameters"),
    ({"messages": QUESTION + [{"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tool_requests_are_400s_naming_the_field(http, server, body, param):
    response = http.post("/v1/chat/completions", json={"model": server.model, "messages": QUESTION} | body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    if param.endswith("parameters"):
        assert "Invalid type: nonsense" in response.json()["error"]["message"]


ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}}, "required": ["answer"],
          "additionalProperties": False}
CALL_TOKEN = 151657  # <tool_call>


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_format_and_tools_compose_in_chat(client, server, stream):
    """tool_choice auto with a response format: JSON in the format, or calls, as logit_bias steers
    the random weights; a forced call with a format is the call (the format governs a later turn)."""
    response_format = {"type": "json_schema", "json_schema": {"name": "Answer", "schema": ANSWER, "strict": True}}

    def reply(bias: float, choice: str = "auto") -> tuple[str | None, list]:
        kwargs = dict(model=server.model, messages=QUESTION, tools=CHAT_TOOLS, tool_choice=choice, seed=3,
                      max_tokens=120, response_format=response_format, logit_bias={str(CALL_TOKEN): bias},
                      parallel_tool_calls=False)
        if not stream:
            message = client.chat.completions.create(**kwargs).choices[0].message
            return message.content, [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        texts, calls = [], {}
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            delta = chunk.choices[0].delta
            texts.append(delta.content or "")
            for piece in delta.tool_calls or []:
                name, arguments = calls.get(piece.index, ("", ""))
                calls[piece.index] = (name + (piece.function.name or ""), arguments + (piece.function.arguments or ""))
        return "".join(texts) or None, [calls[i] for i in sorted(calls)]

    content, calls = reply(-100.0)
    assert calls == [] and json.loads(content)["answer"] is not None
    for bias, choice in ((100.0, "auto"), (0.0, "required")):
        content, calls = reply(bias, choice)
        assert not content and len(calls) == 1, (content, calls)
        validate_call(*calls[0])


def test_a_forced_responses_call_accepts_a_format(client, server):
    response = client.responses.create(model=server.model, input="Weather in Paris?", tools=RESPONSE_TOOLS,
                                       tool_choice="required", parallel_tool_calls=False, max_output_tokens=120,
                                       text={"format": {"type": "json_schema", "name": "Answer", "schema": ANSWER,
                                                        "strict": True}})
    assert [item.type for item in response.output] == ["function_call"] and response.text.format.name == "Answer"
    validate_call(response.output[0].name, response.output[0].arguments)


def test_bad_responses_tools_are_400s(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=server.model, input="x", tool_choice="required", tools=[
            {"type": "function", "name": "f", "parameters": {"type": "array", "minContains": 1, "contains": {}}}])
    assert err.value.body["param"] == "tools[0].parameters" and "minContains" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=server.model, input=[{"type": "function_call_output", "output": "x"}])
    assert err.value.body["param"] == "input[0].call_id"
    response = httpx.post(f"{server.base_url}/v1/responses", json={
        "model": server.model, "input": "x", "tools": [{"type": "local_shell"}]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools[0].type"
