"""The test suite's guard (tests/conftest.py): a test that would size the KV cache from free GPU
memory fails unless it is marked to, so no CUDA test profiles the GPU and fills it by accident."""

from types import SimpleNamespace

import pytest
import torch

import server.engine.config as engine_config
from server.engine import memory
from server.engine.config import EngineConfig, resolve_config
from tests.conftest import FREE_MEMORY_MARK

ON_CUDA = SimpleNamespace(device=torch.device("cuda"), config=SimpleNamespace(max_position_embeddings=4096))


def test_an_unmarked_test_that_leaves_the_cache_to_free_memory_fails():
    with pytest.raises(pytest.fail.Exception, match=f"sizes the KV cache from free GPU memory.*{FREE_MEMORY_MARK}"):
        resolve_config(EngineConfig(max_num_seqs=8), ON_CUDA)
    assert resolve_config(EngineConfig(num_kv_blocks=64), ON_CUDA).num_kv_blocks == 64  # explicit sizes pass


@pytest.mark.kv_cache_from_free_memory
def test_a_marked_test_sizes_the_cache_from_free_memory():
    assert engine_config.kv_blocks_for_free_memory is memory.kv_blocks_for_free_memory
