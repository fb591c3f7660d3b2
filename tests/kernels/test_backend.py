"""Kernel backends: per-op specs (`triton,decode_attention=torch`) and their dispatch; without
triton (it is Linux-only) `nanoserve_kernels` still imports and every op runs its reference."""

import subprocess
import sys

import pytest
import torch

import nanoserve_kernels
from nanoserve_kernels._triton import Launch
from nanoserve_kernels.backend import OPS, parse_backend, use_triton
from tests.kernels.common import kernel_backend, randn

SCRIPT = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
import nanoserve_kernels
from nanoserve_kernels.rms_norm import rms_norm_reference
x, w = torch.randn(3, 8), torch.randn(8)
assert torch.equal(nanoserve_kernels.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
try:
    nanoserve_kernels.set_backend("triton")
except RuntimeError as err:
    print(err)
"""


def test_kernels_import_and_fall_back_without_triton():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "needs the triton package" in result.stdout


def test_backend_spec_parsing():
    assert parse_backend("auto") == ("auto", {})
    assert parse_backend("triton,decode_attention=torch") == ("triton", {"decode_attention": "torch"})
    assert parse_backend("rope=triton, store_kv=torch") == ("auto", {"rope": "triton", "store_kv": "torch"})
    assert parse_backend("prefill_attention=torch,torch") == ("torch", {"prefill_attention": "torch"})


@pytest.mark.parametrize("spec,message", [
    ("", "unknown kernel backend ''"),
    ("cuda", "unknown kernel backend 'cuda'"),
    ("triton,decode_attention=tor", "unknown kernel backend 'tor'"),
    ("triton,paged_decode_attention=torch", "unknown op 'paged_decode_attention'"),
    ("triton,=torch", "unknown op ''"),
    ("triton,torch", "two default backends"),
    ("rope=torch,rope=triton", "op 'rope' given twice"),
])
def test_bad_backend_specs_are_refused_by_name(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_backend(spec)


def test_each_op_follows_its_own_backend():
    cpu = torch.empty(1, device="cpu")
    for op in OPS:
        with kernel_backend(f"triton,{op}=torch"):
            assert nanoserve_kernels.get_backend() == f"triton,{op}=torch"
            assert [use_triton(cpu, other) for other in OPS] == [other != op for other in OPS]
        with kernel_backend(f"torch,{op}=triton"):
            assert [use_triton(cpu, other) for other in OPS] == [other == op for other in OPS]
        with kernel_backend(f"auto,{op}=triton"):
            assert [use_triton(cpu, other) for other in OPS] == [other == op for other in OPS]


def test_public_ops_dispatch_per_op(monkeypatch):
    """Under `triton,rms_norm=torch` the norm runs its reference (no launch) and store_kv launches."""
    launched = []
    run = Launch.__call__
    monkeypatch.setattr(Launch, "__call__", lambda self: (launched.append(self.kernel.__name__), run(self)))
    x, weight = randn(3, 64, dtype=torch.float32), randn(64, dtype=torch.float32)
    k = randn(2, 1, 64, dtype=torch.float32)
    cache = torch.zeros(1, 4, 1, 64)
    with kernel_backend("triton,rms_norm=torch"):
        nanoserve_kernels.rms_norm(x, weight, 1e-6)
        nanoserve_kernels.fused_add_rms_norm(x, x, weight, 1e-6)
        assert launched == []
        nanoserve_kernels.store_kv(k, k, cache, cache.clone(), torch.tensor([0, 3]))
        assert launched == ["_store_kv_kernel"]


def test_cli_refuses_a_bad_kernels_flag_in_one_line():
    result = subprocess.run([sys.executable, "-m", "server.cli", "generate", "--kernels", "triton,foo=torch", "hi"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr == ("nanoserve: error: argument --kernels: 'triton,foo=torch': unknown op 'foo' "
                             "(ops: attention_frontend, decode_attention, prefill_attention, rms_norm, rope, store_kv, token_bitmask)\n")
