"""The benchmark scripts run and report what they measured; the GPU ones say plainly they need one."""

import json
import subprocess
import sys

import pytest
import torch

from bench.gpu import generate_summary


def _bench(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"bench.{module}", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA these run for many minutes")
@pytest.mark.parametrize("module", ["kernels", "gpu"])
def test_gpu_benchmarks_say_they_need_cuda(module, tmp_path):
    result = _bench(module, "--help")
    assert result.returncode == 0 and "usage" in result.stdout
    out_flag = ["--out", str(tmp_path / "k.json")] if module == "kernels" else ["--out-dir", str(tmp_path)]
    result = _bench(module, *out_flag)
    assert result.returncode == 2
    assert f"bench.{module} needs a CUDA GPU" in result.stderr
    assert not any(tmp_path.iterdir())


def test_generate_bench_compares_both_sides_on_the_demo_shape(tmp_path, nanoserve_cache):
    out = tmp_path / "generate.json"
    result = _bench("generate", "--shape", "demo", "--dtype", "float32", "--batches", "1,2", "--prompt-len", "8",
                    "--decode-tokens", "4", "--repeats", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["shape"] == "demo" and report["device"] == "cpu"
    for figure in ("prefill_tok_s", "ms_per_decode_step_batch1", "pct_of_floor_batch1"):
        assert report[figure]["hf"] > 0 and report[figure]["nanoserve"] > 0
    assert set(report["decode_tok_s"]) == {"1", "2"}
    assert "decode tok/s, batch 2" in result.stdout
    assert generate_summary(out)[0].startswith("demo float32, batch 1:")


def test_grammar_engines_bench_times_llguidance_on_every_grammar(nanoserve_cache):
    result = _bench("grammar_engines", "--steps", "3")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("llguidance ")]
    assert [" ".join(row[1:-5]) for row in rows] == ["json_object", "nested schema", "tool calls"]
    assert all(float(row[-5]) > 0 and row[-1] == "0" for row in rows)  # timed, and no invalid JSON
    assert "llguidance: in a maxLength string, raw TAB refused, escaped quote accepted" in result.stdout
