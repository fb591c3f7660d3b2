"""Stored Responses API objects, shared by every replica that opens the same store.

One interface, two backends: a SQLite file (the embedded default; one machine, survives restarts)
and a PostgreSQL database (`--response-store postgresql://…`, response_store_postgres.py), which
replicas behind a router share. The API layer sees only `ResponseStore`; the statements are written
once here, and each backend supplies its connection, its clock, its transactions and its schema.

Each store runs its statements on one worker thread with one connection: the drivers block, so they
stay off the event loop, and one thread serialises this replica's reads and writes. Rows keep, besides
the response object, its input items (for `GET …/input_items`) and the whole conversation as chat
messages (for a later `previous_response_id`). Past `max_responses`, the oldest rows go first.

A response being generated is leased by the replica generating it: the lease is renewed every
RENEW_SECONDS, and a row whose lease has run out (its server was killed, or lost the database) reads
as `failed`. Cancelling a response that another replica is generating sets a flag on its row; that
replica sees the flag when it next renews its leases, aborts the generation and stores the cancelled
response, which the replica that was asked then reads back and answers with.

A migration is a list of statements; the schema's version is how many have run. A store made by an
older nanoserve is brought up to date when it is opened; one made by a newer nanoserve is refused.
"""

import asyncio
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

UNFINISHED = ("queued", "in_progress")
# A running response's lease lasts this long unless renewed; long enough to ride out a busy database.
LEASE_SECONDS = 10.0
# How often a replica renews its leases and looks for cancel requests (a cancel's latency, at most).
RENEW_SECONDS = 0.5
# How often a cancel asked of another replica's response looks for the response's final form.
CANCEL_POLL_SECONDS = 0.1
STOPPED = {"code": "server_error", "message": "The server generating this response stopped before it finished."}


@dataclass
class StoredResponse:
    response: dict
    input_items: list[dict]
    conversation: list[dict]


def _failed(response: dict) -> dict:
    return response | {"status": "failed", "error": STOPPED}


