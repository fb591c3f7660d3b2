"""Our top-level packages must not share a name with another installed distribution's.

transformers ≥ 5.25 depends on the Hub's `kernels` package and imports it whenever that
distribution is installed; a top-level package of ours under the same name (as ours once was)
shadowed it and broke `import transformers.models.qwen3` for every user."""

import importlib.metadata
import subprocess
import sys

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

OUR_PACKAGES = ("nanoserve_kernels", "model", "server")


def test_no_other_installed_distribution_ships_a_top_level_name_of_ours():
    shipped_by = importlib.metadata.packages_distributions()
    clashes = {name: others for name in OUR_PACKAGES
               if (others := sorted(set(shipped_by.get(name, [])) - {"nanoserve"}))}
    assert not clashes, f"top-level packages also shipped by: {clashes}"


def test_hf_qwen3_imports_after_our_packages_in_a_fresh_process():
    script = ("import nanoserve_kernels, model.qwen3, server.cli\n"
              "from transformers import Qwen3ForCausalLM\n"
              "import nanoserve_kernels as ours\n"
              "assert hasattr(ours, 'paged_decode_attention')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_hf_qwen3_still_runs_beside_our_packages():
    config = Qwen3Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    model = Qwen3ForCausalLM(config).eval()
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)
