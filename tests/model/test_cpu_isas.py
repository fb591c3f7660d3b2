"""The CPU plan and bf16 generation under the instruction sets of other processors, emulated here.

CI and users run on whatever processor they have: AVX2-only laptops and VMs, AVX-512 servers, Xeons
with AMX. torch and oneDNN can be told to use less than the processor offers
(`ATEN_CPU_CAPABILITY`, `ONEDNN_MAX_CPU_ISA`), so every machine can check the lesser ones: in a
subprocess under each setting, `nanoserve generate` in bf16 must time its CPU plan (dropping what
does not run there, by name) and give Hugging Face's greedy tokens. Emulation shows correctness,
not speed. A setting asks only for less than the processor has; on a processor without it the
case skips, saying so.
"""

import os
import platform
import subprocess
import sys

import pytest
import torch
from transformers import Qwen3ForCausalLM

from model.tokenizer import Tokenizer

PROMPT = "The capital of France is"
NEW_TOKENS = 16


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


X86 = platform.machine() in ("x86_64", "AMD64")
HAS_AVX2 = X86 and "avx2" in _cpu_flags()
SETTINGS = [
    pytest.param({"ATEN_CPU_CAPABILITY": "default"}, "DEFAULT", id="aten-default"),
    pytest.param({"ATEN_CPU_CAPABILITY": "avx2"}, "AVX2", id="aten-avx2",
                 marks=pytest.mark.skipif(not HAS_AVX2, reason="this processor has no AVX2 to emulate")),
    pytest.param({"ONEDNN_MAX_CPU_ISA": "AVX2"}, None, id="onednn-avx2",
                 marks=pytest.mark.skipif(not HAS_AVX2, reason="this processor has no AVX2 to emulate")),
]


@pytest.fixture(scope="module")
def hf_bf16_text(chat_checkpoint) -> str:
    tokenizer = Tokenizer(chat_checkpoint)
    hf = Qwen3ForCausalLM.from_pretrained(chat_checkpoint, dtype=torch.bfloat16).eval()
    prompt_ids = tokenizer.encode(PROMPT)
    out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(prompt_ids):]
    return tokenizer.decode(out.tolist())


@pytest.mark.parametrize("env,capability", SETTINGS)
def test_bf16_generate_under_an_emulated_isa_plans_and_equals_hf(chat_checkpoint, hf_bf16_text, env, capability):
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "generate", "--model", str(chat_checkpoint), "--device", "cpu",
         "--dtype", "bfloat16", "--max-tokens", str(NEW_TOKENS), "--ignore-eos", PROMPT],
        capture_output=True, text=True, timeout=300, env=os.environ | env,
    )
    assert result.returncode == 0, result.stderr
    [plan] = [line for line in result.stderr.splitlines() if "CPU ops chosen by timing them here" in line]
    if capability is not None:
        assert f"ATen {capability})" in plan
    assert "one-row matmul: " in plan and "decode attention: " in plan
    if capability == "DEFAULT":  # the project's AVX2 kernel follows ATen down to an older processor's code
        assert "gemv: unavailable here (ATen runs without AVX2 here" in plan
    assert result.stdout == hf_bf16_text + "\n"
