"""Structured outputs over HTTP with the official client's `.parse()`: on the random-weights
checkpoint only the grammar can make a reply valid JSON of the schema, so every parsed object here
is the grammar's doing. Strings and numbers are bounded (see tests/server/engine/test_structured.py)."""

import json
from typing import Literal

import openai
import pytest
from pydantic import Field

from tests.server.engine.test_structured import Address, Strict  # the engine test's schemas


class Profile(Strict):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=130)
    score: float = Field(ge=-10, le=10, multiple_of=0.25)
    tags: list[Literal["red", "green", "blue"]] = Field(max_length=3)
    address: Address
    nickname: str | None = Field(max_length=8)
    active: bool


MESSAGES = [{"role": "user", "content": "Describe a person."}]


@pytest.mark.parametrize("seed", range(4))
def test_chat_parse_returns_a_valid_object(client, server, seed):
    completion = client.chat.completions.parse(model=server.model, messages=MESSAGES, response_format=Profile,
                                               seed=seed, max_tokens=300, n=2)
    for choice in completion.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Profile)
        assert Profile.model_validate_json(choice.message.content) == choice.message.parsed


@pytest.mark.parametrize("seed", range(3))
def test_responses_parse_returns_a_valid_object(client, server, seed):
    response = client.responses.parse(model=server.model, input="Describe a person.", text_format=Profile,
                                      temperature=1.0, top_p=1.0, max_output_tokens=300)
    assert response.status == "completed" and isinstance(response.output_parsed, Profile)
    assert response.text.format.type == "json_schema" and response.text.format.name == "Profile"


def test_streamed_json_equals_the_unstreamed_json(client, server):
    kwargs = dict(model=server.model, messages=MESSAGES, seed=7, max_tokens=300,
                  response_format={"type": "json_schema", "json_schema": {
                      "name": "Profile", "schema": Profile.model_json_schema(), "strict": True}})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs))
    assert streamed == whole
    Profile.model_validate_json(whole)


def test_json_object_mode_answers_with_an_object(client, server):
    """Any object: unbounded strings may run to max_tokens on random weights; what ends is an object."""
    finished = 0
    for seed in range(6):
        choice = client.chat.completions.create(model=server.model, messages=MESSAGES, seed=seed, max_tokens=64,
                                                response_format={"type": "json_object"}).choices[0]
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
            finished += 1
    assert finished


@pytest.mark.parametrize("body, param, reason", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "Invalid type: nonsense"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema",
     "Missing"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "Invalid"),
    ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos", "structured output"),
    ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens", "structured output"),
])
def test_bad_formats_are_400s_naming_the_field(http, server, body, param, reason):
    response = http.post("/v1/chat/completions", json={"model": server.model, "messages": MESSAGES} | body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param and reason in response.json()["error"]["message"]


def test_responses_text_format_errors(client, server):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=server.model, input="x", text={"format": {
            "type": "json_schema", "name": "x", "schema": {"type": "object", "patternProperties": {"(": {}}}}})
    assert err.value.body["param"] == "text.format"
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=server.model, input="x", text={"format": {"type": "json_schema", "name": "x"}})
    assert err.value.body["param"] == "text.format.schema"
