"""The SQLite store behind stored Responses: bounded oldest-first, durable, honest after a crash."""

import asyncio

import pytest

from server.api.response_store import ResponseStore


def _response(response_id: str, status: str = "completed") -> dict:
    return {"id": response_id, "object": "response", "status": status, "output": []}


def test_oldest_responses_are_evicted_first(tmp_path):
    async def main():
        store = ResponseStore(tmp_path / "r.sqlite3", max_responses=2)
        try:
            for i in range(3):
                await store.add(_response(f"resp_{i}"), [], [])
            return [await store.get(f"resp_{i}") for i in range(3)]
        finally:
            store.close()

    first, second, third = asyncio.run(main())
    assert first is None
    assert second.response["id"] == "resp_1" and third.response["id"] == "resp_2"


def test_responses_survive_reopening_and_unfinished_ones_read_as_failed(tmp_path):
    path = tmp_path / "r.sqlite3"
    conversation = [{"role": "user", "content": "hi"}]
    items = [{"id": "msg_1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]

    async def write():
        store = ResponseStore(path, max_responses=10)
        await store.add(_response("resp_done", "in_progress"), items, conversation)
        await store.update(_response("resp_done"), conversation + [{"role": "assistant", "content": "hello"}])
        await store.add(_response("resp_gone"), [], [])
        assert await store.delete("resp_gone") and not await store.delete("resp_gone")
        await store.add(_response("resp_cut", "in_progress"), [], [])  # the server stops here
        store.close()

    async def read():
        store = ResponseStore(path, max_responses=10)
        try:
            return [await store.get(i) for i in ("resp_done", "resp_gone", "resp_cut")]
        finally:
            store.close()

    asyncio.run(write())
    done, gone, cut = asyncio.run(read())
    assert done.response == _response("resp_done") and done.input_items == items
    assert done.conversation[-1] == {"role": "assistant", "content": "hello"}
    assert gone is None
    assert cut.response["status"] == "failed" and cut.response["error"]["code"] == "server_error"


def test_unusable_path_is_a_clear_error(tmp_path):
    (tmp_path / "dir.sqlite3").mkdir()
    with pytest.raises(RuntimeError, match="cannot open the response store"):
        ResponseStore(tmp_path / "dir.sqlite3", max_responses=10)
