"""bench.gpu's target table, built from the steps' JSON reports: everything of it that needs no GPU."""

import json
import subprocess
import sys

import pytest

from bench.gpu import TARGETS, evaluate, format_table, junit_report, merge_serve_levels, read_reports
from bench.serve import percentiles


def kernels_report(pct: float, decode_512_us: float) -> dict:
    """bench.kernels' JSON, every target row at `pct` % of copy, decode B=1 L=512 replayed from a
    graph at `decode_512_us` (its eager call, which the target does not read, 5x slower)."""
    shapes = [("rms_norm", "4096x4096"), ("fused_add_rms_norm", "4096x4096"), ("rms_norm (q heads)", "4096x32x128"),
              ("apply_rope", "4096x(32+8)x128"), ("store_kv", "4096x8x128"), ("paged_decode_attention", "B=1 L=512"),
              ("paged_decode_attention", "B=1 L=32768"), ("paged_decode_attention", "B=8 L=2048")]
    rows = []
    for kernel, shape in shapes:
        ms = decode_512_us / 1e3 if shape == "B=1 L=512" else 0.05
        if kernel == "paged_decode_attention":
            rows.append(dict(kernel=kernel, shape=shape, impl="triton", ms=5 * ms, gbps=200.0, pct_copy=pct / 5 if
                             shape == "B=1 L=512" else pct))
            rows.append(dict(kernel=kernel, shape=shape, impl="triton graph", ms=ms, gbps=1000.0, pct_copy=pct))
        else:
            rows.append(dict(kernel=kernel, shape=shape, impl="triton", ms=ms, gbps=1000.0, pct_copy=pct))
        rows.append(dict(kernel=kernel, shape=shape, impl="torch eager", ms=3 * ms, gbps=300.0, pct_copy=pct / 3))
    return {"device": "test", "dtype": "bfloat16", "copy_gbps": 4000.0, "rows": rows}


def generate_report(graphs_ms: float, batch64_ratio: float) -> dict:
    """bench.generate's JSON (the fields the targets read)."""
    hf_64 = 2000.0
    return {
        "ms_per_decode_step_batch1": {"hf": 30.0, "graphs": graphs_ms, "eager": 25.0},
        "floor_ms_batch1": 3.6,
        "decode_tok_s": {"1": {"hf": 33.3, "graphs": 1000 / graphs_ms, "eager": 40.0},
                         "64": {"hf": hf_64, "graphs": hf_64 * batch64_ratio, "eager": 2100.0}},
    }


def serve_report(tok_s: dict[int, float], itl_ms: float, poisson_itl_ms: float | None = None) -> dict:
    """bench.serve's closed-loop levels, and a Poisson level (64 in flight, at a request rate) at
    `poisson_itl_ms` (default: 1.4x the closed loop's)."""
    levels = []
    for clients, rate in tok_s.items():
        levels.append({"concurrency": clients, "request_rate": None, "errors": 0, "output_tokens_per_s": rate,
                       "itl_s": percentiles([itl_ms / 1e3] * 5), "ttft_s": percentiles([0.01])})
    poisson_ms = 1.4 * itl_ms if poisson_itl_ms is None else poisson_itl_ms
    levels.append({"concurrency": 64, "request_rate": 20.0, "errors": 0, "output_tokens_per_s": 999.0,
                   "itl_s": percentiles([poisson_ms / 1e3] * 5), "ttft_s": percentiles([0.01])})
    return {"levels": levels}


def suite_report(failed: int, graphs_cuda: str) -> dict:
    cases = {
        "tests.server.engine.test_cuda_graph::test_buckets_cover_every_batch_up_to_the_largest": "passed",
        "tests.server.engine.test_cuda_graph::test_greedy_tokens_are_the_same_with_graphs_and_with_enforce_eager"
        "[normal-cache-cpu]": "passed",
        "tests.server.engine.test_cuda_graph::test_greedy_tokens_are_the_same_with_graphs_and_with_enforce_eager"
        "[normal-cache-cuda]": graphs_cuda,
    }
    cases |= {f"tests.kernels.test_x::test_{i}": "failed" for i in range(failed)}
    return {"which": "quick", "passed": 2 + (graphs_cuda == "passed"), "failed": failed + (graphs_cuda == "failed"),
            "skipped": 0, "errors": 0, "cases": cases}


