"""Compile at startup, never mid-serve: over a mixed workload (prompts of many lengths arriving
while others decode, chunked prompts, batches that grow and shrink, preemption) the Triton
kernels are launched in no variant that the runner's warm-up did not launch before the engine
was ready, and each kernel stays within a small budget of variants.

A variant is what @triton.jit compiles one binary per (`nanoserve_kernels._triton.variant_key`: constexpr
values, pointer dtypes and alignment, integer value classes, less what the kernel leaves
unspecialised). On CPU the launches are recorded, not run, and the model's logits replaced by
zeros: the engine's batches depend on token counts only, and the test needs no interpreter."""

from collections import Counter

import torch

from nanoserve_kernels import decode_attention
from nanoserve_kernels._triton import Launch, variant_key
from model.qwen3 import Qwen3Model
from server.engine.config import EngineConfig, resolve_config
from server.engine import model_runner
from server.engine.core import EngineCore
from server.engine.request import GenerationRequest, SamplingParams
from tests.kernels.common import kernel_backend
from tests.server.engine.test_engine import demo, random_prompts  # noqa: F401  (demo is a fixture)

# Variants per kernel for one model and dtype: the norm with and without the residual add; decode
# writing fp32 partials (many splits) or the output itself (one split); one of every other kernel.
BUDGET = {"_rms_norm_kernel": 2, "_attention_frontend_kernel": 1, "_decode_split_kernel": 2,
          "_merge_splits_kernel": 1, "_prefill_kernel": 1}
H100_SMS = 132


def test_a_mixed_workload_launches_only_variants_the_warm_up_compiled(demo, monkeypatch):
    model, tokenizer = demo
    phase, launched = ["warm-up"], []
    monkeypatch.setattr(Launch, "__call__", lambda self: launched.append((phase[0], variant_key(self))))
    monkeypatch.setattr(decode_attention, "_sm_count", lambda device: H100_SMS)  # splits as planned on a GPU
    monkeypatch.setattr(model_runner, "interpreting", lambda: False)  # warm up as compiled Triton does
    forward = Qwen3Model.forward
    monkeypatch.setattr(Qwen3Model, "forward", lambda self, batch, cache: torch.zeros(
        forward(self, batch, cache).shape))
    with kernel_backend("triton"):
        config = resolve_config(EngineConfig(num_kv_blocks=40, max_num_batched_tokens=48, max_num_seqs=6,
                                             max_model_len=512), model)
        core = EngineCore(model, tokenizer, config)
        phase[0] = "serving"
        prompts = random_prompts(9, seed=11, lengths=(2, 90))
        pending = [(2 * i, GenerationRequest(f"r{i}", prompt, SamplingParams(
            max_tokens=3 + 4 * i % 17, temperature=0.0, ignore_eos=True))) for i, prompt in enumerate(prompts)]
        step = 0
        while pending or core.has_work():
            while pending and pending[0][0] <= step:
                core.add_request(pending.pop(0)[1])
            for _, output in core.step():
                assert not isinstance(output, Exception), output
            step += 1
    warm = {key for when, key in launched if when == "warm-up"}
    serving = {key for when, key in launched if when == "serving"}
    assert len(serving) > 0 and core.scheduler.num_preemptions >= 0
    assert serving <= warm, f"compiled mid-serve: {sorted(serving - warm)}"
    per_kernel = Counter(key[0] for key in warm | serving)
    assert set(per_kernel) == set(BUDGET)
    assert all(per_kernel[kernel] <= BUDGET[kernel] for kernel in BUDGET), per_kernel
