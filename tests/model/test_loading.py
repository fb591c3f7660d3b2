"""Config parsing and weight loading: every failure names what is wrong."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import ConfigError, load_config
from model.demo import write_checkpoint
from model.load import load_model
from model.weights import WeightsError

SHAPE = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, tie_word_embeddings=False, dtype="float32")


@pytest.fixture
def checkpoint(tmp_path):
    return write_checkpoint(tmp_path / "ckpt", SHAPE, seed=0, num_shards=2, with_tokenizer=False)


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_reads_both_rope_theta_layouts(checkpoint):
    assert load_config(checkpoint).rope_theta == 1e6  # transformers-5 rope_parameters
    _edit_config(checkpoint, rope_parameters=None, rope_theta=5e5, torch_dtype="bfloat16", dtype=None)
    config = load_config(checkpoint)
    assert config.rope_theta == 5e5
    assert config.dtype == torch.bfloat16


def test_refuses_other_architectures(checkpoint):
    _edit_config(checkpoint, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(ConfigError, match=r"not a Qwen3 checkpoint \(LlamaForCausalLM\)"):
        load_config(checkpoint)


def test_refuses_unimplemented_rope_scaling(checkpoint):
    _edit_config(checkpoint, rope_parameters={"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match="rope scaling type 'yarn' is not implemented"):
        load_config(checkpoint)
    _edit_config(checkpoint, rope_parameters=None, rope_theta=1e6, rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(ConfigError, match="rope scaling type 'dynamic' is not implemented"):
        load_config(checkpoint)


def test_refuses_unknown_dtype(checkpoint):
    _edit_config(checkpoint, dtype="float8_e4m3")
    with pytest.raises(ConfigError, match="unknown dtype 'float8_e4m3' in config.json"):
        load_config(checkpoint)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        load_config(tmp_path)


def test_missing_shard(checkpoint):
    (checkpoint / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"missing shard model-00002-of-00002.safetensors \(listed in model.safetensors.index.json\)"):
        load_model(checkpoint, "cpu")


def test_wrong_shape_names_tensor_and_both_shapes(checkpoint):
    _edit_config(checkpoint, intermediate_size=96)
    with pytest.raises(WeightsError, match=r"tensor model\.layers\.\d\.mlp\.\w+_proj\.weight has shape \[(64, 32|32, 64)\] in the checkpoint but the config expects \[(96, 32|32, 96)\]"):
        load_model(checkpoint, "cpu")


def test_missing_and_unexpected_tensors(checkpoint):
    shard = checkpoint / "model-00001-of-00002.safetensors"
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("q_norm.weight"))
    tensors["model.layers.0.self_attn.extra.weight"] = tensors.pop(name)
    save_file(tensors, shard)
    with pytest.raises(WeightsError, match=r"unexpected tensor model.layers.0.self_attn.extra.weight \[32\]"):
        load_model(checkpoint, "cpu")
    del tensors["model.layers.0.self_attn.extra.weight"]
    save_file(tensors, shard)
    with pytest.raises(WeightsError, match=rf"missing 1 tensor\(s\): {name} \[32\]"):
        load_model(checkpoint, "cpu")


def test_casts_to_requested_dtype_and_ties_embeddings(tmp_path):
    directory = write_checkpoint(tmp_path, SHAPE | {"tie_word_embeddings": True, "dtype": "bfloat16"}, seed=1, with_tokenizer=False)
    model = load_model(directory, "cpu", "float32")
    assert model.embed_tokens.dtype == torch.float32
    assert model.lm_head.data_ptr() == model.embed_tokens.data_ptr()
    stored = load_file(directory / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(model.embed_tokens, stored.float())
