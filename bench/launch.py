"""A `nanoserve serve` of this checkout for one benchmark run: started on a free local port, ready
once `/health` answers, stopped after (SIGINT, as Ctrl-C stops it).

`bench.serve --kernels SPEC` uses it, so that the kernel spec of a micro-benchmark
(`bench.kernels --kernels SPEC`) goes unchanged to an end-to-end load test.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

STARTUP_TIMEOUT_SECONDS = 600  # a large checkpoint loads and captures its CUDA graphs first


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, seconds: float) -> bool:
    """True once `url`'s `/health` answers 200; False if `process` exits first or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return False


@contextmanager
def launched_server(kernels: str, serve_args: list[str]) -> Iterator[str]:
    """The base URL of a `nanoserve serve --kernels KERNELS SERVE_ARGS...` running for the block."""
    port = free_port()
    command = [sys.executable, "-m", "server.cli", "serve", "--kernels", kernels, "--port", str(port), *serve_args]
    print(f"starting {' '.join(command[2:])} ...", file=sys.stderr)
    process = subprocess.Popen(command, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(url, process, STARTUP_TIMEOUT_SECONDS):
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with status {process.returncode} before it was ready "
                                   "(its error is above)")
            raise RuntimeError(f"the server was not ready in {STARTUP_TIMEOUT_SECONDS} s")
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
