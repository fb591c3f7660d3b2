"""bench/kernels.py needs CUDA; without it, it says so and exits with status 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the benchmark would run for minutes")
def test_kernel_bench_says_it_needs_cuda(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH), "--out", str(tmp_path / "k.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr
    assert not (tmp_path / "k.json").exists()
