"""Shared fixtures. Kernel tests on a machine without CUDA run Triton through its interpreter,
which must be enabled before any kernel module is imported, hence at the top of this file.
Every forward step of every test (and of the servers they start) checks that its batch stays
inside its KV cache (`model.batch.check_batch`), read when `model.batch` is imported."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NANOSERVE_CHECK_BATCHES", "1")

import pytest  # noqa: E402

from model.demo import write_checkpoint  # noqa: E402

FREE_MEMORY_MARK = "kv_cache_from_free_memory"
# CUDA tests load the demo in bf16, as a GPU serves: the fp32 demo's kernels take many times
# longer to compile (its prefill tiles spill) and no test needs its fp32 on a GPU.
CUDA_TEST_DTYPE = "bfloat16"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", f"{FREE_MEMORY_MARK}: the test may size the KV cache from free GPU memory (a profile, then a "
                   "cache filling the GPU); unmarked tests must give --num-kv-blocks")


@pytest.fixture(autouse=True)
def _kv_cache_sized_explicitly(request, monkeypatch):
    """Fails a test that leaves the KV cache to be sized from free GPU memory, unless it is marked
    to: that sizing profiles the largest step and then fills the GPU (over 100 GB on an H200 for
    the two-layer demo), which makes a test slow and starves every process beside it."""
    if request.node.get_closest_marker(FREE_MEMORY_MARK) is not None:
        return
    import server.engine.config as engine_config

    def refuse(*args, **kwargs):
        pytest.fail(f"this test sizes the KV cache from free GPU memory: give num_kv_blocks, or mark it "
                    f"@pytest.mark.{FREE_MEMORY_MARK}", pytrace=False)

    monkeypatch.setattr(engine_config, "kv_blocks_for_free_memory", refuse)


def load_test_model(model_dir, device: str):
    """A checkpoint as a test runs it: its own dtype on CPU, CUDA_TEST_DTYPE on CUDA."""
    from model.load import load_model

    return load_model(model_dir, device, CUDA_TEST_DTYPE if device == "cuda" else "auto")


@pytest.fixture(scope="session", autouse=True)
def nanoserve_cache(tmp_path_factory) -> str:
    """A private cache directory, so the demo checkpoint is built fresh by the code under test."""
    path = str(tmp_path_factory.mktemp("nanoserve-cache"))
    os.environ["NANOSERVE_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def demo_dir(nanoserve_cache):
    from model.demo import demo_checkpoint

    return demo_checkpoint()


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory):
    """A small untied fp32 Qwen3 with the real tokenizer (full vocabulary), distinct from the demo."""
    shape = {
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "tie_word_embeddings": False,
        "dtype": "float32",
    }
    return write_checkpoint(tmp_path_factory.mktemp("chat-ckpt"), shape, seed=7)
