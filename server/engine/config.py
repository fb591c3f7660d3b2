"""The engine's sizes (`EngineConfig`) and how their defaults are resolved for a model and device."""

import logging
import math
from dataclasses import dataclass, replace

from model.cpu_plan import available_memory_bytes
from model.qwen3 import Qwen3Model
from server.engine.memory import kv_blocks_for_free_memory
from server.engine.speculative import SpeculativeConfig

# Defaults where the engine flags are not given.
DEFAULT_MAX_NUM_SEQS = {"cpu": 8, "cuda": 256}
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cpu": 2048, "cuda": 8192}
# On CPU, without --num-kv-blocks, the KV cache holds max_model_len x max_num_seqs tokens, but
# takes at most this share of the memory available once the weights are loaded; a longer context
# than that holds is cut to what it holds. (Pages of the cache are touched only as blocks are used.)
CPU_KV_MEMORY_SHARE = 0.25

logger = logging.getLogger("nanoserve.engine")


@dataclass
class EngineConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from free memory on CUDA, max_model_len x max_num_seqs on CPU
    max_model_len: int | None = None  # None: the model's context, at most what the cache holds
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
    # Ranks that each hold a shard of the model, one process each (`server.engine.distributed`).
    tensor_parallel_size: int = 1
    # --speculative-config: draft tokens for every sequence (n-gram); None: only chat requests'
    # `prediction`s speculate.
    speculative_config: SpeculativeConfig | None = None
    # "int8": the matmul weights rounded to int8 with a scale per row, on CPU (`model.quant`).
    quantization: str | None = None


def kv_block_bytes(model: Qwen3Model, block_size: int) -> int:
    """Bytes of one KV-cache block on this rank: K and V of `block_size` tokens in every layer."""
    c = model.config
    return 2 * c.num_layers * block_size * model.shard.num_kv_heads * c.head_dim * model.dtype.itemsize


def cpu_kv_blocks(model: Qwen3Model, block_size: int, max_model_len: int, max_num_seqs: int) -> tuple[int, str]:
    """On CPU: blocks for `max_num_seqs` sequences of `max_model_len` tokens, or as many as
    CPU_KV_MEMORY_SHARE of the available memory holds if fewer; and a line saying which."""
    block_bytes = kv_block_bytes(model, block_size)
    wanted = math.ceil(max_model_len / block_size) * max_num_seqs
    available = available_memory_bytes()
    fit = int(CPU_KV_MEMORY_SHARE * available // block_bytes)
    if wanted <= fit:
        return wanted, (f"KV cache: {wanted} blocks ({wanted * block_bytes / 2**30:.2f} GiB) for {max_num_seqs} "
                        f"sequences of {max_model_len} tokens")
    return fit, (f"KV cache: {fit} blocks ({fit * block_bytes / 2**30:.2f} GiB), {CPU_KV_MEMORY_SHARE:.0%} of the "
                 f"{available / 2**30:.1f} GiB of memory available, short of {max_num_seqs} sequences of "
                 f"{max_model_len} tokens (--num-kv-blocks sets it)")


def resolve_config(config: EngineConfig, model: Qwen3Model) -> EngineConfig:
    """`config` with every default filled in for this model and device, or ValueError."""
    for name in ("block_size", "num_kv_blocks", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_queue",
                 "tensor_parallel_size"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    device = model.device.type
    if config.quantization is not None and device != "cpu":
        raise ValueError(f"--quantization {config.quantization} runs on CPU only (there is no int8 kernel for "
                         f"{device} here): drop the flag, or give --device cpu")
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
    max_model_len = config.max_model_len or max_positions
    num_kv_blocks = config.num_kv_blocks
    if num_kv_blocks is None and device == "cuda":
        num_kv_blocks = kv_blocks_for_free_memory(model, config.block_size, max_num_batched_tokens, max_num_seqs)
    elif num_kv_blocks is None:
        num_kv_blocks, sizing = cpu_kv_blocks(model, config.block_size, max_model_len, max_num_seqs)
        logger.info(sizing)
        if num_kv_blocks < 1:
            raise ValueError(f"no memory for the KV cache: {sizing}")
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
