"""A good plug-in used end to end: `nanoserve generate` with the README's example RMSNorm gives
HF's greedy text, with decode recorded and replayed (the CPU stand-in for CUDA graphs), and the
startup line names the plug-in; a plug-in that fails its load-time check stops the start."""

import os
import subprocess
import sys

import torch
from transformers import Qwen3ForCausalLM

import nanoserve_kernels
from model.batch import SequenceStep, make_batch
from model.load import load_model
from model.tokenizer import Tokenizer
from tests.kernels.common import kernel_backend

EXAMPLE = "rms_norm=tests.plugins.rms_norm_torch:rms_norm"


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "generate", *args],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())


def test_generate_with_a_plugin_equals_hf_greedy_text(chat_checkpoint):
    prompt = "The capital of France is"
    tokenizer = Tokenizer(chat_checkpoint)
    hf = Qwen3ForCausalLM.from_pretrained(chat_checkpoint, dtype=torch.float32).eval()
    ids = tokenizer.encode(prompt)
    expected = tokenizer.decode(hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist())
    spec = f"{EXAMPLE},decode_attention=nanoserve_kernels.decode_attention:paged_decode_attention_reference"
    result = _generate("--model", str(chat_checkpoint), "--kernels", spec, "--no-enforce-eager", "--max-tokens", "12",
                       prompt)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    [line] = [line for line in result.stderr.splitlines() if line.startswith("nanoserve: kernels ")]
    assert f"plug-in {EXAMPLE} matches its torch reference (max |Δ| " in line
    assert "plug-in decode_attention=nanoserve_kernels.decode_attention:paged_decode_attention_reference matches" in line


def test_a_plugin_that_fails_its_check_stops_the_start_in_one_line(chat_checkpoint, monkeypatch, capsys):
    from server.cli import main

    monkeypatch.setenv("NANOSERVE_KERNELS", "auto")  # `main` sets it from the flag
    with kernel_backend("auto"):  # and the process's spec: both put back after
        code = main(["generate", "--model", str(chat_checkpoint), "--kernels", "rms_norm=tests.plugins.wrong:scaled_rms_norm",
                     "hi"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("nanoserve: error: plug-in rms_norm=tests.plugins.wrong:scaled_rms_norm (hidden rows")
    assert "does not match the torch reference: out differs by up to " in err
    assert "Traceback" not in err


def test_a_decode_attention_plugin_runs_in_place_of_the_cpu_plan(chat_checkpoint, monkeypatch):
    """On CPU the engine times decode-attention candidates (`model.cpu_plan`); a plug-in overrides that choice."""
    import nanoserve_kernels.decode_attention as builtin

    calls = []
    reference = builtin.paged_decode_attention_reference
    monkeypatch.setattr(builtin, "paged_decode_attention_reference",
                        lambda *args: (calls.append(args[0].shape), reference(*args))[1])
    model = load_model(chat_checkpoint, "cpu", "float32")
    model.plan_cpu_ops(max_batch=2, max_context=64)
    cache = model.allocate_kv_cache(4, 16)
    with kernel_backend("decode_attention=nanoserve_kernels.decode_attention:paged_decode_attention_reference"):
        model.forward(make_batch([SequenceStep([1, 2, 3], 0, [0])], 16, "cpu"), cache)
        model.forward(make_batch([SequenceStep([4], 3, [0])], 16, "cpu"), cache)
    assert calls == [torch.Size([1, 4, 64])] * 2  # decode only, once per layer
    assert nanoserve_kernels.get_backend() == "auto"
