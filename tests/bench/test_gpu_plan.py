"""bench.gpu's whole --quick plan on CPU, every step faked by a process that hangs, with every
limit, the budget and the grace scaled down alike: the run ends within its budget however the
steps behave, a hung step is stopped (SIGINT, then SIGKILL for one that ignores it), steps the
budget no longer holds are skipped, and a pytest stopped mid-way leaves its JUnit XML."""

import json
import sys
import time

from bench.gpu import QUICK_BUDGET_S, QUICK_TESTS, WRITE_CHECKPOINT, Steps, run_plan

SCALE = 0.03  # the 540 s budget as 16.2 s
# The 20 s grace scaled would be 0.6 s: less than a pytest on a busy 2-core machine takes to write
# its XML after SIGINT (2.5 s measured), so the fake keeps this much.
GRACE_S = 2.5
HANG_IGNORING_SIGINT = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(3600)"
TESTS = """
import time

def test_finishes():
    pass

def test_hangs():
    time.sleep(3600)
"""


def test_the_quick_plan_ends_within_its_budget_and_a_stopped_pytest_leaves_its_xml(tmp_path):
    test_file = tmp_path / "fake_tests" / "test_fake.py"
    test_file.parent.mkdir()
    test_file.write_text(TESTS)
    out = tmp_path / "out"
    out.mkdir()

    class FakeSteps(Steps):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.grace = GRACE_S

        def python(self, *args: str) -> list[str]:
            if args[:2] == ("-m", "pytest"):  # a real pytest over tests that hang
                junit = next(arg for arg in args if arg.startswith("--junitxml="))
                return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", junit,
                        "--rootdir", str(test_file.parent), str(test_file)]
            if "preflight" in args or WRITE_CHECKPOINT in args:
                return [sys.executable, "-c", "pass"]
            return [sys.executable, "-c", HANG_IGNORING_SIGINT]  # the smoke, the benches, the server

    started = time.monotonic()
    steps = run_plan(out, quick=True, skip_tests=False, scale=SCALE, steps_class=FakeSteps)
    elapsed = time.monotonic() - started
    assert elapsed <= QUICK_BUDGET_S * SCALE + 0.5, steps.outcomes  # 0.5 s: returning and the table
    outcomes = steps.outcomes
    assert outcomes["pre-flight"] == "ok" and outcomes["engine smoke (0.6B shape, GPU defaults)"] == "timeout"
    assert outcomes[f"CUDA tests: {QUICK_TESTS[0]}"] == "timeout"
    assert outcomes["bench.kernels"] == "timeout"
    assert "skipped" in outcomes.values(), outcomes  # SIGKILL after each grace: the budget ran out
    xml = out / "junit" / (QUICK_TESTS[0].replace("/", ".") + ".xml")
    assert xml.is_file(), "the stopped pytest wrote no JUnit XML"
    cases = json.loads((out / "tests.json").read_text())["cases"]
    assert cases["test_fake::test_finishes"] == "passed"
    assert cases[f"{QUICK_TESTS[0]}::(run timeout)"] == "error"
    assert (out / "triton-cache").parent == out  # where TRITON_CACHE_DIR points
    assert steps.env["TRITON_CACHE_DIR"] == str((out / "triton-cache").resolve())


def test_preflight_imports_every_dependency_and_reports_the_versions():
    from bench.gpu_smoke import preflight

    report = preflight()
    assert report["missing"] == {}
    assert report["torch"] and report["triton"] and report["python"]
    assert report["ok"] is report["cuda_available"]  # on a CPU machine: not ready, and it says so
