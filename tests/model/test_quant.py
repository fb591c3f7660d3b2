"""`--quantization int8`: rows rounded to int8 with a scale each; both kernels give what the
dequantized weights give, the model stays near the unquantized one, and the flag is refused where
there is no kernel."""

import os
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from model.batch import SequenceStep, make_batch
from model.cpu_plan import INT8_TOLERANCE, AttentionChoice, CpuPlan, held_linear
from model.demo import write_checkpoint
from model.load import load_model
from model import cpu_avx2, cpu_plan
from model.quant import (INT8, INT8_AVX2, INT8_AVX2_DYNAMIC, INT8_DYNAMIC, dequantize, hold_int8, hold_int8_avx2,
                         hold_int8_avx2_dynamic, hold_int8_dynamic, quantize_rows, unpacked)
from server.engine.config import EngineConfig, resolve_config

VOCAB = 384
HOLD = {INT8: hold_int8, INT8_DYNAMIC: hold_int8_dynamic, INT8_AVX2: hold_int8_avx2,
        INT8_AVX2_DYNAMIC: hold_int8_avx2_dynamic}
AVX2_REASON = cpu_avx2.unavailable_reason()
NEEDS_AVX2 = pytest.mark.skipif(AVX2_REASON is not None, reason=f"the AVX2 kernel cannot run here: {AVX2_REASON}")
LAYOUTS = [INT8, INT8_DYNAMIC, pytest.param(INT8_AVX2, marks=NEEDS_AVX2), pytest.param(INT8_AVX2_DYNAMIC, marks=NEEDS_AVX2)]


def test_rows_round_to_int8_within_half_a_step_of_their_own_scale():
    weight = torch.randn(40, 96) * torch.logspace(-3, 1, 40)[:, None]  # rows of very different sizes
    weight[7] = 0
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    error = (q.float() * scale[:, None] - weight).abs()
    assert bool((error <= scale[:, None] / 2 * (1 + 1e-6)).all())
    assert bool((q[7] == 0).all()) and scale[7] == 1


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_kernel_gives_the_dequantized_product(layout, dtype):
    weight = torch.randn(200, 96).to(dtype)
    held = HOLD[layout](weight)
    assert held.dtype == torch.int8 and held.shape == weight.shape
    for rows in (1, 5):
        x = torch.randn(rows, 96).to(dtype)
        out = held_linear(x, held)
        reference = x.float() @ dequantize(held).T
        assert out.dtype == dtype and out.shape == (rows, 200)
        assert (out.float() - reference).abs().max() <= INT8_TOLERANCE * reference.abs().max()
    # Every layout holds the same int8 values (the weight-only kernel takes its scales in the model's dtype).
    (q, scale), (q_plain, scale_plain) = unpacked(held), unpacked(hold_int8(weight))
    assert torch.equal(q, q_plain)
    torch.testing.assert_close(scale.float(), scale_plain.float(), rtol=2**-8, atol=0)


@NEEDS_AVX2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, out_features, in_features", [(1, 300, 1000), (1, 7, 75), (6, 301, 96), (9, 64, 1037)])
def test_the_int8_dot_kernel_sums_the_rounded_rows_exactly(rows, out_features, in_features, dtype):
    """`int8 avx2 dynamic`: each activation row rounded to int8 at its own absmax / 127, the integer
    products summed exactly, scaled by both scales: the result is that computation's, but for the
    final rounding to bf16 (shapes with row and column tails off the kernel's blocks)."""
    weight = torch.randn(out_features, in_features) * torch.logspace(-2, 0, out_features)[:, None]
    held = hold_int8_avx2_dynamic(weight.to(dtype))
    x = (torch.randn(rows, in_features) * torch.logspace(-1, 1, rows)[:, None]).to(dtype)
    x_scale = x.float().abs().amax(dim=1, keepdim=True) / 127
    x_q = (x.float() * (1 / x_scale)).round().clamp(-127, 127)  # as the kernel: times the fp32 reciprocal
    q, w_scale = unpacked(held)
    exact = (x_q.double() @ q.double().T) * x_scale.double() * w_scale.double()  # integer sums: exact in fp64
    got = held_linear(x, held)
    assert got.dtype == dtype and got.shape == (rows, out_features)
    torch.testing.assert_close(got.double(), exact.to(dtype).double(), rtol=2**-7 if dtype == torch.bfloat16 else 1e-6, atol=0)


