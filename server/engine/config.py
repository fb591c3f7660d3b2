"""The engine's sizes (`EngineConfig`) and how their defaults are resolved for a model and device."""

import math
from dataclasses import dataclass, replace

from model.qwen3 import Qwen3Model
from server.engine.memory import kv_blocks_for_free_memory

# Defaults where the engine flags are not given. On CPU the KV cache is sized from
# max_model_len x max_num_seqs, so the context is capped: the demo's 40960 positions would
# otherwise reserve 40960 x 8 tokens (1.3 GB) of cache for a model of a few MB.
CPU_MAX_MODEL_LEN = 2048
DEFAULT_MAX_NUM_SEQS = {"cpu": 8, "cuda": 256}
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cpu": 2048, "cuda": 8192}


@dataclass
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from free memory on CUDA, max_model_len x max_num_seqs on CPU
    max_model_len: int | None = None  # None: the model's context (CPU: at most 2048), at most the cache
    max_num_seqs: int | None = None  # None: 256 on CUDA, 8 on CPU
    max_num_batched_tokens: int | None = None  # None: 8192 on CUDA, 2048 on CPU
    max_queue: int = 1024  # requests waiting for their first output before new ones are refused
    # None: CUDA graphs for decode on CUDA, eager on CPU, where replaying the recorded step only
    # adds padding rows and a logits copy (measured: bench/RESULTS.md); False replays on CPU too.
    enforce_eager: bool | None = None
    enable_prefix_caching: bool = True  # share the KV blocks of equal prompt prefixes (--no-prefix-caching)
    # None: on CUDA, where the host prepares step n+1 while the GPU runs step n; off on CPU, where
    # the host runs the model itself, so there is nothing to overlap with (each finished sequence
    # would only cost one dropped row). True on CPU runs the same bookkeeping, for tests.
    async_scheduling: bool | None = None


def default_max_model_len(max_positions: int, device: str) -> int:
    """The context when --max-model-len is not given: the model's, capped on CPU."""
    return max_positions if device == "cuda" else min(max_positions, CPU_MAX_MODEL_LEN)


def resolve_config(config: EngineConfig, model: Qwen3Model) -> EngineConfig:
    """`config` with every default filled in for this model and device, or ValueError."""
    for name in ("block_size", "num_kv_blocks", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_queue"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    device = model.device.type
    max_positions = model.config.max_position_embeddings
    if config.max_model_len and config.max_model_len > max_positions:
        raise ValueError(f"--max-model-len {config.max_model_len} exceeds the model's {max_positions} positions")
    max_num_seqs = config.max_num_seqs or DEFAULT_MAX_NUM_SEQS[device]
    max_num_batched_tokens = config.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS[device]
    if max_num_batched_tokens < max_num_seqs:
        raise ValueError(
            f"--max-num-batched-tokens {max_num_batched_tokens} is below --max-num-seqs {max_num_seqs}: "
            "a decode step takes one token from every running sequence"
        )
    max_model_len = config.max_model_len or default_max_model_len(max_positions, device)
    num_kv_blocks = config.num_kv_blocks
    if num_kv_blocks is None and device == "cuda":
        num_kv_blocks = kv_blocks_for_free_memory(model, config.block_size, max_num_batched_tokens, max_num_seqs)
    elif num_kv_blocks is None:
        num_kv_blocks = math.ceil(max_model_len / config.block_size) * max_num_seqs
    capacity = num_kv_blocks * config.block_size
    if config.max_model_len and config.max_model_len > capacity:
        raise ValueError(
            f"--max-model-len {config.max_model_len} does not fit the KV cache "
            f"({num_kv_blocks} blocks of {config.block_size} = {capacity} tokens)"
        )
    return replace(
        config,
        num_kv_blocks=num_kv_blocks,
        max_model_len=min(max_model_len, capacity),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enforce_eager=device == "cpu" if config.enforce_eager is None else config.enforce_eager,
        async_scheduling=device == "cuda" if config.async_scheduling is None else config.async_scheduling,
    )
