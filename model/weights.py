"""Load Hugging Face Qwen3 safetensors (single file or sharded) straight into a `Qwen3Model`.

Each HF tensor name maps to a row range of one of our parameters (q/k/v land in `qkv_proj`,
gate/up in `gate_up_proj`). Tensors are read one at a time and copied into place, which casts
to the model's dtype and moves to its device without a second full copy of the checkpoint.
"""

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from model.qwen3 import Qwen3Model

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROGRESS_MIN_BYTES = 256 << 20  # show a progress bar for checkpoints larger than this


class WeightsError(ValueError):
    """The checkpoint's tensors do not fit the model its config.json describes."""


def weight_targets(model: Qwen3Model) -> dict[str, torch.Tensor]:
    """HF tensor name -> the view of our parameter that it fills."""
    c = model.config
    q, kv, inter = c.q_size, c.kv_size, c.intermediate_size
    targets = {"model.embed_tokens.weight": model.embed_tokens.data, "model.norm.weight": model.norm.data}
    if not c.tie_word_embeddings:
        targets["lm_head.weight"] = model.lm_head.data
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        qkv, gate_up = layer.qkv_proj.data, layer.gate_up_proj.data
        targets |= {
            p + "input_layernorm.weight": layer.input_norm.data,
            p + "self_attn.q_proj.weight": qkv[:q],
            p + "self_attn.k_proj.weight": qkv[q : q + kv],
            p + "self_attn.v_proj.weight": qkv[q + kv :],
            p + "self_attn.q_norm.weight": layer.q_norm.data,
            p + "self_attn.k_norm.weight": layer.k_norm.data,
            p + "self_attn.o_proj.weight": layer.o_proj.data,
            p + "post_attention_layernorm.weight": layer.post_attention_norm.data,
            p + "mlp.gate_proj.weight": gate_up[:inter],
            p + "mlp.up_proj.weight": gate_up[inter:],
            p + "mlp.down_proj.weight": layer.down_proj.data,
        }
    return targets


def _ignored(name: str, model: Qwen3Model) -> bool:
    # Old checkpoints carry the rotary inv_freq buffer; tied checkpoints may still store lm_head.
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and model.config.tie_word_embeddings)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, checked to exist."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise WeightsError(f"{index} is not a valid safetensors index: {err}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise WeightsError(f"missing shard {path.name} (listed in {INDEX_FILE}) in {model_dir}")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    raise WeightsError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}")


class _Assigner:
    """Copies named tensors into their targets, checking names and shapes as it goes."""

    def __init__(self, model: Qwen3Model):
        self.model = model
        self.targets = weight_targets(model)
        self.pending = set(self.targets)

    def assign(self, name: str, shape: tuple[int, ...], read) -> None:
        if _ignored(name, self.model):
            return
        target = self.targets.get(name)
        if target is None:
            raise WeightsError(f"unexpected tensor {name} {list(shape)}: not part of a Qwen3 model with this config")
        if tuple(shape) != tuple(target.shape):
            raise WeightsError(
                f"tensor {name} has shape {list(shape)} in the checkpoint but the config expects {list(target.shape)}"
            )
        target.copy_(read())
        self.pending.discard(name)

    def finish(self) -> None:
        if self.pending:
            missing = sorted(self.pending)
            shown = ", ".join(f"{n} {list(self.targets[n].shape)}" for n in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise WeightsError(f"checkpoint is missing {len(missing)} tensor(s): {shown}{more}")


def load_checkpoint(model: Qwen3Model, model_dir: str | Path, progress: bool | None = None) -> None:
    """Fill `model` from the safetensors files of `model_dir`."""
    files = checkpoint_files(model_dir)
    total = sum(path.stat().st_size for path in files)
    show = total >= PROGRESS_MIN_BYTES if progress is None else progress
    assigner = _Assigner(model)
    with torch.no_grad(), tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not show) as bar:
        for path in files:
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    for name in f.keys():
                        view = f.get_slice(name)
                        shape = tuple(view.get_shape())
                        assigner.assign(name, shape, lambda: f.get_tensor(name))
                        bar.update(_nbytes(shape, view.get_dtype()))
            except SafetensorError as err:
                raise WeightsError(f"{path} is truncated or corrupt (safetensors: {err})") from None
    assigner.finish()


def load_state_dict(model: Qwen3Model, tensors: Mapping[str, torch.Tensor]) -> None:
    """Fill `model` from HF-named tensors in memory (e.g. an HF model's state_dict)."""
    assigner = _Assigner(model)
    with torch.no_grad():
        for name, tensor in tensors.items():
            assigner.assign(name, tuple(tensor.shape), lambda: tensor)
    assigner.finish()


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * _DTYPE_BYTES.get(dtype, 2)