def smoke_report(ok: bool = True, startup_s: float = 20.0) -> dict:
    return {"ok": ok, "tokens": {"first": 17, "second": 17}, "steps": 30, "decode_mode": "CUDA graphs for 35 batch sizes",
            "graph_vs_eager_max_abs_diff": 0.01, "seconds": {"profile_s": startup_s / 4, "capture_s": 3 * startup_s / 4}}


def all_passing() -> dict[str, dict]:
    return {
        "engine-smoke": smoke_report(),
        "tests": suite_report(0, "passed"),
        "kernels": kernels_report(90.0, 11.0),
        "generate-8b": generate_report(4.4, 3.2),
        "generate-0.6b": generate_report(1.1, 3.2),
        "serve": serve_report({1: 800.0, 16: 4500.0, 64: 11000.0}, 3.5),
    }


def results(reports: dict) -> dict[str, str]:
    return {row.name: row.result for row in evaluate(TARGETS, reports)}


def test_every_target_passes_when_every_figure_meets_it():
    rows = evaluate(TARGETS, all_passing())
    assert len(rows) == len(TARGETS) == 19
    assert {row.result for row in rows} == {"pass"}
    measured = {row.name: row.measured for row in rows}
    assert measured["Qwen3-8B batch 1, ms/step (graphs)"] == "4.40 ms (HF 30.00, eager 25.00; floor 3.60)"
    assert measured["Qwen3-8B batch 64, x HF eager tok/s"] == "3.20x (6400 tok/s vs HF 2000, eager 2100)"
    assert measured["decode attention B=1 L=512, us (graph replay)"] == "11.0 us (90.0%)"
    assert measured["startup 0.6B with graphs (profile + capture), s"] == "20.0 s (profile 5.0, capture 15.0)"
    assert measured["serve 0.6B, 16 clients, ITL p50 ms"] == "4500 tok/s, ITL p50 3.50 ms"
    assert measured["serve 0.6B, Poisson at 80% of 16 clients' rate: ITL p50 / closed loop's"] == (
        "1.40x (4.90 ms at 20.0 req/s vs 3.50 ms)")
    assert measured["CUDA tests pass"] == "3 passed, 0 failed, 0 skipped (quick)"


@pytest.mark.parametrize("report, replacement, failing", [
    ("kernels", kernels_report(84.9, 11.0), {"rms_norm 4096x4096, % of copy bandwidth", "fused_add_rms_norm 4096x4096, %"}),
    ("kernels", kernels_report(69.9, 11.0), {"rms_norm 4096x4096, % of copy bandwidth", "fused_add_rms_norm 4096x4096, %",
                                             "per-head norm 4096x32x128, %", "apply_rope 4096x(32+8)x128, %",
                                             "store_kv 4096x8x128, %", "decode attention B=1 L=32k, %"}),
    ("kernels", kernels_report(90.0, 12.1), {"decode attention B=1 L=512, us (graph replay)"}),
    ("engine-smoke", smoke_report(ok=False), {"engine smoke: 0.6B shape, GPU defaults"}),
    ("engine-smoke", smoke_report(startup_s=30.5), {"startup 0.6B with graphs (profile + capture), s"}),
    ("generate-8b", generate_report(4.6, 2.9), {"Qwen3-8B batch 1, ms/step (graphs)", "Qwen3-8B batch 64, x HF eager tok/s"}),
    ("generate-0.6b", generate_report(1.3, 3.2), {"Qwen3-0.6B batch 1, ms/step (graphs)"}),
    ("serve", serve_report({16: 3999.0, 64: 10001.0}, 4.01), {"serve 0.6B, 16 clients, tok/s",
                                                              "serve 0.6B, 16 clients, ITL p50 ms"}),
    ("serve", serve_report({16: 4500.0, 64: 11000.0}, 3.5, poisson_itl_ms=5.3),
     {"serve 0.6B, Poisson at 80% of 16 clients' rate: ITL p50 / closed loop's"}),
    ("tests", suite_report(2, "passed"), {"CUDA tests pass"}),
    ("tests", suite_report(0, "failed"), {"CUDA tests pass", "greedy tokens: graphs == --enforce-eager (CUDA)"}),
], ids=["norms", "all-but-decode-B8", "decode-latency", "smoke", "startup", "8b", "0.6b", "serve", "poisson", "tests", "graphs-differ"])
def test_a_figure_past_its_bound_fails_its_targets_only(report, replacement, failing):
    got = results(all_passing() | {report: replacement})
    assert {name for name, result in got.items() if result == "FAIL"} == failing
    assert {result for name, result in got.items() if name not in failing} == {"pass"}


