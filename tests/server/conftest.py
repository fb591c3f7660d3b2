"""Live servers for the HTTP tests: `python -m server.cli serve` as a subprocess on a free port,
serving the small chat checkpoint on CPU, ready once `/health` answers 200."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

STARTUP_TIMEOUT_SECONDS = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(process: subprocess.Popen, base_url: str, timeout: float) -> str | None:
    """None once `base_url`/health answers 200, else what went wrong first (it exited, or timed out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"exited with {process.returncode}"
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return None
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return f"did not become healthy in {timeout} s"


class LiveServer:
    def __init__(self, model_dir: Path, log_path: Path, *flags: str):
        self.model = model_dir.name  # the default --served-model-name
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--device", "cpu",
                   "--port", str(self.port), *flags]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        self._wait_until_healthy()

    def _wait_until_healthy(self) -> None:
        problem = wait_for_health(self.process, self.base_url, STARTUP_TIMEOUT_SECONDS)
        if problem is not None:
            self.stop()
            raise RuntimeError(f"the server {problem}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        # No retries: the tests assert the first answer, errors included.
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def async_client(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def metric(self, sample: str, default: float | None = None) -> float:
        """One sample of /metrics, e.g. `nanoserve_kv_blocks_used` or `name{label="value"}`;
        `default` for a labelled sample that has not been counted yet."""
        for line in httpx.get(f"{self.base_url}/metrics").text.splitlines():
            if line.startswith(f"{sample} "):
                return float(line.split()[1])
        if default is None:
            raise KeyError(sample)
        return default


@pytest.fixture(scope="session")
def start_server(chat_checkpoint, tmp_path_factory):
    """Start a live server with extra flags; every server started is stopped at the end."""
    started: list[LiveServer] = []

    def start(*flags: str) -> LiveServer:
        log_path = tmp_path_factory.mktemp("server-log") / "server.log"
        started.append(LiveServer(Path(chat_checkpoint), log_path, *flags))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server, tmp_path_factory) -> LiveServer:
    """The shared server, with default flags except its response store and a 2,048-token context,
    so that the prompts that exceed it stay small."""
    return start_server("--response-store", str(tmp_path_factory.mktemp("store") / "responses.sqlite3"),
                        "--max-model-len", "2048")


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return server.client()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=120) as http_client:
        yield http_client
