"""Every error row of the protocol table on a live server: status code and OpenAI's envelope."""

import threading
import time

import httpx
import openai
import pytest

HI = [{"role": "user", "content": "hi"}]


def _envelope(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("body, param", [
    ({"messages": HI, "temperature": 5}, "temperature"),
    ({"messages": HI, "temperature": "hot"}, "temperature"),
    ({"messages": HI, "n": 0}, "n"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"messages": HI, "logprobs": True, "top_logprobs": 30}, "top_logprobs"),
    ({"messages": HI, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
    ({}, "messages"),
])
def test_bad_request_names_the_field(http, server, body, param):
    error = _envelope(http.post("/v1/chat/completions", json={"model": server.model} | body), 400)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, None)


def test_malformed_json(http):
    error = _envelope(http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [',
                                headers={"content-type": "application/json"}), 400)
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]


def test_token_id_outside_the_vocabulary(http, server):
    error = _envelope(http.post("/v1/completions", json={"model": server.model, "prompt": [1, 10**9]}), 400)
    assert error["param"] == "prompt"


def test_context_length_exceeded(client, server):
    with pytest.raises(openai.BadRequestError) as too_many_new:
        client.chat.completions.create(model=server.model, messages=HI, max_tokens=10**6)
    assert too_many_new.value.code == "context_length_exceeded"
    assert too_many_new.value.param == "max_tokens"
    assert "maximum context length" in too_many_new.value.message
    with pytest.raises(openai.BadRequestError) as long_prompt:
        client.completions.create(model=server.model, prompt=[11] * 5000, max_tokens=1, stream=True)
    assert long_prompt.value.code == "context_length_exceeded"
    assert long_prompt.value.param == "prompt"


def test_unknown_model(client, http, server):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-5", messages=HI)
    assert caught.value.code == "model_not_found"
    error = _envelope(http.get("/v1/models/gpt-5"), 404)
    assert error["code"] == "model_not_found"
    assert client.models.retrieve(server.model).id == server.model


def test_unknown_response_id(client, http, server):
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_does_not_exist")
    error = _envelope(http.get("/v1/responses/resp_does_not_exist"), 404)
    assert error["param"] == "response_id"
    previous = _envelope(http.post("/v1/responses", json={"model": server.model, "input": "hi",
                                                          "previous_response_id": "resp_does_not_exist"}), 404)
    assert previous["param"] == "previous_response_id"


def test_framework_errors_use_the_envelope(http, server):
    assert "/v1/nothing" in _envelope(http.get("/v1/nothing"), 404)["message"]
    # A method a /v1/ route does not take is an unknown route, as OpenAI answers it (Codex probes
    # /v1/responses/compact); beside the API it stays a 405.
    assert _envelope(http.post("/v1/models"), 404)["message"] == "Invalid URL (POST /v1/models)"
    assert _envelope(http.post("/v1/responses/compact", json={}), 404)["message"] == \
        "Invalid URL (POST /v1/responses/compact)"
    _envelope(http.post("/health"), 405)
    too_large = b'{"model": "' + b"x" * (8 * 1024 * 1024) + b'"}'
    _envelope(http.post("/v1/chat/completions", content=too_large, headers={"content-type": "application/json"}), 413)
    assert http.get("/health").status_code == 200


@pytest.fixture(scope="module")
def guarded_server(start_server):
    """A server that wants an API key and queues at most one request behind one running one."""
    return start_server("--api-key", "sk-test", "--max-num-seqs", "1", "--max-queue", "1")


def test_api_key(guarded_server):
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-test"}):
        error = _envelope(httpx.get(f"{guarded_server.base_url}/v1/models", headers=headers), 401)
        assert error["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        guarded_server.client(api_key="sk-wrong").models.list()
    assert [m.id for m in guarded_server.client(api_key="sk-test").models.list()] == [guarded_server.model]
    assert httpx.get(f"{guarded_server.base_url}/health").status_code == 200


def test_full_queue_is_429_with_retry_after(guarded_server):
    client = guarded_server.client(api_key="sk-test")
    long = dict(model=guarded_server.model, prompt="Once upon a time", max_tokens=1500, temperature=0,
                extra_body={"ignore_eos": True})
    running = client.completions.create(**long, stream=True)
    next(iter(running))  # the only running slot is taken
    queued = threading.Thread(target=lambda: client.completions.create(**(long | {"max_tokens": 8})), daemon=True)
    queued.start()
    deadline = time.monotonic() + 10
    while guarded_server.metric("nanoserve_requests_waiting") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    response = httpx.post(f"{guarded_server.base_url}/v1/completions", json={"model": guarded_server.model,
                          "prompt": "hi"}, headers={"Authorization": "Bearer sk-test"})
    error = _envelope(response, 429)
    assert response.headers["Retry-After"] == "1"
    assert error["code"] == "rate_limit_exceeded"
    running.close()
    queued.join(timeout=60)
    assert client.completions.create(model=guarded_server.model, prompt="hi", max_tokens=2).choices
