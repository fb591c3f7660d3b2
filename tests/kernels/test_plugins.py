"""Kernel plug-ins: `op=module:function` specs, their load-time check against the op's torch
reference, and the dispatch that then runs them wherever the op runs."""

import pytest
import torch

import nanoserve_kernels
import tests.plugins.rms_norm_torch as example
from nanoserve_kernels.backend import parse_backend
from nanoserve_kernels.plugins import HeadLayout, PluginCheckFailed, check_plugins
from nanoserve_kernels.rms_norm import rms_norm_reference
from tests.kernels.common import kernel_backend, randn

EXAMPLE = "rms_norm=tests.plugins.rms_norm_torch:rms_norm"


def test_plugin_specs_parse_beside_backends():
    assert parse_backend(f"triton,{EXAMPLE}") == ("triton", {"rms_norm": "tests.plugins.rms_norm_torch:rms_norm"})
    assert parse_backend("decode_attention=my/flash.py:decode") == ("auto", {"decode_attention": "my/flash.py:decode"})


@pytest.mark.parametrize("spec,message", [
    ("rms_norm=no_such_module:rms_norm",
     r"plug-in rms_norm=no_such_module:rms_norm: cannot import no_such_module: No module named 'no_such_module'"),
    ("rms_norm=tests.plugins.rms_norm_torch:nope",
     r"plug-in rms_norm=tests.plugins.rms_norm_torch:nope: tests.plugins.rms_norm_torch has no function 'nope'"),
    ("rms_norm=tests/plugins/missing.py:rms_norm", r"no such file tests/plugins/missing.py"),
    ("rms_norm=tests.plugins.wrong:FACTOR", r"tests.plugins.wrong.FACTOR is a float, not a function"),
    ("flash_norm=tests.plugins.rms_norm_torch:rms_norm", r"unknown op 'flash_norm' \(ops: attention_frontend, "),
    ("triton,tests.plugins.rms_norm_torch:rms_norm", r"a plug-in needs the op it implements"),
])
def test_bad_plugin_specs_are_clear_errors_and_change_nothing(spec, message):
    before = nanoserve_kernels.get_backend()
    with pytest.raises(ValueError, match=message):
        nanoserve_kernels.set_backend(spec)
    assert nanoserve_kernels.get_backend() == before


def test_a_plugin_given_as_a_file_path_loads():
    with kernel_backend("rms_norm=tests/plugins/rms_norm_torch.py:rms_norm"):
        [check] = check_plugins("cpu", torch.float32)
    assert check.op == "rms_norm" and check.max_abs_diff < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_example_plugin_passes_its_load_time_check(dtype):
    with kernel_backend(EXAMPLE):
        [check] = check_plugins("cpu", dtype, HeadLayout(hidden=40, q_heads=6, kv_heads=2, head_dim=32, block_size=8))
    assert check.describe().startswith(f"plug-in {EXAMPLE} matches its torch reference (max |Δ| ")


@pytest.mark.parametrize("target,message", [
    ("tests.plugins.wrong:scaled_rms_norm",
     r"plug-in rms_norm=tests.plugins.wrong:scaled_rms_norm \(hidden rows \[5, hidden\]; float32 on cpu\) does not "
     r"match the torch reference: out differs by up to 0\.0\d+ \(tolerance "),
    ("tests.plugins.wrong:raising_rms_norm",
     r"plug-in rms_norm=tests.plugins.wrong:raising_rms_norm \(hidden rows .*\) raised NotImplementedError: only head_dim 128"),
])
def test_a_wrong_plugin_fails_its_load_time_check_naming_the_op_and_the_difference(target, message):
    with kernel_backend(f"rms_norm={target}"), pytest.raises(PluginCheckFailed, match=message):
        check_plugins("cpu", torch.float32)


def test_a_wrong_decode_attention_fails_its_check():
    with kernel_backend("decode_attention=tests.plugins.wrong:scaled_decode_attention"):
        with pytest.raises(PluginCheckFailed, match=r"decode_attention=.*\(3 sequences of \[1, 17, 43\] tokens"):
            check_plugins("cpu", torch.float32)


def test_every_call_of_the_op_goes_to_the_plugin(monkeypatch):
    """rms_norm, fused_add_rms_norm and (unfused) the front-end's q/k norms all reach the plug-in."""
    seen = []
    monkeypatch.setattr(example, "rms_norm", lambda x, w, eps: (seen.append(x.dim()), rms_norm_reference(x, w, eps))[1])
    x, residual, weight = randn(3, 64, dtype=torch.float32), randn(3, 64, dtype=torch.float32), randn(64, dtype=torch.float32)
    qkv = randn(3, (4 + 2 * 2) * 16, dtype=torch.float32)
    caches = [torch.zeros(2, 4, 2, 16) for _ in range(2)]
    cos_sin = nanoserve_kernels.build_cos_sin_cache(8, 16, 1e4)
    with kernel_backend(EXAMPLE):
        nanoserve_kernels.rms_norm(x, weight, 1e-6)
        out, summed = nanoserve_kernels.fused_add_rms_norm(x, residual, weight, 1e-6)
        q, k, v = nanoserve_kernels.attention_frontend(qkv, weight[:16], weight[16:32], 1e-6, torch.tensor([0, 3, 5]), cos_sin,
                                             *caches, torch.tensor([0, 1, 6]))
    assert seen == [2, 2, 3, 3]  # hidden, hidden + residual, q heads, k heads
    torch.testing.assert_close(summed, x + residual)
    torch.testing.assert_close(out, rms_norm_reference(x + residual, weight, 1e-6))
    assert k is not None and v is not None  # the unfused front-end returns what it stored
    with kernel_backend(f"{EXAMPLE},attention_frontend=torch"):  # a backend named for it keeps it fused
        nanoserve_kernels.attention_frontend(qkv, weight[:16], weight[16:32], 1e-6, torch.tensor([0, 3, 5]), cos_sin,
                                   *caches, torch.tensor([0, 1, 6]))
    assert seen == [2, 2, 3, 3]


def test_the_environment_names_plugins_too():
    """`NANOSERVE_KERNELS` is read when `nanoserve_kernels` is imported; a plug-in module may import it itself."""
    import os
    import subprocess
    import sys

    script = "import nanoserve_kernels, nanoserve_kernels.backend as b; print(nanoserve_kernels.get_backend(), sorted(b.PLUGINS))"
    env = os.environ | {"NANOSERVE_KERNELS": "torch,decode_attention=tests.plugins.wrong:scaled_decode_attention"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout == "torch,decode_attention=tests.plugins.wrong:scaled_decode_attention ['decode_attention']\n"
