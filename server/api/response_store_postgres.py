"""The response store in PostgreSQL (`--response-store postgresql://…`), for replicas that share it.

psycopg 3 (`pip install 'nanoserve[postgres]'`), one connection in autocommit mode, each operation
its own transaction. Replicas may start together on an empty database: the migration runs under an
advisory lock, so exactly one of them creates the tables and the others wait, then find them made.
Responses get unique random ids and are inserted, never upserted, so concurrent writers cannot
overwrite one another; eviction is left to whichever replica holds the eviction lock at the time, so
two replicas never wait on each other's deletes.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from server.api.response_store import ResponseStore

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
# Advisory lock keys (any fixed bigints that other applications are unlikely to use).
MIGRATION_LOCK = 0x6E616E6F5F6D6967  # "nano_mig"
EVICTION_LOCK = 0x6E616E6F5F657663  # "nano_evc"
CONNECT_TIMEOUT_SECONDS = 10


def is_postgres_url(target: str) -> bool:
    return target.startswith(POSTGRES_SCHEMES)


def without_password(url: str) -> str:
    """`url` with any password replaced by ***, for messages and logs."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    query = "&".join("password=***" if pair.lower().startswith("password=") else pair
                     for pair in parts.query.split("&")) if parts.query else ""
    hidden = parts._replace(netloc=userinfo + at + host, query=query)
    return url if hidden == parts else urlunsplit(hidden)


class PostgresResponseStore(ResponseStore):
    table = "nanoserve_responses"
    items_table = "nanoserve_response_items"
    now = "extract(epoch from clock_timestamp())"
    migrations = (
        # Version 1.
        ("CREATE TABLE nanoserve_responses (seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
         "id TEXT NOT NULL UNIQUE, status TEXT NOT NULL, response TEXT NOT NULL, input_items TEXT NOT NULL, "
         "conversation TEXT NOT NULL, lease_until DOUBLE PRECISION NOT NULL DEFAULT 0, "
         "cancel_requested BOOLEAN NOT NULL DEFAULT FALSE)",),
        # Version 2: every stored item with an id, for `item_reference` inputs; the rows stored before it
        # are indexed from their JSON.
        ("CREATE TABLE nanoserve_response_items (response_id TEXT NOT NULL, item_id TEXT NOT NULL, "
         "is_output BOOLEAN NOT NULL, item TEXT NOT NULL)",
         "CREATE INDEX nanoserve_response_items_by_item ON nanoserve_response_items (item_id)",
         "CREATE INDEX nanoserve_response_items_by_response ON nanoserve_response_items (response_id)",
         "INSERT INTO nanoserve_response_items SELECT r.id, item ->> 'id', TRUE, item::text "
         "FROM nanoserve_responses r, json_array_elements(r.response::json -> 'output') AS item "
         "WHERE json_typeof(item -> 'id') = 'string'",
         "INSERT INTO nanoserve_response_items SELECT r.id, item ->> 'id', FALSE, item::text "
         "FROM nanoserve_responses r, json_array_elements(r.input_items::json) AS item "
         "WHERE json_typeof(item -> 'id') = 'string'"),
    )

    def __init__(self, url: str, max_responses: int):
        try:
            import psycopg
        except ImportError:
            raise RuntimeError("--response-store: a PostgreSQL store needs psycopg 3: "
                               "pip install 'nanoserve[postgres]'") from None
        self._psycopg = psycopg
        self.Error = psycopg.Error
        super().__init__(url, max_responses)

    def describe(self) -> str:
        return without_password(self.target)

    def _connect(self) -> Any:
        return self._psycopg.connect(self.target, autocommit=True, connect_timeout=CONNECT_TIMEOUT_SECONDS)

    def _execute(self, sql: str, params: tuple = ()) -> Any:
        return super()._execute(sql.replace("?", "%s"), params)

    def _schema_version(self) -> int:
        # Held until the migration's transaction ends: replicas starting together migrate one at a time.
        self._execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
        self._execute("CREATE TABLE IF NOT EXISTS nanoserve_schema (version INTEGER NOT NULL)")
        row = self._execute("SELECT version FROM nanoserve_schema").fetchone()
        return 0 if row is None else row[0]

    def _set_schema_version(self, version: int) -> None:
        self._execute("DELETE FROM nanoserve_schema")
        self._execute("INSERT INTO nanoserve_schema (version) VALUES (?)", (version,))

    def _may_evict(self) -> bool:
        return self._execute("SELECT pg_try_advisory_xact_lock(?)", (EVICTION_LOCK,)).fetchone()[0]

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._db.transaction():
            yield
