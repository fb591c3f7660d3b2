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


def test_generate_reports_bad_model_dir_cleanly(tmp_path):
    result = _run("--model", str(tmp_path), "hi")
    assert result.returncode == 2
    assert "config.json not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_sampling_is_reproducible_by_seed_and_stops_before_a_stop_string(demo_dir):
    args = ("--max-tokens", "24", "--ignore-eos", "--temperature", "2.0", "--top-k", "50", "Once upon a time")
    first = _run(*args, "--seed", "3")
    second = _run(*args, "--seed", "3")
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout
    text = first.stdout.removesuffix("\n")
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = _run(*args, "--seed", "3", "--stop", stop)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout == text[: text.index(stop)] + "\n"
