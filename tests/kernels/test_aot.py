"""Every kernel compiles for sm_90 and sm_80 on this CPU-only machine, without register spills.

The compile runs in a subprocess: with TRITON_INTERPRET=1 (set for this test session) @triton.jit
builds interpreter functions, which cannot be compiled for a GPU.
"""

import json
import os
import subprocess
import sys

import pytest

OPS = {"rms_norm", "fused_add_rms_norm", "rms_norm (q/k heads)", "apply_rope", "store_kv",
       "paged_decode_attention", "paged_decode_attention merge", "paged_prefill_attention",
       "attention_frontend", "apply_token_bitmask"}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> list[dict]:
    path = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NANOSERVE_KERNELS")}
    result = subprocess.run([sys.executable, "-m", "nanoserve_kernels.report", "--json", str(path)],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(path.read_text())


def test_every_kernel_compiles_for_both_targets_in_every_model_specialisation(report):
    compiled = {(r["kernel"], r["target"], r["shape"].split(" B=")[0]) for r in report}
    shapes = {f"{dtype} D={d}" for dtype in ("bf16", "fp16") for d in (64, 128)}
    for op in OPS - {"rms_norm", "fused_add_rms_norm", "apply_token_bitmask"}:
        assert {(op, target, shape) for target in ("sm_90", "sm_80") for shape in shapes} <= compiled
    for op in ("rms_norm", "fused_add_rms_norm"):
        assert {(op, target, f"{dtype} H=4096") for target in ("sm_90", "sm_80") for dtype in ("bf16", "fp16")} <= compiled
    assert {("apply_token_bitmask", target, "fp32 V=151936") for target in ("sm_90", "sm_80")} <= compiled


def test_no_kernel_spills_registers(report):
    spilled = [(r["kernel"], r["shape"], r["target"], r["spill_bytes"]) for r in report if r["spill_bytes"]]
    assert not spilled


def test_hidden_size_norms_move_data_in_128_bit_accesses(report):
    for r in report:
        if r["kernel"] in ("rms_norm", "fused_add_rms_norm"):
            assert r["loads_128"] == r["loads"] and r["stores_128"] == r["stores"], r