class ResponseStore(ABC):
    """What every backend shares. A backend sets `Error` (its driver's exception), `table`, `now` (SQL
    for the database clock, in seconds since the epoch) and `migrations`, and implements `_connect`,
    `_schema_version`, `_set_schema_version` and `_transaction`. `?` marks a parameter in the SQL here.
    A new query (say, finding a stored item by its id) is one method here; a new table or column is one
    more migration in each backend's list."""

    Error: type[Exception]
    table: str
    items_table: str  # (response_id, item_id, is_output, item): every item with an id, for item_reference
    now: str
    migrations: tuple[tuple[str, ...], ...]

    def __init__(self, target: str, max_responses: int):
        if max_responses < 1:
            raise ValueError(f"--response-store-max must be at least 1, got {max_responses}")
        self.target = target
        self._max_responses = max_responses
        # Unfinished responses this replica generates: id -> what aborts it (None once asked to).
        self._running: dict[str, Callable[[], None] | None] = {}
        self._lease_keeper: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="response-store")
        try:
            self._db = self._thread.submit(self._open).result()
        except self.Error as err:
            self._thread.shutdown()
            reason = " ".join(str(err).split())  # drivers' messages can span lines
            raise RuntimeError(f"--response-store: cannot open the response store {self.describe()}: {reason}") from None

    def describe(self) -> str:
        """The store as messages name it (never with a password)."""
        return self.target

    # What a backend provides.

    @abstractmethod
    def _connect(self) -> Any:
        """A new connection to the database, for the worker thread."""

    @abstractmethod
    def _schema_version(self) -> int:
        """How many migrations the database has had (called inside the migration's transaction)."""

    @abstractmethod
    def _set_schema_version(self, version: int) -> None: ...

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[None]:
        """Committed when the block ends, rolled back if it raises."""

    def _execute(self, sql: str, params: tuple = ()) -> Any:
        return self._db.execute(sql.format(table=self.table, items=self.items_table, now=self.now), params)

    # On the worker thread.

    def _open(self) -> Any:
        self._db = self._connect()
        try:
            with self._transaction():
                self._migrate()
        except BaseException:
            self._db.close()
            raise
        return self._db

    def _migrate(self) -> None:
        version = self._schema_version()
        if version > len(self.migrations):
            raise self.Error(f"its schema is version {version}, made by a newer nanoserve than this one "
                             f"(which knows versions up to {len(self.migrations)})")
        for statements in self.migrations[version:]:
            for statement in statements:
                self._execute(statement)
        if version < len(self.migrations):
            self._set_schema_version(len(self.migrations))

    def _add(self, response: dict, input_items: list[dict], conversation: list[dict]) -> None:
        with self._transaction():
            self._execute(
                "INSERT INTO {table} (id, status, response, input_items, conversation, lease_until) "
                "VALUES (?, ?, ?, ?, ?, {now} + ?)",
                (response["id"], response["status"], json.dumps(response), json.dumps(input_items),
                 json.dumps(conversation), LEASE_SECONDS),
            )
            self._index_items(response["id"], input_items, is_output=False)
            self._index_items(response["id"], response.get("output", []), is_output=True)
        self._evict()

    def _index_items(self, response_id: str, items: list[dict], is_output: bool) -> None:
        for item in items:
            if isinstance(item.get("id"), str):
                self._execute("INSERT INTO {items} (response_id, item_id, is_output, item) VALUES (?, ?, ?, ?)",
                              (response_id, item["id"], is_output, json.dumps(item)))

    def _find_items(self, item_ids: list[str]) -> dict[str, dict]:
        marks = ", ".join("?" * len(item_ids))
        rows = self._execute(f"SELECT item FROM {{items}} WHERE item_id IN ({marks}) ORDER BY is_output",
                             tuple(item_ids)).fetchall()
        return {item["id"]: item for item in (json.loads(row[0]) for row in rows)}  # output items come last: they win

    def _may_evict(self) -> bool:
        """Whether this transaction may evict (a backend can leave it to a replica already evicting)."""
        return True

    def _evict(self) -> None:
        """Drop all but the newest `max_responses` rows."""
        with self._transaction():
            if self._may_evict():
                evicted = self._execute(
                    "DELETE FROM {table} WHERE seq <= (SELECT seq FROM {table} ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                    (self._max_responses,),
                ).rowcount
                if evicted:
                    self._execute("DELETE FROM {items} WHERE response_id NOT IN (SELECT id FROM {table})")

    def _update(self, response: dict, conversation: list[dict]) -> None:
        with self._transaction():
            updated = self._execute(
                "UPDATE {table} SET status = ?, response = ?, conversation = ?, lease_until = {now} + ? WHERE id = ?",
                (response["status"], json.dumps(response), json.dumps(conversation), LEASE_SECONDS, response["id"]),
            ).rowcount
            if updated:
                self._execute("DELETE FROM {items} WHERE response_id = ? AND is_output", (response["id"],))
                self._index_items(response["id"], response.get("output", []), is_output=True)

    def _get(self, response_id: str) -> StoredResponse | None:
        row = self._execute(
            "SELECT response, input_items, conversation, status, lease_until < {now} FROM {table} WHERE id = ?",
            (response_id,),
        ).fetchone()
        if row is None:
            return None
        stored = StoredResponse(*(json.loads(column) for column in row[:3]))
        status, lease_lapsed = row[3], row[4]
        if status in UNFINISHED and lease_lapsed:
            stored.response = self._fail_lapsed(stored.response)
        return stored

    def _fail_lapsed(self, response: dict) -> dict:
        """Store a lapsed response as failed, unless its replica finished or renewed it meanwhile."""
        failed = _failed(response)
        with self._transaction():
            updated = self._execute(
                "UPDATE {table} SET status = 'failed', response = ? "
                "WHERE id = ? AND status IN ('queued', 'in_progress') AND lease_until < {now}",
                (json.dumps(failed), response["id"]),
            ).rowcount
        current = None if updated else self._get(response["id"])
        return failed if current is None else current.response

    def _delete(self, response_id: str) -> bool:
        with self._transaction():
            self._execute("DELETE FROM {items} WHERE response_id = ?", (response_id,))
            return self._execute("DELETE FROM {table} WHERE id = ?", (response_id,)).rowcount > 0

    def _request_cancel(self, response_id: str) -> StoredResponse | None:
        with self._transaction():
            self._execute(
                "UPDATE {table} SET cancel_requested = TRUE WHERE id = ? AND status IN ('queued', 'in_progress')",
                (response_id,),
            )
        return self._get(response_id)

    def _renew(self, response_ids: list[str]) -> list[str]:
        """Renew these responses' leases; the ids among them whose cancel was asked for."""
        marks = ", ".join("?" * len(response_ids))
        with self._transaction():
            self._execute(f"UPDATE {{table}} SET lease_until = {{now}} + ? WHERE id IN ({marks})",
                          (LEASE_SECONDS, *response_ids))
            rows = self._execute(f"SELECT id FROM {{table}} WHERE id IN ({marks}) AND cancel_requested",
                                 tuple(response_ids)).fetchall()
        return [row[0] for row in rows]

    def _close(self) -> None:
        for response_id in self._running:
            stored = self._get(response_id)
            if stored is not None and stored.response["status"] in UNFINISHED:
                self._update(_failed(stored.response), stored.conversation)
        self._db.close()

    # The interface.

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def add(self, response: dict, input_items: list[dict], conversation: list[dict],
                  abort: Callable[[], None] | None = None) -> None:
        """Store a new response. While it is unfinished this replica holds its lease, and `abort` is
        called (once) if another replica is asked to cancel it."""
        await self._run(self._add, response, input_items, conversation)
        if response["status"] in UNFINISHED:
            self._running[response["id"]] = abort
            if self._lease_keeper is None or self._lease_keeper.done():
                self._lease_keeper = asyncio.ensure_future(self._keep_leases())

    async def update(self, response: dict, conversation: list[dict]) -> None:
        """Replace a stored response (a no-op once it was deleted or evicted)."""
        await self._run(self._update, response, conversation)
        if response["status"] not in UNFINISHED:
            self._running.pop(response["id"], None)

    async def get(self, response_id: str) -> StoredResponse | None:
        return await self._run(self._get, response_id)

    async def find_items(self, item_ids: list[str]) -> dict[str, dict]:
        """The stored items (output items of stored responses, and their listed input items) that
        have these ids, by id; an output item wins over an input item of the same id (a client
        replaying it); ids not found are left out."""
        return await self._run(self._find_items, item_ids)

    async def delete(self, response_id: str) -> bool:
        return await self._run(self._delete, response_id)

    async def cancel(self, response_id: str) -> StoredResponse | None:
        """Ask whichever replica generates `response_id` to cancel it; its final form once stored (a
        response that had already finished comes back as it is). None if there is no such response."""
        stored = await self._run(self._request_cancel, response_id)
        # The replica aborts within RENEW_SECONDS; one that has gone loses its lease within LEASE_SECONDS.
        deadline = asyncio.get_running_loop().time() + 2 * LEASE_SECONDS
        while stored is not None and stored.response["status"] in UNFINISHED:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(CANCEL_POLL_SECONDS)
            stored = await self.get(response_id)
        return stored

    async def _keep_leases(self) -> None:
        while self._running:
            await asyncio.sleep(RENEW_SECONDS)
            if not self._running:
                return
            try:
                cancelled = await self._run(self._renew, list(self._running))
            except self.Error as err:  # the database is unreachable for now: try again at the next renewal
                logger.warning("cannot renew the leases of running responses in %s: %s", self.describe(), err)
                continue
            for response_id in cancelled:
                abort = self._running.get(response_id)
                if abort is not None:
                    self._running[response_id] = None
                    abort()

    def close(self) -> None:
        """Finish every queued write, store this replica's unfinished responses as failed, then close."""
        self._thread.submit(self._close).result()
        self._thread.shutdown()


