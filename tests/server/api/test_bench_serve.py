"""bench.serve and bench.workloads drive a live server and report throughput, latency
percentiles and the prefix-cache hit rate."""

import json
import subprocess
import sys


def test_serve_bench_against_live_server(server, tmp_path):
    out, plot = tmp_path / "serve.json", tmp_path / "serve.png"
    for endpoint in ("chat", "completions"):
        result = subprocess.run(
            [sys.executable, "-m", "bench.serve", "--url", server.base_url, "--endpoint", endpoint,
             "--concurrency", "1,3", "--requests", "3", "--prompt-words", "6", "--output-tokens", "5",
             "--out", str(out), "--plot", str(plot)],
            capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(out.read_text())
        assert report["model"] == server.model
        assert [lv["concurrency"] for lv in report["levels"]] == [1, 3]
        for level in report["levels"]:
            assert level["errors"] == 0 and level["requests"] == 3
            assert level["output_tokens_per_s"] > 0
            assert 0 < level["ttft_s"]["p50"] <= level["ttft_s"]["p99"] <= level["e2e_s"]["p99"]
            assert level["itl_s"]["p50"] > 0
            assert 0 <= level["cache_hit_rate"] < 1
        assert plot.stat().st_size > 10_000


def test_workloads_bench_against_live_server(server, tmp_path):
    out = tmp_path / "workloads.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.workloads", "--url", server.base_url, "--conversations", "2", "--turns", "2",
         "--system-words", "40", "--user-words", "4", "--output-tokens", "4", "--streams", "2", "--stream-tokens",
         "150", "--long-prompts", "2", "--long-prompt-tokens", "300", "--repeats", "1", "--repeat-tokens", "150",
         "--repeat-shared", "120", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())["workloads"]
    chat = report["chat"]
    assert chat["requests"] == 4 and chat["errors"] == 0 and 0 < chat["cache_hit_rate"] < 1
    assert 0 < chat["ttft_s_later_turns"]["p50"] <= chat["ttft_s_later_turns"]["p99"]
    long_prompts = report["long-prompts"]
    assert long_prompts["long_prompt_tokens"] == 300 and long_prompts["stream_itl_s_while_prefilling"]["p99"] > 0
    assert report["repeat"]["warm_cached_tokens"] == 112  # the 7 whole blocks of the 120 shared tokens
    assert "cache hit" in result.stdout and "warm/cold" in result.stdout


def test_serve_bench_reports_an_unreachable_server(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.serve", "--url", "http://127.0.0.1:9", "--out",
                             str(tmp_path / "x.json")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cannot reach http://127.0.0.1:9" in result.stderr


def test_serve_bench_with_a_response_format(server, tmp_path):
    out = tmp_path / "serve.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.serve", "--url", server.base_url, "--concurrency", "2", "--requests", "2",
         "--prompt-words", "6", "--output-tokens", "12", "--temperature", "1", "--response-format",
         "bench/schemas/records.json", "--out", str(out), "--plot", str(tmp_path / "serve.png")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["args"]["response_format"]["json_schema"]["name"] == "records"
    level = report["levels"][0]
    assert level["errors"] == 0 and level["requests"] == 2
    # The schema asks for more than 12 tokens hold: each reply ran to the limit, as unconstrained ones do.
    assert round(level["output_tokens_per_s"] * level["duration_s"]) == 2 * 12


def test_serve_bench_response_format_needs_chat(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.serve", "--endpoint", "completions", "--response-format",
                             "json_object"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--response-format needs --endpoint chat" in result.stderr
