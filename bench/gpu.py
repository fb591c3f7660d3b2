"""Everything that needs a GPU, in one command, ending in one table: each target of issue 9, what
was measured, pass or FAIL.

    python -m bench.gpu [--quick] [--out-dir bench/out/gpu] [--skip-tests] [--table-only]

Each step runs as a subprocess under a time limit, so a crash or a hang costs its own rows (they
read "not measured") and not the run; each writes JSON to `--out-dir`, and the table is built
from those files alone (`python -m bench.gpu --table-only` rebuilds it from an earlier run's).
In this order, the most telling first:

1. the test suite on CUDA (kernel, model and engine tests then run compiled Triton kernels and
   real CUDA graphs); `--quick` runs QUICK_TESTS only;
2. `bench.generate` on the Qwen3-8B and Qwen3-0.6B shapes (random bf16 weights), nanoserve with
   CUDA graphs and with `--enforce-eager` side by side, against HF eager `generate()`;
3. `bench.serve` against `nanoserve serve` on a random Qwen3-0.6B-shaped checkpoint (default
   engine flags), 1, 16 and 64 clients streaming 128-token replies;
4. `bench.kernels` (`--no-compile` with `--quick`): each kernel's share of the copy bandwidth;
5. `bench.launch_overhead`, whose figures (no target) print in one line under the table.

`--quick` keeps repeats small and compiles nothing with torch.compile: about five minutes on an
H100/H200, model builds and graph capture included, and never more than QUICK_BUDGET_S (a step
that would run past it is stopped). Exit status 0 when every target passes, 1 when one fails or
was not measured; without CUDA it says so and exits 2.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import tp

QUICK_TESTS = ["tests/server/engine/test_cuda_graph.py",
               # its CUDA case only: the CPU cases are the default run's
               "tests/server/engine/test_async_scheduling.py::test_on_cuda_async_scheduling_with_graphs_gives_exactly_the_synchronous_output",
               "tests/kernels/test_decode_attention.py"]
SERVE_LEVELS = {1: 8, 16: 64, 64: 192}  # clients: requests
SERVE_OUTPUT_TOKENS = 128
QUICK_BUDGET_S = 540  # --quick ends within this (and a table), whatever a step does; typically ~5 min
REPORTS = ("tests", "kernels", "generate-8b", "generate-0.6b", "serve", "tp")  # the steps' JSON files, by name


# ---- the targets and the table (no GPU needed: tested on CPU) ----


@dataclass(frozen=True)
class Target:
    name: str
    report: str  # which step's JSON the value comes from
    measure: Callable[[dict], tuple[float, str] | None]  # (value, as shown), None: not in the report
    op: str  # ">=" or "<="
    bound: float
    wanted: str


@dataclass(frozen=True)
class Row:
    name: str
    wanted: str
    measured: str
    result: str  # "pass", "FAIL" or "not measured"


def _kernel_row(kernel: str, shape: str) -> Callable[[dict], dict | None]:
    def find(report: dict) -> dict | None:
        return next((r for r in report.get("rows", []) if r["kernel"] == kernel and r["shape"] == shape
                     and r["impl"] == "triton" and "ms" in r), None)
    return find


def _pct_of_copy(kernel: str, shape: str) -> Callable[[dict], tuple[float, str] | None]:
    find = _kernel_row(kernel, shape)

    def measure(report: dict) -> tuple[float, str] | None:
        row = find(report)
        return None if row is None else (row["pct_copy"], f"{row['pct_copy']:.1f}% ({row['ms'] * 1e3:.1f} us)")
    return measure


def _kernel_us(kernel: str, shape: str) -> Callable[[dict], tuple[float, str] | None]:
    find = _kernel_row(kernel, shape)

    def measure(report: dict) -> tuple[float, str] | None:
        row = find(report)
        return None if row is None else (row["ms"] * 1e3, f"{row['ms'] * 1e3:.1f} us ({row['pct_copy']:.1f}%)")
    return measure


def _ms_per_step(report: dict) -> tuple[float, str] | None:
    ms = report.get("ms_per_decode_step_batch1", {})
    if "graphs" not in ms:
        return None
    others = "".join(f", {mode} {ms[mode]:.2f}" for mode in ("sync", "eager") if mode in ms)
    return ms["graphs"], f"{ms['graphs']:.2f} ms (HF {ms['hf']:.2f}{others}; floor {report['floor_ms_batch1']:.2f})"


def _times_hf(batch: int) -> Callable[[dict], tuple[float, str] | None]:
    def measure(report: dict) -> tuple[float, str] | None:
        tok_s = report.get("decode_tok_s", {}).get(str(batch), {})
        if "graphs" not in tok_s or "hf" not in tok_s:
            return None
        ratio = tok_s["graphs"] / tok_s["hf"]
        others = "".join(f", {mode} {tok_s[mode]:.0f}" for mode in ("sync", "eager") if mode in tok_s)
        return ratio, f"{ratio:.2f}x ({tok_s['graphs']:.0f} tok/s vs HF {tok_s['hf']:.0f}{others})"
    return measure


def _serve(clients: int, figure: str) -> Callable[[dict], tuple[float, str] | None]:
    def measure(report: dict) -> tuple[float, str] | None:
        level = next((lv for lv in report.get("levels", []) if lv["concurrency"] == clients), None)
        if level is None or level["errors"] or level["itl_s"]["p50"] is None:
            return None
        tok_s, itl_ms = level["output_tokens_per_s"], level["itl_s"]["p50"] * 1e3
        shown = f"{tok_s:.0f} tok/s, ITL p50 {itl_ms:.2f} ms"
        return (tok_s if figure == "tok/s" else itl_ms), shown
    return measure


def _tests_pass(report: dict) -> tuple[float, str] | None:
    if "cases" not in report:
        return None
    failed = report["failed"] + report["errors"]
    return failed, f"{report['passed']} passed, {failed} failed, {report['skipped']} skipped ({report['which']})"


def _graphs_equal_eager(report: dict) -> tuple[float, str] | None:
    test = "test_greedy_tokens_are_the_same_with_graphs_and_with_enforce_eager"
    outcomes = [outcome for case, outcome in report.get("cases", {}).items() if test in case and case.endswith("cuda]")]
    ran = [outcome for outcome in outcomes if outcome != "skipped"]
    if not ran:
        return None
    failed = sum(outcome != "passed" for outcome in ran)
    return failed, "identical" if not failed else f"{failed} of {len(ran)} cases differ"


TARGETS = [
    Target("CUDA tests pass", "tests", _tests_pass, "<=", 0, "0 failed"),
    Target("greedy tokens: graphs == --enforce-eager (CUDA)", "tests", _graphs_equal_eager, "<=", 0, "identical"),
    Target("rms_norm 4096x4096, % of copy bandwidth", "kernels", _pct_of_copy("rms_norm", "4096x4096"), ">=", 85, ">= 85%"),
    Target("fused_add_rms_norm 4096x4096, %", "kernels", _pct_of_copy("fused_add_rms_norm", "4096x4096"), ">=", 85,
           ">= 85%"),
    Target("per-head norm 4096x32x128, %", "kernels", _pct_of_copy("rms_norm (q heads)", "4096x32x128"), ">=", 70,
           ">= 70%"),
    Target("apply_rope 4096x(32+8)x128, %", "kernels", _pct_of_copy("apply_rope", "4096x(32+8)x128"), ">=", 80, ">= 80%"),
    Target("store_kv 4096x8x128, %", "kernels", _pct_of_copy("store_kv", "4096x8x128"), ">=", 80, ">= 80%"),
    Target("decode attention B=1 L=512, us", "kernels", _kernel_us("paged_decode_attention", "B=1 L=512"), "<=", 12,
           "<= 12 us"),
    Target("decode attention B=1 L=32k, %", "kernels", _pct_of_copy("paged_decode_attention", "B=1 L=32768"), ">=", 75,
           ">= 75%"),
    Target("decode attention B=8 L=2k, %", "kernels", _pct_of_copy("paged_decode_attention", "B=8 L=2048"), ">=", 50,
           ">= 50%"),
    Target("Qwen3-8B batch 1, ms/step (graphs)", "generate-8b", _ms_per_step, "<=", 4.5, "<= 4.5 ms"),
    Target("Qwen3-0.6B batch 1, ms/step (graphs)", "generate-0.6b", _ms_per_step, "<=", 1.2, "<= 1.2 ms"),
    Target("Qwen3-8B batch 64, x HF eager tok/s", "generate-8b", _times_hf(64), ">=", 3, ">= 3x"),
    Target("serve 0.6B, 16 clients, tok/s", "serve", _serve(16, "tok/s"), ">=", 4000, ">= 4000"),
    Target("serve 0.6B, 16 clients, ITL p50 ms", "serve", _serve(16, "itl"), "<=", 4, "<= 4 ms"),
    Target("serve 0.6B, 64 clients, tok/s", "serve", _serve(64, "tok/s"), ">=", 10000, ">= 10000"),
]
# Rows that need a machine with several GPUs (issue 22), after the others.
MULTI_GPU_TARGETS = [Target("Qwen3-8B batch 1, TP=2 / TP=1 step", "tp", tp.step_ratio, "<=", tp.TARGET_RATIO,
                            f"<= {tp.TARGET_RATIO}x (2 GPUs)")]


def evaluate(targets: list[Target], reports: dict[str, dict | None]) -> list[Row]:
    """One row per target; a missing report or figure is "not measured"."""
    rows = []
    for target in targets:
        report = reports.get(target.report)
        measured = None if report is None else target.measure(report)
        if measured is None:
            rows.append(Row(target.name, target.wanted, "-", "not measured"))
            continue
        value, shown = measured
        ok = value >= target.bound if target.op == ">=" else value <= target.bound
        rows.append(Row(target.name, target.wanted, shown, "pass" if ok else "FAIL"))
    return rows


def format_table(rows: list[Row]) -> str:
    widths = [max(len(getattr(row, field)) for row in rows) for field in ("name", "wanted", "measured")]
    header = Row("target", "wanted", "measured", "result")
    lines = [f"{row.name:<{widths[0]}}  {row.wanted:<{widths[1]}}  {row.measured:<{widths[2]}}  {row.result}"
             for row in [header, *rows]]
    return "\n".join(lines)


def launch_summary(report: dict) -> str:
    """bench.launch_overhead's figures in one line (no target: to know them)."""
    line = (f"host cost of a Qwen3-8B-structured decode step's {report['launches_per_step']} Triton launches: "
            f"{report['build_us_per_step']:.0f} us building them")
    if "triton_launch_us" in report:
        line += (f", {report['triton_ops_us_per_step']:.0f} us with the launches (a bare Triton launch "
                 f"{report['triton_launch_us']:.1f} us, a torch op {report['torch_op_us']:.1f} us); eager step "
                 f"{report['eager_step_us']:.0f} us, its CUDA-graph replay {report['graph_replay_step_us']:.0f} us")
    return line