class SQLiteResponseStore(ResponseStore):
    """A SQLite file. Created readable by its owner only (0600): it holds people's conversations, and
    SQLite gives its journal the database's permissions. Several processes on one machine may share it."""

    Error = sqlite3.Error
    table = "responses"
    items_table = "response_items"
    now = "((julianday('now') - 2440587.5) * 86400.0)"
    migrations = (
        # Version 1, as nanoserve made it before the schema had a version (PRAGMA user_version 0).
        ("CREATE TABLE IF NOT EXISTS responses (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
         "status TEXT NOT NULL, response TEXT NOT NULL, input_items TEXT NOT NULL, conversation TEXT NOT NULL)",),
        # Version 2: leases of running responses, and cancel requests from other replicas. The lease of
        # a row still unfinished from version 1 reads as lapsed: its server has stopped.
        ("ALTER TABLE responses ADD COLUMN lease_until REAL NOT NULL DEFAULT 0",
         "ALTER TABLE responses ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0"),
        # Version 3: every stored item with an id, for `item_reference` inputs; the rows stored before it
        # are indexed from their JSON.
        ("CREATE TABLE response_items (response_id TEXT NOT NULL, item_id TEXT NOT NULL, "
         "is_output INTEGER NOT NULL, item TEXT NOT NULL)",
         "CREATE INDEX response_items_by_item ON response_items (item_id)",
         "CREATE INDEX response_items_by_response ON response_items (response_id)",
         "INSERT INTO response_items SELECT responses.id, json_extract(item.value, '$.id'), 1, item.value "
         "FROM responses, json_each(responses.response, '$.output') AS item "
         "WHERE json_type(item.value, '$.id') = 'text'",
         "INSERT INTO response_items SELECT responses.id, json_extract(item.value, '$.id'), 0, item.value "
         "FROM responses, json_each(responses.input_items) AS item WHERE json_type(item.value, '$.id') = 'text'"),
    )
    # How long a write waits for another process's write to finish.
    BUSY_TIMEOUT_SECONDS = 30.0

    def __init__(self, path: str | Path, max_responses: int):
        self.path = Path(path)
        super().__init__(str(self.path), max_responses)

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))  # sqlite would create it 0644
        except OSError as err:
            raise sqlite3.OperationalError(str(err)) from None
        # Autocommit: transactions are explicit (`_transaction`). Used by the one worker thread only.
        return sqlite3.connect(self.path, timeout=self.BUSY_TIMEOUT_SECONDS, isolation_level=None,
                               check_same_thread=False)

    def _schema_version(self) -> int:
        return self._db.execute("PRAGMA user_version").fetchone()[0]

    def _set_schema_version(self, version: int) -> None:
        self._db.execute(f"PRAGMA user_version = {int(version)}")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        # IMMEDIATE takes the write lock at once, so two processes never deadlock upgrading a read lock.
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
