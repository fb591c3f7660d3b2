"""Qwen3 hyper-parameters, read from a Hugging Face `config.json`."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ConfigError(ValueError):
    """The checkpoint's config.json describes something nanoserve cannot run."""


@dataclass(frozen=True)
class Qwen3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: torch.dtype

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _rope_theta(raw: dict) -> float:
    # transformers 5 writes rope_parameters {rope_theta, rope_type}; older files carry rope_theta
    # at the top level and an optional rope_scaling dict.
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConfigError(f"rope scaling type {rope_type!r} is not implemented (only the default rotary embedding is)")
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is None:
        raise ConfigError("config.json has no rope_theta (neither top-level nor in rope_parameters)")
    return float(theta)


def _dtype(raw: dict) -> torch.dtype:
    name = raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r} in config.json: expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_config(raw: dict) -> Qwen3Config:
    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if model_type != "qwen3" or (architectures and "Qwen3ForCausalLM" not in architectures):
        found = ", ".join(architectures) or f"model_type {model_type!r}"
        raise ConfigError(f"not a Qwen3 checkpoint ({found}): nanoserve runs Qwen3ForCausalLM only")
    if raw.get("use_sliding_window"):
        raise ConfigError("sliding-window attention (use_sliding_window: true) is not implemented")
    if raw.get("attention_bias"):
        raise ConfigError("attention_bias: true is not implemented (Qwen3 checkpoints have no attention bias)")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {raw['hidden_act']!r} is not implemented (Qwen3 uses silu)")
    try:
        num_heads = int(raw["num_attention_heads"])
        config = Qwen3Config(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or raw["hidden_size"] // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(raw),
            max_position_embeddings=int(raw.get("max_position_embeddings", 40960)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            dtype=_dtype(raw),
        )
    except KeyError as missing:
        raise ConfigError(f"config.json lacks the required field {missing}") from None
    if config.num_heads % config.num_kv_heads:
        raise ConfigError(
            f"num_attention_heads {config.num_heads} is not a multiple of num_key_value_heads {config.num_kv_heads}"
        )
    return config


def load_config(model_dir: str | Path) -> Qwen3Config:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: --model must be a Hugging Face checkpoint directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    return parse_config(raw)
