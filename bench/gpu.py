"""Everything that needs a GPU, in one command, ending in one table: each target of issue 9, what
was measured, pass or FAIL.

    python -m bench.gpu [--quick] [--out-dir bench/out/gpu] [--skip-tests] [--table-only]

Each step runs as a subprocess under a time limit, so a crash or a hang costs its own rows (they
read "not measured") and not the run; each writes JSON to `--out-dir`, and the table is built
from those files alone (`python -m bench.gpu --table-only` rebuilds it from an earlier run's).
A step past its limit gets SIGINT (pytest then writes its JUnit XML), then SIGKILL 20 s later.
Compiled Triton kernels are cached under `--out-dir` (TRITON_CACHE_DIR), so a rerun starts warm.
In this order, the most telling first (`run_plan`):

1. a pre-flight (`bench.gpu_smoke preflight`): every runtime and test dependency imports; the
   torch, Triton and CUDA versions, SM count and free memory; nothing else runs if it fails;
2. an engine smoke (`bench.gpu_smoke engine`): the Qwen3-0.6B shape with the GPU-default flags
   (memory profile, graph capture, a prefill, 16 decodes, a mixed step, graph vs eager logits);
3. the CUDA tests, one pytest and one JUnit XML per test file (`--quick`: QUICK_TESTS);
4. `bench.kernels` (`--quick`: only the cases the targets read, no torch.compile; its JSON is
   rewritten after every case);
5. `bench.generate` on the Qwen3-8B and Qwen3-0.6B shapes (random bf16 weights), nanoserve with
   CUDA graphs and with `--enforce-eager` side by side, against HF eager `generate()`;
6. `bench.serve` against `nanoserve serve` on a random Qwen3-0.6B-shaped checkpoint (default
   engine flags), 1, 16 and 64 clients streaming 128-token replies;
7. `bench.launch_overhead`, whose figures (no target) print in one line under the table.

`--quick` keeps repeats small and compiles nothing with torch.compile, and ends within
QUICK_BUDGET_S: every step's limit, the checkpoint write, the server's start and shutdown and
the grace of a stopped step all come out of that budget, and a step that the budget no longer
holds is skipped. Exit status 0 when every target passes, 1 when one fails or was not measured;
without CUDA it says so and exits 2.
"""

import argparse
import json
import os
import shutil
import signal
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
               "tests/server/engine/test_piecewise_graph.py::test_replayed_pieces_equal_the_eager_forward_and_padding_stores_nothing",
               # its CUDA case only: the CPU cases are the default run's
               "tests/server/engine/test_async_scheduling.py::test_on_cuda_async_scheduling_with_graphs_gives_exactly_the_synchronous_output",
               "tests/kernels/test_decode_attention.py"]
SERVE_LEVELS = {1: 8, 16: 64, 64: 192}  # clients: requests
SERVE_OUTPUT_TOKENS = 128
# Poisson arrivals at this share of the 16-client closed loop's request rate, with room for 64 in flight.
POISSON_SHARE, POISSON_CLIENTS, POISSON_OF = 0.8, 64, 16
QUICK_BUDGET_S = 540  # --quick ends within this (and a table), whatever a step does
REPORTS = ("engine-smoke", "tests", "kernels", "generate-8b", "generate-0.6b", "serve", "tp")  # the steps' JSON files, by name


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


KERNEL_TARGET_CASES: list[str] = []  # "kernel shape" of every bench.kernels case a target reads: --quick runs these


def _kernel_row(kernel: str, shape: str, impl: str = "triton") -> Callable[[dict], dict | None]:
    KERNEL_TARGET_CASES.append(f"{kernel} {shape}")

    def find(report: dict) -> dict | None:
        return next((r for r in report.get("rows", []) if r["kernel"] == kernel and r["shape"] == shape
                     and r["impl"] == impl and "ms" in r), None)
    return find


def _pct_of_copy(kernel: str, shape: str) -> Callable[[dict], tuple[float, str] | None]:
    find = _kernel_row(kernel, shape)

    def measure(report: dict) -> tuple[float, str] | None:
        row = find(report)
        return None if row is None else (row["pct_copy"], f"{row['pct_copy']:.1f}% ({row['ms'] * 1e3:.1f} us)")
    return measure


def _kernel_us(kernel: str, shape: str, impl: str) -> Callable[[dict], tuple[float, str] | None]:
    find = _kernel_row(kernel, shape, impl)

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


