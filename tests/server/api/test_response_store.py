"""The response store behind stored Responses, on both backends (SQLite, and a real PostgreSQL
server started for the tests): bounded oldest-first, durable, honest after a crash, versioned,
safe for several replicas writing at once, and able to cancel what another replica runs."""

import asyncio
import sqlite3

import pytest

from server.api import response_store
from server.api.response_store import STOPPED, SQLiteResponseStore
from server.api.response_store_postgres import PostgresResponseStore, without_password

CONVERSATION = [{"role": "user", "content": "hi"}]
ITEMS = [{"id": "msg_1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]


def _response(response_id: str, status: str = "completed") -> dict:
    return {"id": response_id, "object": "response", "status": status, "output": []}


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path):
    """Opens a store on one target, as often as asked (a restart, another replica); closes them all."""
    if request.param == "sqlite":
        target, cls = tmp_path / "r.sqlite3", SQLiteResponseStore
    else:
        target, cls = request.getfixturevalue("postgres").new_database(), PostgresResponseStore
    opened = []

    def open_store(max_responses: int = 100):
        opened.append(cls(target, max_responses))
        return opened[-1]

    yield open_store
    for store in opened:
        try:
            store.close()
        except Exception:  # closed by the test already
            pass


def test_oldest_responses_are_evicted_first(open_store):
    async def main():
        store = open_store(max_responses=2)
        for i in range(3):
            await store.add(_response(f"resp_{i}"), [], [])
        return [await store.get(f"resp_{i}") for i in range(3)]

    first, second, third = asyncio.run(main())
    assert first is None
    assert second.response["id"] == "resp_1" and third.response["id"] == "resp_2"


def test_responses_survive_reopening_and_unfinished_ones_read_as_failed(open_store):
    async def write():
        store = open_store()
        await store.add(_response("resp_done", "in_progress"), ITEMS, CONVERSATION)
        await store.update(_response("resp_done"), CONVERSATION + [{"role": "assistant", "content": "hello"}])
        await store.add(_response("resp_gone"), [], [])
        assert await store.delete("resp_gone") and not await store.delete("resp_gone")
        await store.add(_response("resp_cut", "in_progress"), [], [])  # the server stops here
        store.close()

    async def read():
        store = open_store()
        return [await store.get(i) for i in ("resp_done", "resp_gone", "resp_cut")]

    asyncio.run(write())
    done, gone, cut = asyncio.run(read())
    assert done.response == _response("resp_done") and done.input_items == ITEMS
    assert done.conversation[-1] == {"role": "assistant", "content": "hello"}
    assert gone is None
    assert cut.response == _response("resp_cut", "failed") | {"error": STOPPED}


def test_stored_items_are_found_by_id_output_items_first_until_their_response_goes(open_store):
    reply = {"id": "msg_reply", "type": "message", "role": "assistant", "content": []}
    replayed = reply | {"status": "completed"}  # a client sends an earlier output item back as input

    async def main():
        store = open_store(max_responses=2)
        await store.add(_response("resp_a", "in_progress"), ITEMS, CONVERSATION)
        found_running = await store.find_items(["msg_1", "msg_reply"])
        await store.update(_response("resp_a") | {"output": [reply]}, CONVERSATION)
        await store.add(_response("resp_b"), [replayed, {"type": "item_reference"}], CONVERSATION)
        found = await store.find_items(["msg_1", "msg_reply", "msg_nowhere"])
        await store.delete("resp_a")
        after_delete = await store.find_items(["msg_1", "msg_reply"])
        for i in range(2):  # evicts resp_b
            await store.add(_response(f"resp_{i}"), [], [])
        return found_running, found, after_delete, await store.find_items(["msg_reply"])

    found_running, found, after_delete, after_eviction = asyncio.run(main())
    assert found_running == {"msg_1": ITEMS[0]}
    assert found == {"msg_1": ITEMS[0], "msg_reply": reply}
    assert after_delete == {"msg_reply": replayed} and after_eviction == {}


def test_unusable_sqlite_path_is_a_clear_error(tmp_path):
    (tmp_path / "dir.sqlite3").mkdir()
    with pytest.raises(RuntimeError, match="--response-store: cannot open the response store .*dir.sqlite3"):
        SQLiteResponseStore(tmp_path / "dir.sqlite3", max_responses=10)


def test_unreachable_postgres_is_a_clear_error_without_the_password():
    pytest.importorskip("psycopg")
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"postgresql://nanoserve:s3cret@127.0.0.1:{sock.getsockname()[1]}/responses"
    with pytest.raises(RuntimeError) as raised:
        PostgresResponseStore(url, max_responses=10)
    message = str(raised.value)
    assert message.startswith("--response-store: cannot open the response store "
                              "postgresql://nanoserve:***@127.0.0.1:") and "\n" not in message
    assert "s3cret" not in message


def test_passwords_are_hidden_wherever_the_url_carries_them():
    assert without_password("postgresql://u:p@h:5432/d") == "postgresql://u:***@h:5432/d"
    assert without_password("postgres://u@h/d?password=p&sslmode=require") == "postgres://u@h/d?password=***&sslmode=require"
    assert without_password("postgresql:///d") == "postgresql:///d"


def test_a_store_from_before_schema_versions_is_migrated(tmp_path):
    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)  # as nanoserve made it before the schema had a version
    old.execute(SQLiteResponseStore.migrations[0][0])
    old.executemany("INSERT INTO responses (id, status, response, input_items, conversation) VALUES (?, ?, ?, ?, ?)",
                    [("resp_old", "completed", '{"id": "resp_old", "status": "completed", "output": [{"id": "msg_o"}]}',
                      '[{"id": "msg_i"}, {"type": "item_without_id"}]', '[{"role": "user"}]'),
                     ("resp_cut", "in_progress", '{"id": "resp_cut", "status": "in_progress"}', "[]", "[]")])
    old.commit()
    old.close()

    async def read():
        store = SQLiteResponseStore(path, max_responses=10)
        try:
            return await store.get("resp_old"), await store.get("resp_cut"), await store.find_items(["msg_o", "msg_i"])
        finally:
            store.close()

    done, cut, items = asyncio.run(read())
    assert done.response["output"] == [{"id": "msg_o"}] and done.conversation == [{"role": "user"}]
    assert items == {"msg_o": {"id": "msg_o"}, "msg_i": {"id": "msg_i"}}  # the old rows' items, indexed
    assert cut.response["status"] == "failed"
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == len(SQLiteResponseStore.migrations)


