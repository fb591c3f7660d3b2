"""A PostgreSQL server for the tests of the shared response store and of replicas behind a router."""

import pytest

from tests.server.postgres_server import PostgresServer, Unavailable


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
