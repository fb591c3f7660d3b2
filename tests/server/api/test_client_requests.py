"""Request bodies as agent clients send them (client_requests/*.json, written from each client's
source: fields, tools and item shapes as they are, long instruction texts shortened), replayed in
order against a live server on the demo checkpoint: each gets the status its file records, a 2xx or
a documented 400/404, and every 2xx body validates against the official SDK's types.

A later request may take values from the answer before it: a string "$previous.a.b.-1.c" is that
path in the previous response, a list entry "$previous.output" is spliced in, "$model" is the
served model."""

import json
from pathlib import Path

import httpx
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter


RECORDED = sorted((Path(__file__).parent / "client_requests").glob("*.json"))
STREAM_EVENT = TypeAdapter(ResponseStreamEvent)


def _lookup(previous: dict, path: str):
    value = previous
    for key in path.split("."):
        value = value[int(key)] if isinstance(value, list) else value[key]
    return value


def _resolve(value, previous: dict | None, model: str):
    if isinstance(value, dict):
        return {key: _resolve(item, previous, model) for key, item in value.items()}
    if isinstance(value, list):
        resolved = []
        for item in value:
            if item == "$previous.output":
                resolved += previous["output"]
            else:
                resolved.append(_resolve(item, previous, model))
        return resolved
    if value == "$model":
        return model
    if isinstance(value, str) and value.startswith("$previous."):
        return _lookup(previous, value.removeprefix("$previous."))
    return value


def _final(path: str, response: httpx.Response) -> dict:
    """The answer as one object (a stream's final response or its merged chunks), checked against the SDK's types."""
    if not response.headers["content-type"].startswith("text/event-stream"):
        payload = response.json()
        (Response if path == "/v1/responses" else ChatCompletion).model_validate(payload, strict=True)
        return payload
    data = [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]
    if path == "/v1/responses":
        for event in data:
            STREAM_EVENT.validate_python(event, strict=True)
        assert data[-1]["type"] in ("response.completed", "response.incomplete"), data[-1]
        return data[-1]["response"]
    for chunk in data:
        ChatCompletionChunk.model_validate(chunk, strict=True)
    return data[-1]


@pytest.mark.parametrize("recorded", RECORDED, ids=[path.stem for path in RECORDED])
def test_recorded_client_requests_get_the_answers_recorded(demo_server, recorded):
    conversation = json.loads(recorded.read_text())
    previous = None
    with httpx.Client(base_url=demo_server.base_url, timeout=300) as http:
        for i, request in enumerate(conversation["requests"]):
            body = _resolve(request["body"], previous, demo_server.model)
            response = http.post(request["path"], json=body)
            assert response.status_code == request["status"], (i, response.text[:2000])
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"]
                continue
            previous = _final(request["path"], response)
