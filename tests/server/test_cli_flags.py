"""`nanoserve` as a user mistypes it: every bad flag is one line naming it, before any model
loads; `--version`, `--help` and a closed stdout behave."""

import os
import subprocess
import sys

import pytest


def _run(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy() | (env or {}))


@pytest.mark.parametrize("args, words", [
    (["serve", "--port", "99999"], "--port must be in 1..65535, got 99999"),
    (["serve", "--port", "0"], "--port must be in 1..65535"),
    (["serve", "--max-body-bytes", "0"], "--max-body-bytes must be at least 4096"),
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs must be at least 1, got 0"),
    (["serve", "--response-store-max", "-1"], "--response-store-max must be at least 1"),
    (["serve", "--response-store", "postgresql://nanoserve:pw@127.0.0.1:1/db"],
     "--response-store: cannot open the response store postgresql://nanoserve:***@127.0.0.1:1/db: "),
    (["serve", "--num-kv-blocks", "1"], "--num-kv-blocks 1 holds 16 tokens"),
    (["serve", "--api-key", ""], "--api-key is empty"),
    (["serve", "--api-key", "two words"], "--api-key must be printable ASCII without spaces"),
    (["generate", "--temperature", "nan", "hi"], "--temperature must be a finite number, got nan"),
    (["generate", "--temperature", "inf", "hi"], "--temperature must be a finite number"),
    (["generate", "--top-p", "0", "hi"], "--top-p must be in (0, 1]"),
    (["generate", "--repetition-penalty", "-1", "hi"], "--repetition-penalty must be positive"),
    (["generate", "--max-tokens", "0", "hi"], "--max-tokens must be at least 1"),
    (["generate", "--model", "/etc/hostname", "hi"], "--model /etc/hostname is a file"),
    (["generate", "--model", "/no/such/dir", "hi"], "--model /no/such/dir: no such directory"),
])
def test_bad_flags_are_one_line_naming_the_flag(demo_dir, args, words):
    result = _run(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"nanoserve: error: {result.stderr.split('error: ', 1)[1].strip()}"]
    assert words in result.stderr
    assert "Traceback" not in result.stderr and "loading" not in result.stderr  # refused before the model loads


def test_empty_api_key_from_the_environment_is_refused(demo_dir):
    result = _run("serve", env={"NANOSERVE_API_KEY": ""})
    assert result.returncode == 2 and "$NANOSERVE_API_KEY is empty" in result.stderr


def test_version_and_help():
    version = _run("--version")
    assert version.returncode == 0 and version.stdout.strip() == "nanoserve 0.1.0"
    for args in ([], ["serve"], ["generate"]):
        shown = _run(*args, "--help")
        assert shown.returncode == 0 and "`" not in shown.stdout and "**" not in shown.stdout


def test_a_closed_stdout_ends_generate_quietly(demo_dir):
    command = [sys.executable, "-m", "server.cli", "generate", "--max-tokens", "300", "--ignore-eos", "Once upon a"]
    generate = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    generate.stdout.read(10)
    generate.stdout.close()  # as `| head -c 10` does
    stderr = generate.stderr.read().decode()
    assert generate.wait(timeout=120) == 141
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr
