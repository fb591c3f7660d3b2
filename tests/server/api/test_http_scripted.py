"""The app over ASGI with a scripted engine: replies no random checkpoint produces (Qwen3
reasoning), engine failures before and during a stream, and keep-alives while the engine is quiet."""

import asyncio
import json

import pytest

from model.tokenizer import Tokenizer
from server.api import engine_stream
from server.api.app import create_app
from server.engine.request import (
    ChoiceDelta,
    EngineOverloaded,
    EngineStats,
    GenerationRequest,
    RequestFailed,
    RequestOutput,
    StructuredOutput,
)
from server.api.response_store import SQLiteResponseStore
from server.api.sealed_reasoning import ReasoningSeal

MODEL = "scripted"
THINKING_REPLY = ["<think>", "\nThe user", " greets me.\n", "</think>", "\n\n", "Hello", " there!"]
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def anyio_backend():
    return "asyncio"


class ScriptedEngine:
    """Stands in for `server.engine.async_engine.AsyncEngine`: every choice replies `pieces`, one per step;
    the first request to reach step `fail_at` fails there."""

    max_model_len = 4096
    vocab_size = 151669
    is_alive = True

    def __init__(self, tokenizer: Tokenizer, pieces: list[str], fail_at: int | None = None,
                 failure: Exception = RequestFailed("the engine failed while running this request: boom"),
                 admission_error: Exception | None = None, first_output_delay: float = 0.0):
        self.tokenizer = tokenizer
        self.pieces = pieces
        self.fail_at = fail_at
        self.failure = failure
        self.admission_error = admission_error
        self.first_output_delay = first_output_delay
        self.requests: list[GenerationRequest] = []  # every request generated, in order
        self.compiled: list[StructuredOutput] = []  # every constraint compiled, in order

    async def compile_structured_output(self, constraint: StructuredOutput) -> None:
        self.compiled.append(constraint)

    async def generate(self, request: GenerationRequest):
        self.requests.append(request)
        if self.admission_error is not None:
            raise self.admission_error
        await asyncio.sleep(self.first_output_delay)
        generated = 0
        for step, piece in enumerate(self.pieces):
            if step == self.fail_at:
                self.fail_at = None  # only the first request fails
                raise self.failure
            token_ids = self.tokenizer.encode(piece)
            generated += len(token_ids) * request.params.n
            last = step == len(self.pieces) - 1
            choices = [ChoiceDelta(i, piece, token_ids, None, "stop" if last else None) for i in range(request.params.n)]
            yield RequestOutput(request.request_id, choices, len(request.prompt_token_ids), generated, last)

    def abort(self, request_id: str) -> None:
        pass

    def stats(self) -> EngineStats:
        return EngineStats(num_running=0, num_waiting=0, kv_blocks_used=0, kv_blocks_total=8, num_preemptions=0)


@pytest.fixture(scope="module")
def tokenizer(chat_checkpoint) -> Tokenizer:
    return Tokenizer(chat_checkpoint)


@pytest.fixture
def call(tokenizer, tmp_path):
    """POST a JSON body to an app over `engine`; (status, headers, body text)."""

    async def call(engine_kwargs: dict, path: str, body: dict, then: tuple[str, str] | None = None):
        store = SQLiteResponseStore(tmp_path / "responses.sqlite3", 100)
        app = create_app(ScriptedEngine(tokenizer, **engine_kwargs), MODEL, store, None, 1 << 20,
                         ReasoningSeal(bytes(range(32))))
        try:
            async with app.test_app() as test_app:
                client = test_app.test_client()
                response = await client.post(path, json=body)
                text = await response.get_data(as_text=True)
                result = (response.status_code, response.headers, text)
                if then is not None:  # a second request to the same app
                    method, then_path = then
                    follow = await client.open(then_path, method=method, json={"model": MODEL, "messages": HI})
                    result += (follow.status_code, await follow.get_data(as_text=True))
                return result
        finally:
            store.close()

    return call


def _data(text: str) -> list[str]:
    """The `data:` line of every event."""
    return [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]


@pytest.mark.anyio
async def test_chat_splits_reasoning_from_content(call):
    status, _, text = await call({"pieces": THINKING_REPLY}, "/v1/chat/completions", {"model": MODEL, "messages": HI})
    assert status == 200
    message = json.loads(text)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "Hello there!", "reasoning_content": "The user greets me.",
                       "reasoning": "The user greets me."}