def test_bounds_are_inclusive():
    reports = all_passing() | {"generate-8b": generate_report(4.5, 3.0)}
    reports["kernels"] = kernels_report(85.0, 12.0)
    assert set(results(reports).values()) == {"pass"}


def test_missing_reports_and_rows_read_not_measured():
    reports = all_passing() | {"serve": None, "generate-0.6b": None, "tests": suite_report(0, "skipped")}
    kernels = kernels_report(90.0, 11.0)
    kernels["rows"] = [row for row in kernels["rows"] if row["shape"] != "B=8 L=2048"]
    reports["kernels"] = kernels
    got = results(reports)
    assert {name for name, result in got.items() if result == "not measured"} == {
        "serve 0.6B, 16 clients, tok/s", "serve 0.6B, 16 clients, ITL p50 ms", "serve 0.6B, 64 clients, tok/s",
        "serve 0.6B, Poisson at 80% of 16 clients' rate: ITL p50 / closed loop's", "Qwen3-0.6B batch 1, ms/step (graphs)", "greedy tokens: graphs == --enforce-eager (CUDA)",
        "decode attention B=8 L=2k, %",
    }
    table = format_table(evaluate(TARGETS, reports))
    assert table.splitlines()[0].split() == ["target", "wanted", "measured", "result"]
    assert "decode attention B=8 L=2k, %" in table and table.count("not measured") == 7


def test_junit_xml_and_serve_levels_become_reports(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.a" name="test_ok"/>'
        '<testcase classname="tests.a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.a" name="test_gpu[cuda]"><skipped message="needs CUDA"/></testcase>'
        '<testcase classname="tests.b" name="test_broken"><error message="fixture"/></testcase>'
        '</testsuite></testsuites>'
    )
    report = junit_report(xml, "quick")
    assert (report["passed"], report["failed"], report["skipped"], report["errors"]) == (1, 1, 1, 1)
    assert report["cases"]["tests.a::test_gpu[cuda]"] == "skipped"
    for clients in (1, 16):
        (tmp_path / f"serve-{clients}.json").write_text(json.dumps(serve_report({clients: 10.0 * clients}, 2.0)))
    merged = merge_serve_levels([tmp_path / "serve-1.json", tmp_path / "serve-16.json", tmp_path / "serve-64.json"])
    assert [level["concurrency"] for level in merged["levels"] if not level["request_rate"]] == [1, 16]


def test_table_only_rebuilds_the_table_from_json_files(tmp_path):
    for name, report in all_passing().items():
        (tmp_path / f"{name}.json").write_text(json.dumps(report))
    assert read_reports(tmp_path)["serve"]["levels"][1]["concurrency"] == 16
    run = [sys.executable, "-m", "bench.gpu", "--table-only", "--out-dir", str(tmp_path)]
    result = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(" pass\n") == 19
    (tmp_path / "serve.json").unlink()
    result = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout.count("not measured") == 4