def test_a_store_from_a_newer_nanoserve_is_refused(tmp_path):
    path = tmp_path / "new.sqlite3"
    SQLiteResponseStore(path, max_responses=10).close()
    newer = sqlite3.connect(path)
    newer.execute("PRAGMA user_version = 99")
    newer.close()
    with pytest.raises(RuntimeError, match="schema is version 99, made by a newer nanoserve"):
        SQLiteResponseStore(path, max_responses=10)


def test_a_postgres_store_from_a_newer_nanoserve_is_refused(postgres):
    import psycopg

    url = postgres.new_database()
    PostgresResponseStore(url, max_responses=10).close()
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("UPDATE nanoserve_schema SET version = 99")
    with pytest.raises(RuntimeError, match="schema is version 99, made by a newer nanoserve"):
        PostgresResponseStore(url, max_responses=10)


def test_replicas_starting_together_create_the_postgres_schema_once(postgres):
    import psycopg
    from concurrent.futures import ThreadPoolExecutor

    url = postgres.new_database()
    with ThreadPoolExecutor(4) as pool:
        stores = list(pool.map(lambda _: PostgresResponseStore(url, max_responses=10), range(4)))
    for store in stores:
        store.close()
    with psycopg.connect(url) as connection:
        assert connection.execute("SELECT version FROM nanoserve_schema").fetchall() == [(len(PostgresResponseStore.migrations),)]


def test_concurrent_writers_never_lose_or_duplicate_a_response(open_store):
    replicas, per_replica = 4, 12

    async def replica(store, r: int) -> None:
        for i in range(per_replica):
            response_id = f"resp_{r}_{i}"
            await store.add(_response(response_id, "in_progress"), ITEMS, CONVERSATION)
            await store.update(_response(response_id), CONVERSATION + [{"role": "assistant", "content": str(i)}])

    async def main():
        stores = [open_store(max_responses=1000) for _ in range(replicas)]
        await asyncio.gather(*(replica(store, r) for r, store in enumerate(stores)))
        with pytest.raises(stores[0].Error):  # the same id twice is refused, never overwritten
            await stores[0].add(_response("resp_0_0", "in_progress"), [], [])
        return [await stores[-1].get(f"resp_{r}_{i}") for r in range(replicas) for i in range(per_replica)]

    found = asyncio.run(main())
    assert all(s is not None and s.response["status"] == "completed" for s in found)
    assert [s.conversation[-1]["content"] for s in found] == [str(i) for _ in range(replicas) for i in range(per_replica)]


def test_cancel_reaches_the_replica_that_runs_the_response(open_store, monkeypatch):
    monkeypatch.setattr(response_store, "RENEW_SECONDS", 0.1)

    async def main():
        running, asked = open_store(), open_store()
        aborts = []

        def abort():  # what the API does: abort the engine request, which ends it as cancelled
            aborts.append("abort")
            asyncio.ensure_future(running.update(_response("resp_1", "cancelled"), CONVERSATION))

        await running.add(_response("resp_1", "in_progress"), ITEMS, CONVERSATION, abort=abort)
        cancelled = await asyncio.wait_for(asked.cancel("resp_1"), timeout=5)
        await asyncio.sleep(2 * response_store.RENEW_SECONDS)  # later renewals do not abort it again
        return cancelled, aborts, await asked.cancel("resp_missing")

    cancelled, aborts, missing = asyncio.run(main())
    assert cancelled.response == _response("resp_1", "cancelled")
    assert aborts == ["abort"] and missing is None


def test_a_response_whose_replica_is_gone_reads_as_failed(open_store, monkeypatch):
    monkeypatch.setattr(response_store, "LEASE_SECONDS", 0.6)
    monkeypatch.setattr(response_store, "RENEW_SECONDS", 0.1)

    async def main():
        alive, gone, reader = open_store(), open_store(), open_store()
        await alive.add(_response("resp_alive", "in_progress"), [], [])
        await gone.add(_response("resp_gone", "in_progress"), [], [])
        gone._running.clear()  # its server was killed: nothing renews its lease any more
        await asyncio.sleep(1.2)
        return await reader.get("resp_alive"), await reader.get("resp_gone")

    alive, gone = asyncio.run(main())
    assert alive.response["status"] == "in_progress"
    assert gone.response == _response("resp_gone", "failed") | {"error": STOPPED}