def _closed_loop(report: dict, clients: int) -> dict | None:
    return next((lv for lv in report.get("levels", []) if lv["concurrency"] == clients and not lv.get("request_rate")),
                None)


def _serve(clients: int, figure: str) -> Callable[[dict], tuple[float, str] | None]:
    def measure(report: dict) -> tuple[float, str] | None:
        level = _closed_loop(report, clients)
        if level is None or level["errors"] or level["itl_s"]["p50"] is None:
            return None
        tok_s, itl_ms = level["output_tokens_per_s"], level["itl_s"]["p50"] * 1e3
        shown = f"{tok_s:.0f} tok/s, ITL p50 {itl_ms:.2f} ms"
        return (tok_s if figure == "tok/s" else itl_ms), shown
    return measure


def _poisson_itl_ratio(report: dict) -> tuple[float, str] | None:
    """ITL p50 under Poisson arrivals over the closed loop's (the arrivals make prompts land in
    decode steps, which the closed loop's equal lengths hide)."""
    closed = _closed_loop(report, POISSON_OF)
    poisson = next((lv for lv in report.get("levels", []) if lv.get("request_rate")), None)
    if closed is None or poisson is None or poisson["errors"] or not poisson["itl_s"]["p50"] or not closed["itl_s"]["p50"]:
        return None
    ratio = poisson["itl_s"]["p50"] / closed["itl_s"]["p50"]
    return ratio, (f"{ratio:.2f}x ({poisson['itl_s']['p50'] * 1e3:.2f} ms at {poisson['request_rate']:.1f} req/s "
                   f"vs {closed['itl_s']['p50'] * 1e3:.2f} ms)")


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


def _smoke(report: dict) -> tuple[float, str] | None:
    if "ok" not in report:
        return None
    if not report["ok"]:
        return 1, report.get("error", f"tokens {report.get('tokens')}")[:80]
    return 0, f"ok ({report['decode_mode'][:40]}; graph-eager logits within {report['graph_vs_eager_max_abs_diff']:.3f})"


def _startup_s(report: dict) -> tuple[float, str] | None:
    seconds = report.get("seconds", {})
    if "capture_s" not in seconds:
        return None
    total = seconds["profile_s"] + seconds["capture_s"]
    return total, f"{total:.1f} s (profile {seconds['profile_s']:.1f}, capture {seconds['capture_s']:.1f})"


