"""Without triton (it is Linux-only) `kernels` still imports and every op runs its reference."""

import subprocess
import sys

SCRIPT = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
import kernels
from kernels.rms_norm import rms_norm_reference
x, w = torch.randn(3, 8), torch.randn(8)
assert torch.equal(kernels.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
try:
    kernels.set_backend("triton")
except RuntimeError as err:
    print(err)
"""


def test_kernels_import_and_fall_back_without_triton():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "needs the triton package" in result.stdout
