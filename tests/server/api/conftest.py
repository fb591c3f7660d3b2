"""Shared fixtures of the API tests: the default server on the demo checkpoint (for the tests that
need replies that end on their own), and a PostgreSQL server (for the shared response store and
replicas behind a router)."""

from pathlib import Path

import pytest

from tests.server.conftest import LiveServer
from tests.server.postgres_server import PostgresServer, Unavailable


@pytest.fixture(scope="session")
def demo_server(demo_dir, tmp_path_factory):
    """`nanoserve serve` on its defaults (the demo checkpoint), with a private response store."""
    server = LiveServer(Path(demo_dir), tmp_path_factory.mktemp("demo-log") / "server.log",
                        "--response-store", str(tmp_path_factory.mktemp("demo-store") / "responses.sqlite3"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres():
    """A running PostgreSQL server (`new_database()` gives each test its own database); the tests that
    need one are skipped, with the reason, where none can be started."""
    try:
        server = PostgresServer.start()
    except Unavailable as err:
        pytest.skip(f"no PostgreSQL server: {err}")
    yield server
    server.stop()
