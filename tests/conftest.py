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
