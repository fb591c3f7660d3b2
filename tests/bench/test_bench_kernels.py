"""bench.kernels' logic on CPU: every case and every sweep candidate built and checked, at small
shapes through the Triton interpreter, with the GPU timer replaced by a single call. (On a GPU
the same code times them; this only makes sure that the one command there runs through.)"""

import pytest
import torch

import bench.kernels as bench
from tests.kernels.common import kernel_backend

SMALL = dict(HIDDEN=96, Q_HEADS=4, KV_HEADS=2, HEAD_DIM=64, TOKENS=6, BLOCK_SIZE=4, MAX_MODEL_LEN=256,
             BATCHES=(2,), CONTEXTS=(37,), PROMPTS=(21,), DECODE_SWEEP=((1, 40),), DEVICE="cpu")


@pytest.fixture
def small_bench(monkeypatch):
    import triton.testing

    for name, value in SMALL.items():
        monkeypatch.setattr(bench, name, value)
    monkeypatch.setattr(bench, "graphed", lambda fn: fn)
    monkeypatch.setattr(bench, "_fits", lambda nbytes: True)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, return_mode: (fn(), 0.5)[1])
    torch.manual_seed(0)
    with kernel_backend("triton"):
        yield


def test_every_case_runs_each_implementation(small_bench):
    rows = [row for case in bench._cases(torch.bfloat16) for row in bench.measure(case, 1000.0, False)]
    assert not [row for row in rows if "error" in row]
    impls = {(row["kernel"], row["impl"]) for row in rows}
    assert {("paged_decode_attention", "triton graph"), ("attention_frontend", "triton unfused"),
            ("paged_prefill_attention", "sdpa flash"), ("rms_norm", "torch eager")} <= impls
    prefill = [row for row in rows if row["kernel"] == "paged_prefill_attention"]
    assert all("tflops" in row and "gbps" not in row for row in prefill)
    assert all(bench.format_row(row) for row in rows)


def _check_sweeps(keep) -> None:
    for sweep in bench.sweeps(torch.bfloat16):
        labels = list(sweep.candidates)
        assert labels[0] == "heuristic"
        sweep.candidates = {label: sweep.candidates[label] for label in keep(labels)}
        rows = bench.run_sweep(sweep, 1000.0)
        assert not [row for row in rows if "error" in row], sweep.kernel
        assert sum(row["best"] for row in rows) == 1
        assert all(bench.format_sweep_row(row) for row in rows)


def test_sweep_candidates_match_the_heuristic(small_bench):
    """The heuristic and the first and last candidate of each sweep (all of them: the slow test)."""
    _check_sweeps(lambda labels: [labels[0], labels[1], labels[-1]])


@pytest.mark.slow
def test_every_sweep_candidate_matches_the_heuristic(small_bench):
    _check_sweeps(lambda labels: labels)


def test_a_candidate_that_writes_nothing_is_refused(small_bench):
    sweep = next(bench.sweeps(torch.bfloat16))
    sweep.candidates["broken"] = bench.Launch(sweep.candidates["heuristic"].kernel, (0,), {})  # an empty grid
    rows = {row["config"]: row for row in bench.run_sweep(sweep, 1000.0)}
    assert "differs" not in rows["heuristic"].get("error", "")
    assert "Mismatched" in rows["broken"]["error"] or "nan" in rows["broken"]["error"].lower()
