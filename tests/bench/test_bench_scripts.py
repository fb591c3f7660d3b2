"""The benchmark scripts run and report what they measured; the GPU ones say plainly they need one."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu import TARGETS, evaluate, launch_summary


def _bench(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"bench.{module}", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA these run for many minutes")
@pytest.mark.parametrize("module", ["kernels", "gpu", "profile"])
def test_gpu_benchmarks_say_they_need_cuda(module, tmp_path):
    result = _bench(module, "--help")
    assert result.returncode == 0 and "usage" in result.stdout
    out_flag = ["--out", str(tmp_path / "k.json")] if module == "kernels" else ["--out-dir", str(tmp_path / "out")]
    result = _bench(module, *out_flag, *(["--quick"] if module == "gpu" else []))
    assert result.returncode == 2
    assert f"bench.{module} needs a CUDA GPU" in result.stderr
    assert not any(tmp_path.iterdir())


BENCHES_WITH_A_CLI = sorted(path.stem for path in (Path(__file__).parents[2] / "bench").glob("*.py")
                            if 'if __name__ == "__main__"' in path.read_text())


@pytest.mark.parametrize("module", BENCHES_WITH_A_CLI)
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy re-running an imported module
def test_every_bench_prints_its_help(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"bench.{module}", "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module(f"bench.{module}", run_name="__main__")
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")


def test_generate_bench_compares_hf_graphs_and_eager_on_the_demo_shape(tmp_path, nanoserve_cache):
    out = tmp_path / "generate.json"
    # 16 tokens, 3 repeats: HF's decode time is the difference of two medians, which a shared
    # machine's scheduling hiccups (tens of ms) can turn negative over fewer tokens.
    result = _bench("generate", "--shape", "demo", "--dtype", "float32", "--batches", "1,2", "--prompt-len", "8",
                    "--decode-tokens", "16", "--repeats", "3", "--rounds", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    # Two rounds, HF and nanoserve alternating; each figure is the median (here the mean) of the two.
    rounds = report["decode_tok_s_rounds"]
    assert len(rounds) == 2 and result.stderr.count("HF decode at batch 1") == 2
    paired = report["decode_ratio_median"]["1"]["eager"]
    assert paired == pytest.approx(sum(r["1"]["eager"] / r["1"]["hf"] for r in rounds) / 2)
    assert "eager/HF, batch 1: " in result.stdout and f"(median {paired:.2f}x)" in result.stdout
    for batch in ("1", "2"):
        for side in ("hf", "graphs", "eager"):
            assert report["decode_tok_s"][batch][side] == pytest.approx((rounds[0][batch][side] + rounds[1][batch][side]) / 2)
    assert report["shape"] == "demo" and report["device"] == "cpu" and report["modes"] == ["graphs", "eager"]
    assert min(report["prefill_tok_s"][side] for side in ("hf", "nanoserve", "pieces")) > 0
    assert "  with pieces replayed" in result.stdout
    for figure in ("ms_per_decode_step_batch1", "pct_of_floor_batch1"):
        assert set(report[figure]) == {"hf", "graphs", "eager"} and min(report[figure].values()) > 0
    assert set(report["decode_tok_s"]) == {"1", "2"}
    assert "decode tok/s, batch 2" in result.stdout
    assert "recorded decode steps (CPU replay)" in result.stderr and "eager decode" in result.stderr
    # The demo's embeddings are untied: a step reads one row of the table, every other weight, the K/V.
    context = 8 + 16 // 2
    kv = context * 2 * 2 * 2 * 128 * 4  # tokens x layers x (K, V) x kv heads x head_dim x fp32
    table = (151936 - 1) * 64 * 4  # all rows but one, hidden 64, fp32
    assert report["step_read_bytes_batch1"] == report["weight_bytes"] - table + kv
    rows = {row.name: row for row in evaluate(TARGETS, {"generate-0.6b": report})}
    assert rows["Qwen3-0.6B batch 1, ms/step (graphs)"].measured.startswith(
        f"{report['ms_per_decode_step_batch1']['graphs']:.2f} ms (HF ")


def test_decode_step_reads_one_embedding_row_of_an_untied_model():
    from bench.generate import SHAPES, decode_step_bytes
    from model.config import parse_config
    from model.demo import hf_config
    from model.qwen3 import Qwen3Model

    qwen3_8b = Qwen3Model(parse_config(hf_config(SHAPES["qwen3-8b"])), torch.bfloat16, "meta")  # sizes, no memory
    weights = sum(p.numel() for p in qwen3_8b.parameters()) * 2
    table = 151936 * 4096 * 2
    assert decode_step_bytes(qwen3_8b, 1, 0) == weights - table + 4096 * 2
    assert 15.0e9 < decode_step_bytes(qwen3_8b, 1, 0) < 15.2e9  # issue 9: ~15.1 GB a step
    kv = 2 * 100 * 36 * 2 * 1024 * 2  # sequences x context x layers x (K, V) x kv size x bf16
    assert decode_step_bytes(qwen3_8b, 2, 100) - decode_step_bytes(qwen3_8b, 1, 0) == 4096 * 2 + kv


def test_launch_overhead_bench_counts_and_times_every_launcher(tmp_path):
    out = tmp_path / "launch.json"
    result = _bench("launch_overhead", "--device", "cpu", "--layers", "2", "--repeats", "3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    # Two layers: the first input norm, then per layer the front-end, decode attention and two
    # fused add + norms (the second one of the last layer is the final norm).
    calls = {"rms_norm": 1, "attention_frontend": 2, "paged_decode_attention": 2, "fused_add_rms_norm": 4}
    assert {op: row["calls"] for op, row in report["ops"].items()} == calls
    for row in report["ops"].values():
        assert row["launches"] >= row["calls"] and row["build_us"] > 0
    assert report["launches_per_step"] == sum(row["launches"] for row in report["ops"].values())
    assert "per step:" in result.stdout and "Triton launches" in result.stdout
    assert launch_summary(report) == (f"host cost of a Qwen3-8B-structured decode step's {report['launches_per_step']} "
                                      f"Triton launches: {report['build_us_per_step']:.0f} us building them")


def test_grammar_engines_bench_times_llguidance_on_every_grammar(nanoserve_cache):
    result = _bench("grammar_engines", "--steps", "3")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("llguidance ")]
    assert [" ".join(row[1:-5]) for row in rows] == ["json_object", "nested schema", "tool calls"]
    assert all(float(row[-5]) > 0 and row[-1] == "0" for row in rows)  # timed, and no invalid JSON
    assert "llguidance: in a maxLength string, raw TAB refused, escaped quote accepted" in result.stdout