def read_reports(out_dir: Path) -> dict[str, dict | None]:
    """Each step's JSON report, None where the step wrote none."""
    reports = {}
    for name in REPORTS:
        path = out_dir / f"{name}.json"
        reports[name] = json.loads(path.read_text()) if path.is_file() else None
    return reports


def junit_report(path: Path, which: str) -> dict:
    """pytest's JUnit XML as counts and per-test outcomes."""
    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child, word in (("skipped", "skipped"), ("failure", "failed"), ("error", "error")):
            if case.find(child) is not None:
                outcome = word
        cases[name] = outcome
    counts = {word: sum(outcome == word for outcome in cases.values()) for word in ("passed", "failed", "skipped")}
    return {"which": which, **counts, "errors": sum(outcome == "error" for outcome in cases.values()), "cases": cases}


def merge_serve_levels(paths: list[Path]) -> dict:
    return {"levels": [level for path in paths if path.is_file() for level in json.loads(path.read_text())["levels"]]}


# ---- the steps (CUDA) ----


class Steps:
    """Runs the steps as subprocesses, each under its own limit and all within `budget_s`, so that
    a hang costs its own figures and the table still comes out in time."""

    def __init__(self, out_dir: Path, quick: bool, budget_s: float):
        self.out = out_dir
        self.quick = quick
        self.ends = time.monotonic() + budget_s

    def run(self, name: str, command: list[str], timeout: float, log: str) -> bool:
        """One step, its output to `log` in the out dir and its tail to the terminal; False if it
        failed or ran out of time."""
        timeout = max(10.0, min(timeout, self.ends - time.monotonic()))
        print(f"\n==== {name} (at most {timeout:.0f} s) ====", flush=True)
        started = time.monotonic()
        with open(self.out / log, "w") as out:
            # A session of its own: on a timeout its children (a test's live server) end with it.
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                rc = "timeout"
        print((self.out / log).read_text()[-2500:])
        print(f"==== {name}: {'ok' if rc == 0 else f'failed ({rc})'} in {time.monotonic() - started:.0f} s ====",
              flush=True)
        return rc == 0

    def tests(self) -> None:
        xml = self.out / "tests.xml"
        which = "quick: " + ", ".join(QUICK_TESTS) if self.quick else "the whole suite"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                   *(QUICK_TESTS if self.quick else ["tests"])]
        self.run("CUDA tests", command, 150 if self.quick else 1800, "tests.log")
        if xml.is_file():
            (self.out / "tests.json").write_text(json.dumps(junit_report(xml, which), indent=1) + "\n")

    def generate(self, shape: str, batches: str) -> None:
        name = "generate-8b" if shape == "qwen3-8b" else "generate-0.6b"
        command = [sys.executable, "-m", "bench.generate", "--shape", shape, "--device", "cuda", "--dtype", "bfloat16",
                   "--batches", batches, "--prompt-len", "128", "--decode-tokens", "32" if self.quick else "64",
                   "--repeats", "2" if self.quick else "5",
                   "--modes", "graphs,eager" if self.quick and shape == "qwen3-8b" else "graphs,sync,eager",
                   "--out", str(self.out / f"{name}.json")]
        self.run(f"bench.generate {shape}", command, 180 if self.quick else 1200, f"{name}.log")

    def kernels(self) -> None:
        command = [sys.executable, "-m", "bench.kernels", "--out", str(self.out / "kernels.json"),
                   *(["--no-compile"] if self.quick else [])]
        self.run("bench.kernels", command, 150 if self.quick else 1800, "kernels.log")

    def launch_overhead(self) -> None:
        command = [sys.executable, "-m", "bench.launch_overhead", "--device", "cuda",
                   "--repeats", "50" if self.quick else "200", "--out", str(self.out / "launch_overhead.json")]
        self.run("bench.launch_overhead", command, 90, "launch_overhead.log")

    def tensor_parallel(self) -> None:
        if torch_device_count() < 2:
            print("\n==== bench.tp: skipped, it needs 2 GPUs ====", flush=True)
            return
        self.run("bench.tp (TP=2 vs TP=1)", tp.command(self.out / "tp.json", self.quick), 300, "tp.log")

    def serve(self) -> None:
        from bench.generate import SHAPES
        from model.demo import write_checkpoint

        print("\n==== bench.serve: writing a random Qwen3-0.6B-shaped checkpoint ====", flush=True)
        checkpoint = Path(tempfile.mkdtemp(prefix="nanoserve-0.6b-"))
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = self.out / "serve-server.log"
        server = None
        try:
            write_checkpoint(checkpoint, SHAPES["qwen3-0.6b"] | {"dtype": "bfloat16"}, seed=0)
            with open(log, "w") as server_log:
                server = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", str(checkpoint),
                                           "--port", str(port)], stdout=server_log, stderr=subprocess.STDOUT)
            if not _wait_healthy(url, server, max(10.0, min(240.0, self.ends - time.monotonic()))):
                print(f"the server did not come up:\n{log.read_text()[-3000:]}")
                return
            print(log.read_text()[-1500:])
            paths = []
            for clients, requests in SERVE_LEVELS.items():
                path = self.out / f"serve-{clients}.json"
                command = [sys.executable, "-m", "bench.serve", "--url", url, "--endpoint", "completions",
                           "--concurrency", str(clients), "--requests", str(requests if self.quick else 4 * requests),
                           "--output-tokens", str(SERVE_OUTPUT_TOKENS), "--prompt-words", "64",
                           "--out", str(path), "--plot", str(self.out / f"serve-{clients}.png")]
                if self.run(f"bench.serve, {clients} clients", command, 120, f"serve-{clients}.log"):
                    paths.append(path)
            (self.out / "serve.json").write_text(json.dumps(merge_serve_levels(paths), indent=1) + "\n")
        finally:
            if server is not None and server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    server.kill()
            shutil.rmtree(checkpoint, ignore_errors=True)


