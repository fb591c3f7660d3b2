"""Our top-level `kernels` package shares its name with an optional package transformers probes for."""

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
from transformers.utils import import_utils


def test_transformers_does_not_mistake_our_kernels_for_hub_kernels():
    import kernels

    assert hasattr(kernels, "paged_decode_attention")  # ours is the one on the path
    assert not import_utils.is_kernels_available()


def test_hf_qwen3_still_runs_beside_our_packages():
    config = Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = Qwen3ForCausalLM(config).eval()
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)
