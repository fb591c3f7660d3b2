"""Load Hugging Face Qwen3 safetensors (single file or sharded) straight into a `Qwen3Model`.

Each HF tensor name maps to a row range of one of our parameters (q/k/v land in `qkv_proj`,
gate/up in `gate_up_proj`). Tensors are read one at a time and copied into place, which casts
to the model's dtype and moves to its device without a second full copy of the checkpoint.
A model sharded for tensor parallelism (`model.parallel`) reads only its rank's rows or columns
of each tensor: safetensors slices are read from the file, not cut from the whole tensor.
"""

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class Target:
    """Where one HF tensor goes: `view`, filled from the rows and columns `index` picks of the
    checkpoint's tensor, whose full shape is `shape`."""

    view: torch.Tensor
    shape: tuple[int, ...]
    index: tuple[slice, ...] = ()  # () : the whole tensor


def _rows(start: int, stop: int) -> tuple[slice, ...]:
    return (slice(start, stop),)


def _columns(start: int, stop: int) -> tuple[slice, ...]:
    return (slice(None), slice(start, stop))


def weight_targets(model: Qwen3Model) -> dict[str, Target]:
    """HF tensor name -> the view of our parameter that it fills, and this rank's slice of it."""
    c, s = model.config, model.shard
    d, hidden = c.head_dim, c.hidden_size
    q, kv, inter = s.num_heads * d, s.num_kv_heads * d, s.intermediate_size
    q_rows = _rows(s.rank * q, (s.rank + 1) * q)
    kv_rows = _rows(s.kv_head_start * d, s.kv_head_start * d + kv)
    inter_rows = _rows(s.rank * inter, (s.rank + 1) * inter)
    vocab_rows = _rows(s.vocab_start, s.vocab_end)
    held = s.vocab_end - s.vocab_start  # the rows past it (padding of the last rank) stay zero
    vocab = (c.vocab_size, hidden)
    targets = {"model.embed_tokens.weight": Target(model.embed_tokens.data[:held], vocab, vocab_rows),
               "model.norm.weight": Target(model.norm.data, (hidden,))}
    if not c.tie_word_embeddings:
        targets["lm_head.weight"] = Target(model.lm_head.data[:held], vocab, vocab_rows)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        qkv, gate_up = layer.qkv_proj.data, layer.gate_up_proj.data
        targets |= {
            p + "input_layernorm.weight": Target(layer.input_norm.data, (hidden,)),
            p + "self_attn.q_proj.weight": Target(qkv[:q], (c.q_size, hidden), q_rows),
            p + "self_attn.k_proj.weight": Target(qkv[q : q + kv], (c.kv_size, hidden), kv_rows),
            p + "self_attn.v_proj.weight": Target(qkv[q + kv :], (c.kv_size, hidden), kv_rows),
            p + "self_attn.q_norm.weight": Target(layer.q_norm.data, (d,)),
            p + "self_attn.k_norm.weight": Target(layer.k_norm.data, (d,)),
            p + "self_attn.o_proj.weight": Target(layer.o_proj.data, (hidden, c.q_size),
                                                _columns(s.rank * q, (s.rank + 1) * q)),
            p + "post_attention_layernorm.weight": Target(layer.post_attention_norm.data, (hidden,)),
            p + "mlp.gate_proj.weight": Target(gate_up[:inter], (c.intermediate_size, hidden), inter_rows),
            p + "mlp.up_proj.weight": Target(gate_up[inter:], (c.intermediate_size, hidden), inter_rows),
            p + "mlp.down_proj.weight": Target(layer.down_proj.data, (hidden, c.intermediate_size),
                                               _columns(s.rank * inter, (s.rank + 1) * inter)),
        }
    if s.size == 1:  # the whole model: whole tensors, read as they are
        return {name: replace(target, index=()) for name, target in targets.items()}
    model.embed_tokens.data[held:].zero_()
    model.lm_head.data[held:].zero_()
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
        """`read(index)`: the tensor's rows and columns that `index` picks (all of it for ())."""
        if _ignored(name, self.model):
            return
        target = self.targets.get(name)
        if target is None:
            raise WeightsError(f"unexpected tensor {name} {list(shape)}: not part of a Qwen3 model with this config")
        if tuple(shape) != target.shape:
            raise WeightsError(
                f"tensor {name} has shape {list(shape)} in the checkpoint but the config expects {list(target.shape)}"
            )
        target.view.copy_(read(target.index))
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
                        assigner.assign(name, shape, lambda index: view[index] if index else f.get_tensor(name))
                        bar.update(_nbytes(shape, view.get_dtype()))
            except SafetensorError as err:
                raise WeightsError(f"{path} is truncated or corrupt (safetensors: {err})") from None
    assigner.finish()


def load_state_dict(model: Qwen3Model, tensors: Mapping[str, torch.Tensor]) -> None:
    """Fill `model` from HF-named tensors in memory (e.g. an HF model's state_dict)."""
    assigner = _Assigner(model)
    with torch.no_grad():
        for name, tensor in tensors.items():
            assigner.assign(name, tuple(tensor.shape), lambda index: tensor[index])
    assigner.finish()


_DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}


def _nbytes(shape: tuple[int, ...], dtype: str) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * _DTYPE_BYTES.get(dtype, 2)