@pytest.mark.anyio
async def test_chat_stream_splits_reasoning_from_content(call):
    body = {"model": MODEL, "messages": HI, "stream": True}
    status, _, text = await call({"pieces": THINKING_REPLY}, "/v1/chat/completions", body)
    assert status == 200
    *chunks, done = _data(text)
    assert done == "[DONE]"
    deltas = [json.loads(c)["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user greets me."
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    assert "".join(d.get("content", "") for d in deltas) == "Hello there!"
    last_reasoning = max(i for i, d in enumerate(deltas) if "reasoning_content" in d)
    first_content = min(i for i, d in enumerate(deltas) if d.get("content"))
    assert last_reasoning < first_content


@pytest.mark.anyio
async def test_responses_put_reasoning_in_its_own_item_first(call):
    body = {"model": MODEL, "input": "hi", "stream": True}
    status, _, text = await call({"pieces": THINKING_REPLY}, "/v1/responses", body)
    assert status == 200
    events = [json.loads(d) for d in _data(text)]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [(e["output_index"], e["item"]["type"]) for e in added] == [(0, "reasoning"), (1, "message")]
    reasoning_events = [e["type"] for e in events if e.get("item_id") == added[0]["item"]["id"]]
    assert reasoning_events[0] == "response.content_part.added" and reasoning_events[-1] == "response.content_part.done"
    assert "response.reasoning_text.done" in reasoning_events
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    reasoning, message = final["output"]
    assert reasoning["type"] == "reasoning" and reasoning["summary"] == []
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "The user greets me."}]
    assert message["content"][0]["text"] == "Hello there!"
    assert final["usage"]["output_tokens_details"]["reasoning_tokens"] > 0


@pytest.mark.anyio
@pytest.mark.parametrize("failure, message", [
    (RequestFailed("the engine failed while running this request: boom"),
     "The server had an error while processing your request: the engine failed while running this request: boom"),
    (RuntimeError("a bug"), "The server had an error while processing your request."),  # details stay in the log
])
async def test_a_failure_is_a_500_and_the_app_keeps_serving(call, failure, message):
    status, _, text, after_status, after_text = await call(
        {"pieces": ["a", "b"], "fail_at": 1, "failure": failure}, "/v1/chat/completions",
        {"model": MODEL, "messages": HI}, then=("POST", "/v1/chat/completions"))
    assert status == 500
    assert json.loads(text)["error"] == {"message": message, "type": "server_error", "param": None,
                                         "code": "server_error"}
    assert after_status == 200 and json.loads(after_text)["choices"][0]["message"]["content"] == "ab"


@pytest.mark.anyio
async def test_failure_mid_stream_ends_with_an_error_event(call):
    body = {"model": MODEL, "messages": HI, "stream": True}
    status, _, text = await call({"pieces": ["a", "b", "c"], "fail_at": 2}, "/v1/chat/completions", body)
    assert status == 200
    *chunks, error, done = _data(text)
    assert "".join(json.loads(c)["choices"][0]["delta"].get("content", "") for c in chunks) == "ab"
    assert json.loads(error)["error"]["type"] == "server_error"
    assert done == "[DONE]"


@pytest.mark.anyio
async def test_failure_mid_response_stream_is_response_failed(call):
    body = {"model": MODEL, "input": "hi", "stream": True}
    status, _, text = await call({"pieces": ["a", "b", "c"], "fail_at": 2}, "/v1/responses", body)
    assert status == 200
    events = [json.loads(d) for d in _data(text)]
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"]["code"] == "server_error"
    assert [e["type"] for e in events].count("response.output_item.done") == 1  # the open item is closed


@pytest.mark.anyio
@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "stream": True}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": True}),
    ("/v1/responses", {"model": MODEL, "input": "hi", "stream": True}),
])
async def test_overload_is_429_before_a_stream_starts(call, path, body):
    status, headers, text = await call({"pieces": ["a"], "admission_error": EngineOverloaded("queue full")}, path, body)
    assert status == 429 and headers["Retry-After"] == "1"
    assert json.loads(text)["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.anyio
async def test_keepalive_comments_while_the_engine_is_quiet(call, monkeypatch):
    monkeypatch.setattr(engine_stream, "ADMISSION_WAIT_SECONDS", 0.05)
    monkeypatch.setattr(engine_stream, "KEEPALIVE_SECONDS", 0.05)
    body = {"model": MODEL, "prompt": "hi", "stream": True}
    status, _, text = await call({"pieces": ["a"], "first_output_delay": 0.5}, "/v1/completions", body)
    assert status == 200
    events = text.split("\n\n")
    assert events[0] == ": keep-alive"
    assert json.loads(_data(text)[0])["choices"][0]["text"] == "a"
