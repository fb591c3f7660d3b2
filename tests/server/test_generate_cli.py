"""`nanoserve generate` end to end, as a user runs it."""

import os
import subprocess
import sys

import torch
from transformers import Qwen3ForCausalLM

from model.tokenizer import Tokenizer


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "generate", *args],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )


def test_generate_equals_hf_greedy_text(chat_checkpoint):
    prompt = "The capital of France is"
    tokenizer = Tokenizer(chat_checkpoint)
    hf = Qwen3ForCausalLM.from_pretrained(chat_checkpoint, dtype=torch.float32).eval()
    prompt_ids = tokenizer.encode(prompt)
    out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False)[0, len(prompt_ids):]
    expected = tokenizer.decode(out.tolist())

    result = _run("--model", str(chat_checkpoint), "--max-tokens", "24", prompt)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert expected.strip()


def test_generate_on_demo_without_model_flag(demo_dir):
    result = _run("--max-tokens", "8", "--ignore-eos", "Hello")
    assert result.returncode == 0, result.stderr
    assert len(Tokenizer(demo_dir).encode(result.stdout.rstrip("\n"))) >= 4
    # The CPU op choices, timed at load, in one line on stderr (stdout holds only the text).
    [plan] = [line for line in result.stderr.splitlines() if "CPU ops chosen by timing them here" in line]
    assert "one-row matmul: " in plan and "decode attention: " in plan


def test_generate_reports_bad_model_dir_cleanly(tmp_path):
    result = _run("--model", str(tmp_path), "hi")
    assert result.returncode == 2
    assert "config.json not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_sampling_is_reproducible_by_seed_and_stops_before_a_stop_string(demo_dir):
    args = ("--max-tokens", "24", "--ignore-eos", "--temperature", "5", "--top-k", "50", "--seed", "3", "Once upon a")
    first = _run(*args)
    assert first.returncode == 0, first.stderr
    text = first.stdout.removesuffix("\n")
    # A stop string from the second half of the text that does not occur earlier in it.
    start = next(i for i in range(len(text) // 2, len(text) - 3) if text.find(text[i : i + 3]) == i)
    # Same seed, same draws: the second run is the first one's text up to the stop string.
    stopped = _run(*args, "--stop", text[start : start + 3])
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout == text[:start] + "\n"


def test_enforce_eager_and_async_scheduling_flags_choose_how_decode_runs_not_the_text(demo_dir):
    from server.cli import build_parser
    from server.engine.async_engine import create_engine

    for flag, mode in (("--enforce-eager", "eager decode"), ("--no-enforce-eager", "recorded decode steps")):
        engine = create_engine(build_parser().parse_args(["generate", flag, "hi"]))
        engine.shutdown()
        assert engine.decode_mode.startswith(mode)
    args = ("--max-tokens", "12", "--ignore-eos", "Once upon a")
    eager = _run("--enforce-eager", *args)
    replayed = _run("--no-enforce-eager", *args)
    assert eager.returncode == replayed.returncode == 0, eager.stderr + replayed.stderr
    assert replayed.stdout == eager.stdout and eager.stdout.strip()
    overlapped = _run("--async-scheduling", *args)
    assert overlapped.returncode == 0, overlapped.stderr
    assert overlapped.stdout == eager.stdout
