"""`nanoserve check`: nanoserve against transformers on a checkpoint, layer by layer, with the
kernel spec in force; a wrong plug-in is caught and named with the first layer where it shows."""

import json

import pytest

import nanoserve_kernels
from server.check import run_check
from server.cli import main


@pytest.fixture
def restore_kernels(monkeypatch):
    """`main` sets the process's kernel spec (and its environment variable): put both back after."""
    before = nanoserve_kernels.get_backend()
    monkeypatch.setenv("NANOSERVE_KERNELS", before)
    yield
    nanoserve_kernels.set_backend(before)


def test_check_passes_a_healthy_fp32_checkpoint(chat_checkpoint, restore_kernels, capsys, tmp_path):
    out = tmp_path / "check.json"
    assert main(["check", "--model", str(chat_checkpoint), "--max-tokens", "6", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement 100.0%, top-5 overlap 100.0%" in printed
    assert "greedy continuation: 24/24 tokens match (6/6, 6/6, 6/6, 6/6 per prompt)" in printed
    assert "thresholds (float32): layer max |Δ| <= 0.0001 x its largest value" in printed
    assert printed.rstrip().endswith("PASS")
    report = json.loads(out.read_text())
    assert report["passed"] and report["prompts"] == 4 and len(report["layers"]) == 2
    assert report["logits"]["top1"] == 1.0 and all(m == n for m, n in report["greedy_match"])


def test_check_names_the_op_and_first_layer_of_a_slightly_wrong_norm(chat_checkpoint, restore_kernels, capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\n\nOnce upon a time\n")
    code = main(["check", "--model", str(chat_checkpoint), "--prompts", str(prompts), "--max-tokens", "3",
                 "--kernels", "rms_norm=tests.plugins.wrong:scaled_rms_norm"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "load-time check FAILED: plug-in rms_norm=tests.plugins.wrong:scaled_rms_norm" in printed
    assert "  2 prompts," in printed
    assert "FAIL: layer 0: " in printed
    assert "first layer past its threshold: 0; the op: norm (" in printed


def test_check_names_attention_for_a_wrong_decode_attention(chat_checkpoint, restore_kernels):
    """Decode attention runs only on the continuation's tokens: check's decode steps reach it."""
    nanoserve_kernels.set_backend("decode_attention=tests.plugins.wrong:scaled_decode_attention")
    report = run_check(chat_checkpoint, "cpu", "float32", ["Hello there"], 3)
    assert not report.passed
    assert report.diagnosis["layer"] == 0 and report.diagnosis["op"] == "attention"
    assert report.diagnosis["rel_max"]["attention"] <= 1e-4 < report.diagnosis["rel_max"]["none"]


def test_check_refuses_a_missing_prompts_file(chat_checkpoint, restore_kernels, capsys, tmp_path):
    assert main(["check", "--model", str(chat_checkpoint), "--prompts", str(tmp_path / "none.txt")]) == 2
    assert "nanoserve: error: --prompts" in capsys.readouterr().err
