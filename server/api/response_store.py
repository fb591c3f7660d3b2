"""Stored Responses API objects in SQLite, so they survive a restart.

One connection, used only from one worker thread: sqlite3 calls block, so they stay off the event
loop, and a single thread serialises every read and write without locks. Rows keep, besides the
response object, its input items (for `GET …/input_items`) and the whole conversation as chat
messages (for a later `previous_response_id`). Past `max_responses`, the oldest rows go first.
The file holds people's conversations, so it is created readable by its owner only (0600); SQLite
gives its journal the database's permissions.
"""

import asyncio
import json
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL,
    conversation TEXT NOT NULL
)
"""


@dataclass
class StoredResponse:
    response: dict
    input_items: list[dict]
    conversation: list[dict]


class ResponseStore:
    def __init__(self, path: str | Path, max_responses: int):
        if max_responses < 1:
            raise ValueError(f"--response-store-max must be at least 1, got {max_responses}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._max_responses = max_responses
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="response-store")
        try:
            self._db = self._thread.submit(self._open).result()
        except sqlite3.Error as err:
            self._thread.shutdown()
            raise RuntimeError(f"cannot open the response store {self.path}: {err}") from None

    def _open(self) -> sqlite3.Connection:
        try:
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))  # sqlite would create it 0644
        except OSError as err:
            raise sqlite3.OperationalError(str(err)) from None
        db = sqlite3.connect(self.path, check_same_thread=False)  # used by the one worker thread only
        db.execute(_SCHEMA)
        # A response that was being generated when the server stopped will never finish.
        unfinished = "SELECT id, response FROM responses WHERE status IN ('queued', 'in_progress')"
        for response_id, text in db.execute(unfinished).fetchall():
            response = json.loads(text) | {
                "status": "failed",
                "error": {"code": "server_error", "message": "The server stopped before this response finished."},
            }
            db.execute("UPDATE responses SET status = ?, response = ? WHERE id = ?",
                       ("failed", json.dumps(response), response_id))
        db.commit()
        return db

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def add(self, response: dict, input_items: list[dict], conversation: list[dict]) -> None:
        await self._run(self._add, response, input_items, conversation)

    def _add(self, response: dict, input_items: list[dict], conversation: list[dict]) -> None:
        self._db.execute(
            "INSERT INTO responses (id, status, response, input_items, conversation) VALUES (?, ?, ?, ?, ?)",
            (response["id"], response["status"], json.dumps(response), json.dumps(input_items), json.dumps(conversation)),
        )
        self._db.execute(
            "DELETE FROM responses WHERE seq NOT IN (SELECT seq FROM responses ORDER BY seq DESC LIMIT ?)",
            (self._max_responses,),
        )
        self._db.commit()

    async def update(self, response: dict, conversation: list[dict]) -> None:
        """Replace a stored response (a no-op once it was deleted or evicted)."""
        await self._run(self._update, response, conversation)

    def _update(self, response: dict, conversation: list[dict]) -> None:
        self._db.execute(
            "UPDATE responses SET status = ?, response = ?, conversation = ? WHERE id = ?",
            (response["status"], json.dumps(response), json.dumps(conversation), response["id"]),
        )
        self._db.commit()

    async def get(self, response_id: str) -> StoredResponse | None:
        return await self._run(self._get, response_id)

    def _get(self, response_id: str) -> StoredResponse | None:
        row = self._db.execute(
            "SELECT response, input_items, conversation FROM responses WHERE id = ?", (response_id,)
        ).fetchone()
        return None if row is None else StoredResponse(*(json.loads(column) for column in row))

    async def find_items(self, item_ids: list[str]) -> dict[str, dict]:
        """The stored items (output items of stored responses, then their listed input items) that
        have these ids, by id; ids not found are left out. One scan of the table for all of them."""
        return await self._run(self._find_items, item_ids)

    def _find_items(self, item_ids: list[str]) -> dict[str, dict]:
        marks = ", ".join("?" * len(item_ids))
        rows = self._db.execute(
            f"SELECT item.value, 0 FROM responses, json_each(responses.response, '$.output') AS item "
            f"WHERE json_extract(item.value, '$.id') IN ({marks}) UNION ALL "
            f"SELECT item.value, 1 FROM responses, json_each(responses.input_items) AS item "
            f"WHERE json_extract(item.value, '$.id') IN ({marks}) ORDER BY 2 DESC",
            (*item_ids, *item_ids),
        ).fetchall()
        return {item["id"]: item for item in (json.loads(text) for text, _ in rows)}  # output items win

    async def delete(self, response_id: str) -> bool:
        return await self._run(self._delete, response_id)

    def _delete(self, response_id: str) -> bool:
        deleted = self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0
        self._db.commit()
        return deleted

    def close(self) -> None:
        """Finish every queued write, then close the database."""
        self._thread.submit(self._db.close).result()
        self._thread.shutdown()
