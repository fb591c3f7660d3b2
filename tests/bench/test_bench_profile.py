"""bench.profile's table, from a synthetic list of kernel events (the profiler itself needs CUDA)."""

import importlib

import pytest

from bench.profile import TRITON_KERNELS, KernelEvent, build_table, bytes_per_step, format_table
from model.config import Qwen3Config


def test_table_groups_kernels_and_reports_share_and_bandwidth():
    # Two steps of 100 us wall time each: two norms, a GEMM, one elementwise torch op.
    events = [KernelEvent("_rms_norm_kernel", 5.0), KernelEvent("_rms_norm_kernel", 7.0),
              KernelEvent("_rms_norm_kernel", 4.0), KernelEvent("_rms_norm_kernel", 8.0),
              KernelEvent("sm90_xmma_gemm_bf16bf16_bf16f32", 30.0), KernelEvent("nvjet_tst_128x64", 40.0),
              KernelEvent("void at::vectorized_elementwise_kernel<silu>", 3.0)]
    moved = {"_rms_norm_kernel": 24e3, "gemm": 70e3}  # bytes per step
    rows = {(r.group, r.name): r for r in build_table(events, steps=2, step_us=100.0, bytes_per_step=moved,
                                                       copy_gbps=4000.0)}
    norm = rows["triton", "_rms_norm_kernel"]
    assert (norm.calls_per_step, norm.us_per_step, norm.pct_of_step) == (2, 12.0, 12.0)
    assert norm.gbps == pytest.approx(24e3 / 12.0 / 1e3) and norm.pct_copy == pytest.approx(100 * 2.0 / 4000)
    gemm = rows["gemm", "gemm"]  # the group's total row carries the group's bytes
    assert (gemm.calls_per_step, gemm.us_per_step, gemm.gbps) == (1, 35.0, pytest.approx(2.0))
    assert rows["gemm", "nvjet_tst_128x64"].gbps is None  # one GEMM's own bytes are not known
    assert rows["other", "other"].us_per_step == 1.5
    idle = rows["idle", "GPU idle (waiting for the host)"]
    assert idle.us_per_step == pytest.approx(100 - 12 - 35 - 1.5)
    text = format_table("decode", list(rows.values()))
    assert "= all gemm" in text and "GPU idle" in text and text.splitlines()[0] == "decode"


def test_triton_kernel_names_are_the_kernels_own():
    # (the package's names rms_norm etc. are the functions: fetch the modules themselves)
    modules = [importlib.import_module(f"nanoserve_kernels.{op}") for op in ("rms_norm", "attention_frontend", "decode_attention",
                                                                  "prefill_attention", "rope", "store_kv")]
    defined = {name for module in modules for name in vars(module) if name.endswith("_kernel")}
    assert set(TRITON_KERNELS) == defined


def test_bytes_per_decode_step_by_hand():
    c = Qwen3Config(vocab_size=100, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64,
                    tie_word_embeddings=False, dtype=None)
    moved = bytes_per_step(c, element=2, num_tokens=3, logit_rows=3, contexts=[10, 20, 5], decode=True)
    kv_row = 2 * 4 * 2  # kv heads x head_dim x bytes
    assert moved["_decode_split_kernel"] == 2 * (35 * 2 * kv_row + 2 * 3 * 16 * 2)
    assert moved["_attention_frontend_kernel"] == 2 * 3 * ((16 + 16) * 2 + 16 * 2 + 2 * kv_row + 16 + 4 * 4)
    assert moved["_rms_norm_kernel"] == (2 * 3 * 8 + 3 * 4 * 3 * 8 + 4 * 3 * 8) * 2
    weights = 2 * (8 * 32 + 16 * 8 + 8 * 32 + 16 * 8) + 100 * 8
    assert moved["gemm"] > weights * 2