@NEEDS_AVX2
def test_a_row_of_the_int8_dot_kernel_does_not_depend_on_the_other_rows():
    held = hold_int8_avx2_dynamic(torch.randn(300, 128))
    row = torch.randn(1, 128)
    for others in (100 * torch.randn(1, 128), torch.randn(7, 128)):  # the one-row and the several-row paths
        assert torch.equal(held_linear(torch.cat([row, others]), held)[:1], held_linear(row, held))


def test_a_row_of_the_dynamic_kernel_hardly_depends_on_the_other_rows():
    held = hold_int8_dynamic(torch.randn(300, 128))
    row = torch.randn(1, 128)
    alone = held_linear(row, held)
    beside_a_large_row = held_linear(torch.cat([row, 100 * torch.randn(1, 128)]), held)[:1]
    # Without each row's own scale the large row would set the step, 100x this row's.
    assert (alone - beside_a_large_row).abs().max() <= 0.05 * alone.abs().max()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, tie_word_embeddings=True, dtype="float32")
    return write_checkpoint(tmp_path_factory.mktemp("int8"), shape, seed=11, with_tokenizer=False)


def _last_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """Each prompt's next-token logits, all prompts in one prefill step."""
    width = 4
    cache = model.allocate_kv_cache(width * len(prompts), 16)
    steps = [SequenceStep(p, 0, list(range(i * width, (i + 1) * width))) for i, p in enumerate(prompts)]
    return model.forward(make_batch(steps, 16, "cpu"), cache)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_int8_model_stays_near_the_fp32_one(checkpoint, layout):
    rng = random.Random(2)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randrange(3, 30))] for _ in range(8)]
    model = load_model(checkpoint, "cpu")
    expected = _last_logits(model, prompts)
    table = model.embed_tokens.detach().clone()
    shapes = {tuple(getattr(owner, name).shape) for owner, name in model._matmul_weights()}
    plan = CpuPlan({shape: layout for shape in shapes}, [AttentionChoice(1, 64, "sdpa")], 0.0)
    model._hold_weights(plan)
    model.cpu_plan = plan
    assert all(getattr(owner, name).dtype == torch.int8 for owner, name in model._matmul_weights())
    torch.testing.assert_close(model.embed_tokens, table, rtol=0, atol=0)  # the lookup keeps its fp32 table
    got = _last_logits(model, prompts)
    assert (got - expected).abs().max() <= 0.1 * expected.abs().max()
    assert int((got.argmax(-1) == expected.argmax(-1)).sum()) >= 7  # of 8 prompts


def test_plan_with_int8_offers_only_int8_kernels_and_counts_the_saving(checkpoint):
    model = load_model(checkpoint, "cpu")
    plan = model.plan_cpu_ops(max_batch=4, max_context=64, quantization="int8")
    assert set(plan.one_row_linear.values()) <= {INT8, INT8_DYNAMIC, INT8_AVX2, INT8_AVX2_DYNAMIC}
    assert cpu_plan.held_layouts(torch.float32, "int8") == [INT8, INT8_DYNAMIC, INT8_AVX2, INT8_AVX2_DYNAMIC]
    if AVX2_REASON is None:  # all four ran and were timed: none is named among the skipped
        assert not any(reason.startswith("int8") for reason in plan.skipped.values()), plan.describe()
    assert plan.extra_bytes < 0 and "held weights save" in plan.describe()
    assert all(getattr(owner, name).dtype == torch.int8 for owner, name in model._matmul_weights())


def test_quantization_is_refused_off_cpu():
    cuda_model = SimpleNamespace(device=torch.device("cuda"), config=SimpleNamespace(max_position_embeddings=64))
    with pytest.raises(ValueError, match="--quantization int8 runs on CPU only"):
        resolve_config(EngineConfig(quantization="int8"), cuda_model)


@pytest.mark.slow  # a CLI run on the demo: ~1 min on 2 shared cores; the flag's path is covered in-process above
def test_generate_with_int8_on_the_demo(demo_dir):
    result = subprocess.run([sys.executable, "-m", "server.cli", "generate", "--quantization", "int8", "--max-tokens", "6",
                             "--ignore-eos", "Hello"], capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    [plan] = [line for line in result.stderr.splitlines() if "CPU ops chosen by timing them here" in line]
    assert "int8" in plan and "held weights save" in plan


def test_an_unknown_quantization_is_refused_by_name():
    bad = subprocess.run([sys.executable, "-m", "server.cli", "generate", "--quantization", "int4", "hi"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--quantization: invalid choice: 'int4'" in bad.stderr
