"""From a checkpoint directory (or none: the demo) to a ready `Qwen3Model` and its tokenizer."""

import logging
from pathlib import Path

import torch

from nanoserve_kernels import get_backend
from nanoserve_kernels.plugins import HeadLayout, check_plugins
from model.config import DTYPES, Qwen3Config, load_config
from model.demo import demo_checkpoint
from model.parallel import Collectives, Shard, shard_of
from model.qwen3 import Qwen3Model
from model.weights import load_checkpoint

logger = logging.getLogger("nanoserve.model")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}: expected auto, cpu or cuda")
    return torch.device(name)


def resolve_dtype(name: str, checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` is the checkpoint's dtype, except float16 on CPU, which runs as float32 (CPU fp16 is slow)."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}: expected auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cpu" and checkpoint_dtype == torch.float16:
        return torch.float32
    return checkpoint_dtype


def model_dir_or_demo(model: str | Path | None) -> Path:
    return Path(model) if model else demo_checkpoint()


def load_model(
    model_dir: str | Path, device: str = "auto", dtype: str = "auto", *, block_size: int = 16,
    check_kernels: bool = True, rank: int = 0, world_size: int = 1, collectives: Collectives | None = None,
    progress: bool | None = None,
) -> Qwen3Model:
    """The checkpoint on `device` in `dtype`, or under tensor parallelism rank `rank`'s shard of it
    (its slices of the weights only), whose forward pass reaches the other ranks through
    `collectives`. Kernel plug-ins are checked first (`block_size`: the KV cache's, which their
    check uses; `nanoserve check` runs a plug-in whatever its check says)."""
    config = load_config(model_dir)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, config.dtype, torch_device)
    shard = shard_of(config, rank, world_size)
    if check_kernels:
        check_kernel_plugins(config, torch_device, torch_dtype, block_size, shard)
    model = Qwen3Model(config, torch_dtype, torch_device, shard, collectives)
    load_checkpoint(model, model_dir, progress)
    return model


def check_kernel_plugins(config: Qwen3Config, device: torch.device, dtype: torch.dtype, block_size: int,
                         shard: Shard | None = None) -> None:
    """Every plug-in of the kernel spec against its op's torch reference, at the dtype, device and
    head layout this model (or this rank's `shard` of it) gives it (`nanoserve_kernels.plugins.PluginCheckFailed`
    names the first that differs); the startup line then names each plug-in and how close it came."""
    shard = shard or shard_of(config)
    layout = HeadLayout(config.hidden_size, shard.num_heads, shard.num_kv_heads, config.head_dim, block_size)
    checks = check_plugins(device, dtype, layout)
    if checks:
        logger.info("kernels %s: %s", get_backend(), "; ".join(check.describe() for check in checks))