def torch_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, seconds: float) -> bool:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default="bench/out/gpu", help="where the JSON and logs go (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a test subset, small repeats, no torch.compile (~5 min)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the tests")
    parser.add_argument("--table-only", action="store_true", help="only print the table of an earlier run's JSON")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    if not args.table_only:
        import torch

        if not torch.cuda.is_available():
            print("bench.gpu needs a CUDA GPU: none is visible to torch.", file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        for name in (*REPORTS, "launch_overhead", *(f"serve-{clients}" for clients in SERVE_LEVELS)):
            (out / f"{name}.json").unlink(missing_ok=True)  # a step failing now shows no earlier figures
        started = time.monotonic()
        # Most telling first: is replay right, the graph figures, serving; then the kernels.
        steps = Steps(out, args.quick, QUICK_BUDGET_S if args.quick else float("inf"))
        if not args.skip_tests:
            steps.tests()
        steps.generate("qwen3-8b", "1,64")
        steps.generate("qwen3-0.6b", "1")
        steps.serve()
        steps.kernels()
        steps.launch_overhead()
        steps.tensor_parallel()
        print(f"\nall steps: {time.monotonic() - started:.0f} s")
        device = torch.cuda.get_device_name()
    else:
        device = "(from the JSON in " + str(out) + ")"
    multi_gpu = (out / "tp.json").is_file() or (not args.table_only and torch_device_count() >= 2)
    rows = evaluate(TARGETS + (MULTI_GPU_TARGETS if multi_gpu else []), read_reports(out))
    print(f"\n==== issue 9 targets on {device}{' (--quick)' if args.quick else ''} ====")
    print(format_table(rows))
    if (launches := out / "launch_overhead.json").is_file():
        print(launch_summary(json.loads(launches.read_text())))
    return 0 if all(row.result == "pass" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
