"""The default server on the demo checkpoint, shared by the tests that need replies that end on their own."""

from pathlib import Path

import pytest

from tests.server.conftest import LiveServer


@pytest.fixture(scope="session")
def demo_server(demo_dir, tmp_path_factory):
    """`nanoserve serve` on its defaults (the demo checkpoint), with a private response store."""
    server = LiveServer(Path(demo_dir), tmp_path_factory.mktemp("demo-log") / "server.log",
                        "--response-store", str(tmp_path_factory.mktemp("demo-store") / "responses.sqlite3"))
    yield server
    server.stop()
