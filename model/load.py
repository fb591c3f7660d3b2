"""From a checkpoint directory (or none: the demo) to a ready `Qwen3Model` and its tokenizer."""

from pathlib import Path

import torch

from model.config import DTYPES, load_config
from model.demo import demo_checkpoint
from model.parallel import Collectives, shard_of
from model.qwen3 import Qwen3Model
from model.weights import load_checkpoint


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
    model_dir: str | Path, device: str = "auto", dtype: str = "auto", rank: int = 0, world_size: int = 1,
    collectives: Collectives | None = None, progress: bool | None = None,
) -> Qwen3Model:
    """The model of `model_dir`, or under tensor parallelism rank `rank`'s shard of it (its slices
    of the weights only), whose forward pass reaches the other ranks through `collectives`."""
    config = load_config(model_dir)
    torch_device = resolve_device(device)
    model = Qwen3Model(config, resolve_dtype(dtype, config.dtype, torch_device), torch_device,
                       shard_of(config, rank, world_size), collectives)
    load_checkpoint(model, model_dir, progress)
    return model