TARGETS = [
    Target("engine smoke: 0.6B shape, GPU defaults", "engine-smoke", _smoke, "<=", 0, "runs"),
    Target("startup 0.6B with graphs (profile + capture), s", "engine-smoke", _startup_s, "<=", 30, "<= 30 s"),
    Target("CUDA tests pass", "tests", _tests_pass, "<=", 0, "0 failed"),
    Target("greedy tokens: graphs == --enforce-eager (CUDA)", "tests", _graphs_equal_eager, "<=", 0, "identical"),
    Target("rms_norm 4096x4096, % of copy bandwidth", "kernels", _pct_of_copy("rms_norm", "4096x4096"), ">=", 85, ">= 85%"),
    Target("fused_add_rms_norm 4096x4096, %", "kernels", _pct_of_copy("fused_add_rms_norm", "4096x4096"), ">=", 85,
           ">= 85%"),
    Target("per-head norm 4096x32x128, %", "kernels", _pct_of_copy("rms_norm (q heads)", "4096x32x128"), ">=", 70,
           ">= 70%"),
    Target("apply_rope 4096x(32+8)x128, %", "kernels", _pct_of_copy("apply_rope", "4096x(32+8)x128"), ">=", 80, ">= 80%"),
    Target("store_kv 4096x8x128, %", "kernels", _pct_of_copy("store_kv", "4096x8x128"), ">=", 80, ">= 80%"),
    # The engine replays decode from CUDA graphs: the replayed row, not the eager call's host time.
    Target("decode attention B=1 L=512, us (graph replay)", "kernels",
           _kernel_us("paged_decode_attention", "B=1 L=512", "triton graph"), "<=", 12, "<= 12 us"),
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
    Target("serve 0.6B, Poisson at 80% of 16 clients' rate: ITL p50 / closed loop's", "serve", _poisson_itl_ratio,
           "<=", 1.5, "<= 1.5x"),
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


def junit_report(runs: Path | list[tuple[str, Path, str]], which: str) -> dict:
    """pytest's JUnit XML as counts and per-test outcomes: one file, or (test file, its XML, how
    its step ended) per test file run; a file whose run left no XML counts as one error."""
    if isinstance(runs, Path):
        runs = [("", runs, "ok")]
    cases = {}
    for spec, path, outcome in runs:
        if path.is_file():
            cases |= _junit_cases(path)
        if outcome != "ok":  # stopped or skipped: what it did not run must not read as passed
            cases[f"{spec}::(run {outcome})"] = "error"
    counts = {word: sum(outcome == word for outcome in cases.values()) for word in ("passed", "failed", "skipped")}
    return {"which": which, **counts, "errors": sum(outcome == "error" for outcome in cases.values()), "cases": cases}


def _junit_cases(path: Path) -> dict[str, str]:
    cases = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child, word in (("skipped", "skipped"), ("failure", "failed"), ("error", "error")):
            if case.find(child) is not None:
                outcome = word
        cases[name] = outcome
    return cases


def merge_serve_levels(paths: list[Path]) -> dict:
    return {"levels": [level for path in paths if path.is_file() for level in json.loads(path.read_text())["levels"]]}


# ---- the steps (CUDA) ----


INTERRUPT_GRACE_S = 20  # after SIGINT (pytest writes its JUnit XML then, a server shuts down), before SIGKILL
MIN_STEP_S = 5  # a step that would get less is skipped: it could do nothing useful
# Each step's limit; with --quick their sum is about QUICK_BUDGET_S, and the run's deadline caps them all.
QUICK_LIMITS = {"preflight": 20, "engine smoke": 60, "tests": 150, "kernels": 60, "generate-8b": 90,
                "generate-0.6b": 45, "checkpoint": 30, "server start": 60, "serve level": 30, "launch overhead": 20,
                "tp": 60}
FULL_LIMITS = {"preflight": 60, "engine smoke": 300, "tests": 2400, "kernels": 1800, "generate-8b": 1200,
               "generate-0.6b": 600, "checkpoint": 300, "server start": 240, "serve level": 300, "launch overhead": 90,
               "tp": 300}
WRITE_CHECKPOINT = ("import sys; from bench.generate import SHAPES; from model.demo import write_checkpoint; "
                    "write_checkpoint(sys.argv[1], SHAPES['qwen3-0.6b'] | {'dtype': 'bfloat16'}, seed=0)")


class Steps:
    """Runs the steps as subprocesses, each under its own limit and all before one deadline, so that
    a hang costs its own figures and the table still comes out in time. Everything counts against
    the deadline: checkpoint writes, a server's start and shutdown, and the grace a stopped step gets.
    `scale` shrinks every limit, the budget and the grace alike (the plan's CPU test)."""

    def __init__(self, out_dir: Path, quick: bool, budget_s: float, scale: float = 1.0):
        self.out = out_dir
        self.quick = quick
        self.scale = scale
        self.limits = {name: limit * scale for name, limit in (QUICK_LIMITS if quick else FULL_LIMITS).items()}
        self.grace = INTERRUPT_GRACE_S * scale
        self.held_back = 0.0  # seconds kept for stopping what outlives a step (the server of the serve step)
        self.ends = time.monotonic() + budget_s * scale
        # Compiled kernels land in the out dir: a rerun on the same machine starts warm.
        self.env = os.environ | {"TRITON_CACHE_DIR": str((out_dir / "triton-cache").resolve())}
        self.outcomes: dict[str, str] = {}  # step -> "ok", "failed (rc)", "timeout" or "skipped"

    def python(self, *args: str) -> list[str]:
        """The command that runs this Python with `args` (the plan's CPU test fakes it)."""
        return [sys.executable, *args]

    def left(self) -> float:
        return self.ends - time.monotonic() - self.held_back

    def start(self, command: list[str], log: str) -> subprocess.Popen:
        with open(self.out / log, "w") as out:
            # A session of its own: stopping it stops its children (a test's live server) too.
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=self.env,
                                    preexec_fn=_default_sigint)

    def stop(self, process: subprocess.Popen) -> None:
        """SIGINT (pytest writes its XML, a server drains), then SIGKILL once the grace is over."""
        if process.poll() is not None:
            return
        for sig, wait in ((signal.SIGINT, self.grace), (signal.SIGKILL, None)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def run(self, name: str, command: list[str], limit: float, log: str) -> bool:
        """One step, its output to `log` in the out dir and its tail to the terminal; False if it
        failed, ran out of time or was skipped because the budget is spent."""
        timeout = min(limit, self.left() - self.grace)  # a stopped step's grace comes out of the budget too
        if timeout < MIN_STEP_S * self.scale:
            print(f"\n==== {name}: skipped, {max(self.left(), 0):.0f} s of the budget left ====", flush=True)
            self.outcomes[name] = "skipped"
            return False
        print(f"\n==== {name} (at most {timeout:.0f} s) ====", flush=True)
        started = time.monotonic()
        process = self.start(command, log)
        try:
            rc = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(process)
            rc = "timeout"
        print((self.out / log).read_text(errors="replace")[-2500:])
        self.outcomes[name] = "ok" if rc == 0 else "timeout" if rc == "timeout" else f"failed ({rc})"
        print(f"==== {name}: {self.outcomes[name]} in {time.monotonic() - started:.0f} s ====", flush=True)
        return rc == 0

    def preflight(self) -> bool:
        return self.run("pre-flight", self.python("-m", "bench.gpu_smoke", "preflight", "--out",
                                                  str(self.out / "preflight.json")), self.limits["preflight"], "preflight.log")

    def engine_smoke(self) -> None:
        self.run("engine smoke (0.6B shape, GPU defaults)",
                 self.python("-m", "bench.gpu_smoke", "engine", "--out", str(self.out / "engine-smoke.json")),
                 self.limits["engine smoke"], "engine-smoke.log")

    def tests(self) -> None:
        """One pytest per test file, each with its own JUnit XML: a file stopped mid-way keeps
        what it ran (SIGINT makes pytest write its XML), and costs only its own rows."""
        files = QUICK_TESTS if self.quick else sorted(str(p) for p in Path("tests").rglob("test_*.py"))
        share_ends = time.monotonic() + self.limits["tests"]
        junit = self.out / "junit"
        junit.mkdir(exist_ok=True)
        results = []
        for spec in files:
            xml = junit / (spec.replace("/", ".").replace("::", "-") + ".xml")
            xml.unlink(missing_ok=True)
            command = self.python("-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", spec)
            name = f"CUDA tests: {spec}"
            self.run(name, command, share_ends - time.monotonic(), f"tests-{xml.stem}.log")
            results.append((spec, xml, self.outcomes[name]))
        which = "quick: " + ", ".join(QUICK_TESTS) if self.quick else "the whole suite"
        (self.out / "tests.json").write_text(json.dumps(junit_report(results, which), indent=1) + "\n")

    def generate(self, shape: str, batches: str) -> None:
        name = "generate-8b" if shape == "qwen3-8b" else "generate-0.6b"
        command = self.python("-m", "bench.generate", "--shape", shape, "--device", "cuda", "--dtype", "bfloat16",
                              "--batches", batches, "--prompt-len", "128", "--decode-tokens", "32" if self.quick else "64",
                              "--repeats", "2" if self.quick else "5",
                              "--modes", "graphs,eager" if self.quick and shape == "qwen3-8b" else "graphs,sync,eager",
                              "--out", str(self.out / f"{name}.json"))
        self.run(f"bench.generate {shape}", command, self.limits[name], f"{name}.log")

    def kernels(self) -> None:
        """With --quick only the cases the targets read (and no torch.compile); the JSON is
        rewritten after each case, so a stopped run keeps the cases it finished."""
        only = [arg for case in KERNEL_TARGET_CASES for arg in ("--only", case)] if self.quick else []
        command = self.python("-m", "bench.kernels", "--out", str(self.out / "kernels.json"),
                              *(["--no-compile", *only] if self.quick else []))
        self.run("bench.kernels", command, self.limits["kernels"], "kernels.log")

    def launch_overhead(self) -> None:
        command = self.python("-m", "bench.launch_overhead", "--device", "cuda",
                              "--repeats", "50" if self.quick else "200", "--out", str(self.out / "launch_overhead.json"))
        self.run("bench.launch_overhead", command, self.limits["launch overhead"], "launch_overhead.log")

    def tensor_parallel(self) -> None:
        if torch_device_count() < 2:
            print("\n==== bench.tp: skipped, it needs 2 GPUs ====", flush=True)
            return
        self.run("bench.tp (TP=2 vs TP=1)", self.python(*tp.command(self.out / "tp.json", self.quick)[1:]), self.limits["tp"],
                 "tp.log")

    def serve(self) -> None:
        """`nanoserve serve` (default flags) on a random 0.6B-shaped checkpoint, then bench.serve
        at each level of clients; the server's shutdown is held back from the budget while it runs."""
        checkpoint = Path(tempfile.mkdtemp(prefix="nanoserve-0.6b-"))
        try:
            if self.run("bench.serve: a random Qwen3-0.6B-shaped checkpoint", self.python("-c", WRITE_CHECKPOINT, str(checkpoint)),
                        self.limits["checkpoint"], "serve-checkpoint.log"):
                self._serve_levels(checkpoint)
        finally:
            shutil.rmtree(checkpoint, ignore_errors=True)

    def _serve_levels(self, checkpoint: Path) -> None:
        if self.left() - self.grace < MIN_STEP_S * self.scale:
            self.outcomes["nanoserve serve"] = "skipped"
            return
        from bench.launch import free_port, wait_healthy  # httpx: imported where a server runs

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = self.start(self.python("-m", "server.cli", "serve", "--model", str(checkpoint), "--port", str(port)),
                            "serve-server.log")
        self.held_back = self.grace
        try:
            if not wait_healthy(url, server, min(self.limits["server start"], self.left())):
                self.outcomes["nanoserve serve"] = "did not come up"
                print(f"the server did not come up:\n{(self.out / 'serve-server.log').read_text(errors='replace')[-3000:]}")
                return
            self.outcomes["nanoserve serve"] = "ok"
            paths = []
            for clients, requests in SERVE_LEVELS.items():
                path = self.out / f"serve-{clients}.json"
                command = self.python("-m", "bench.serve", "--url", url, "--endpoint", "completions",
                                      "--concurrency", str(clients), "--requests", str(requests if self.quick else 4 * requests),
                                      "--output-tokens", str(SERVE_OUTPUT_TOKENS), "--prompt-words", "64",
                                      "--out", str(path), "--plot", str(self.out / f"serve-{clients}.png"))
                if self.run(f"bench.serve, {clients} clients", command, self.limits["serve level"], f"serve-{clients}.log"):
                    paths.append(path)
            if (closed := self.out / f"serve-{POISSON_OF}.json").is_file():
                rate = POISSON_SHARE * _closed_loop(json.loads(closed.read_text()), POISSON_OF)["requests_per_s"]
                path = self.out / "serve-poisson.json"
                command = self.python("-m", "bench.serve", "--url", url, "--endpoint", "completions",
                                      "--concurrency", str(POISSON_CLIENTS), "--request-rate", f"{rate:.3f}",
                                      "--requests", str(SERVE_LEVELS[POISSON_OF] * (1 if self.quick else 4)),
                                      "--output-tokens", str(SERVE_OUTPUT_TOKENS), "--prompt-words", "64",
                                      "--out", str(path), "--plot", str(self.out / "serve-poisson.png"))
                if self.run(f"bench.serve, Poisson arrivals at {rate:.1f} req/s", command, self.limits["serve level"],
                            "serve-poisson.log"):
                    paths.append(path)
            (self.out / "serve.json").write_text(json.dumps(merge_serve_levels(paths), indent=1) + "\n")
        finally:
            self.held_back = 0.0
            self.stop(server)


def _default_sigint() -> None:
    """In the child: SIGINT back to its default. A shell starts background jobs with SIGINT
    ignored, children inherit that, and a pytest that ignores SIGINT never writes its XML."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_plan(out: Path, quick: bool, skip_tests: bool, scale: float = 1.0, steps_class: type = Steps) -> Steps:
    """Every step in order, most telling first, within QUICK_BUDGET_S with --quick: is the
    machine ready, does the serving path run at all, are the CUDA tests green (graph replay
    right), the kernel targets, the graph figures, serving; then the launch costs."""
    steps = steps_class(out, quick, QUICK_BUDGET_S if quick else float("inf"), scale)
    if not steps.preflight():
        print("pre-flight failed (see preflight.log): nothing else can run on this machine", flush=True)
        return steps
    steps.engine_smoke()
    if not skip_tests:
        steps.tests()
    steps.kernels()
    steps.generate("qwen3-8b", "1,64")
    steps.generate("qwen3-0.6b", "1")
    steps.serve()
    steps.launch_overhead()
    steps.tensor_parallel()  # only on a machine with 2 GPUs
    return steps


def torch_device_count() -> int:
    import torch

    return torch.cuda.device_count()


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
        for name in (*REPORTS, "launch_overhead", "preflight", "serve-poisson",
                     *(f"serve-{clients}" for clients in SERVE_LEVELS)):
            (out / f"{name}.json").unlink(missing_ok=True)  # a step failing now shows no earlier figures
        started = time.monotonic()
        run_plan(out, args.quick, args.skip_tests)
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
