"""Two replicas sharing one response store (a SQLite file, and a PostgreSQL database), each an app
over ASGI with its own scripted engine: whichever replica gets a request, previous_response_id,
retrieve, delete, input_items and cancel behave as on one server."""

import asyncio
import json

import pytest

from server.api import response_store
from server.api.app import create_app
from server.api.response_store import SQLiteResponseStore
from server.api.response_store_postgres import PostgresResponseStore
from server.api.sealed_reasoning import ReasoningSeal
from server.engine.request import ChoiceDelta, GenerationRequest, RequestOutput
from tests.server.api.test_http_scripted import MODEL, ScriptedEngine, tokenizer  # noqa: F401 (a fixture)

SEAL = ReasoningSeal(bytes(range(32)))  # replicas share the reasoning key file


class SlowEngine(ScriptedEngine):
    """Each step takes `step_seconds`; an aborted request ends at its next step, as the engine ends it."""

    def __init__(self, tokenizer, pieces: list[str], step_seconds: float = 0.0):
        super().__init__(tokenizer, pieces)
        self.step_seconds = step_seconds
        self.started: list[str] = []
        self.aborted: set[str] = set()

    async def generate(self, request: GenerationRequest):
        self.started.append(request.request_id)
        generated = 0
        for step, piece in enumerate(self.pieces):
            await asyncio.sleep(self.step_seconds)
            prompt_tokens = len(request.prompt_token_ids)
            if request.request_id in self.aborted:
                yield RequestOutput(request.request_id, [ChoiceDelta(0, "", [], None, "abort")], prompt_tokens,
                                    generated, True)
                return
            token_ids = self.tokenizer.encode(piece)
            generated += len(token_ids)
            last = step == len(self.pieces) - 1
            yield RequestOutput(request.request_id, [ChoiceDelta(0, piece, token_ids, None, "stop" if last else None)],
                                prompt_tokens, generated, last)

    def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(params=["sqlite", "postgres"])
def store_factory(request, tmp_path):
    if request.param == "sqlite":
        return lambda: SQLiteResponseStore(tmp_path / "shared.sqlite3", 100)
    url = request.getfixturevalue("postgres").new_database()
    return lambda: PostgresResponseStore(url, 100)


@pytest.fixture
async def replicas(tokenizer, store_factory, monkeypatch):
    """Two test clients, each an app with its own engine and its own connection to the shared store."""
    monkeypatch.setattr(response_store, "RENEW_SECONDS", 0.1)
    engines = [SlowEngine(tokenizer, ["The", " harbour", " is", " west", "."]) for _ in range(2)]
    stores = [store_factory() for _ in engines]
    apps = [create_app(engine, MODEL, store, None, 1 << 20, SEAL) for engine, store in zip(engines, stores)]
    try:
        async with apps[0].test_app() as first, apps[1].test_app() as second:
            yield [first.test_client(), second.test_client()], engines
    finally:
        for store in stores:
            store.close()


async def _call(client, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    response = await client.open(path, method=method, json=body)
    return response.status_code, json.loads(await response.get_data(as_text=True))


@pytest.mark.anyio
async def test_a_conversation_continues_on_whichever_replica(replicas, tokenizer):
    (a, b), _ = replicas
    status, first = await _call(a, "POST", "/v1/responses", {"model": MODEL, "input": "Where is the harbour?"})
    assert status == 200 and first["status"] == "completed"
    body = {"model": MODEL, "input": "And the station?", "previous_response_id": first["id"]}
    status, second = await _call(b, "POST", "/v1/responses", body)
    assert status == 200
    turns = [{"role": "user", "content": "Where is the harbour?"},
             {"role": "assistant", "content": "The harbour is west."},
             {"role": "user", "content": "And the station?"}]
    assert second["usage"]["input_tokens"] == len(tokenizer.encode_chat(turns))  # turn 1 came from the store

    assert await _call(a, "GET", f"/v1/responses/{second['id']}") == (200, second)
    status, items = await _call(a, "GET", f"/v1/responses/{second['id']}/input_items")
    assert status == 200 and [i["content"][0]["text"] for i in items["data"]] == ["And the station?"]
    assert await _call(b, "DELETE", f"/v1/responses/{first['id']}") == (
        200, {"id": first["id"], "object": "response.deleted", "deleted": True})
    status, error = await _call(a, "GET", f"/v1/responses/{first['id']}")
    assert status == 404 and error["error"]["param"] == "response_id"


@pytest.mark.anyio
async def test_cancel_on_the_other_replica_stops_the_generation(replicas):
    (a, b), (engine_a, _) = replicas
    engine_a.step_seconds = 0.5  # five steps: 2.5 s unless cancelled
    running = asyncio.ensure_future(_call(a, "POST", "/v1/responses", {"model": MODEL, "input": "Where?"}))
    while not engine_a.started:
        await asyncio.sleep(0.02)
    response_id = engine_a.started[0]
    for _ in range(100):  # until replica A has stored it (just after the engine admitted it)
        status, in_progress = await _call(b, "GET", f"/v1/responses/{response_id}")
        if status == 200:
            break
        await asyncio.sleep(0.02)
    assert status == 200 and in_progress["status"] == "in_progress"

    started = asyncio.get_running_loop().time()
    status, cancelled = await _call(b, "POST", f"/v1/responses/{response_id}/cancel")
    assert status == 200 and cancelled["status"] == "cancelled" and cancelled["id"] == response_id
    assert asyncio.get_running_loop().time() - started < 2.0  # a renewal (0.1 s here) and a step, not the reply
    assert engine_a.aborted == {response_id}
    assert (await running)[1] == cancelled  # the replica generating it answered its client the same
    status, error = await _call(b, "POST", f"/v1/responses/{response_id}/cancel")
    assert status == 200 and error == cancelled  # cancelling again gives it back, as on one server
