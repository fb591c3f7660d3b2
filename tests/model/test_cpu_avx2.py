"""The project's AVX2 kernels (`model.cpu_avx2`): the matmul's products are the exact products
rounded to bf16 (or fp32's, for fp32 and int8-weight matmuls) at every shape (tails of rows and
columns included), decode attention over the
paged cache is the fp32 reference's, a model planned onto them gives Hugging Face's greedy
tokens, the plan chooses them by timing (a prompt chunk's rows included), and where they cannot
be built or run the plan names why and runs without them. The small ops (RMSNorm with its residual
add, the attention front-end) compute what the torch references compute: bf16 to the bit but for
rare ties after a sum in another order, fp32 to a few ulps."""

import random

import pytest
import torch
from transformers import Qwen3ForCausalLM

import model.cpu_avx2 as cpu_avx2
import model.cpu_plan as cpu_plan
from model.batch import SequenceStep, make_batch
from model.cpu_plan import FP32, GEMV, AttentionChoice, CpuPlan, PlannedWeight, _attention_inputs, _attention_reference
from model.demo import write_checkpoint
from nanoserve_kernels.attention_frontend import attention_frontend_torch
from nanoserve_kernels.rms_norm import fused_add_rms_norm_reference, rms_norm_reference
from nanoserve_kernels.rope import build_cos_sin_cache
from model.load import load_model

REASON = cpu_avx2.unavailable_reason()
needs_gemv = pytest.mark.skipif(REASON is not None, reason=f"the AVX2 kernel cannot run here: {REASON}")
VOCAB = 384


@pytest.fixture
def unbuildable(monkeypatch, tmp_path):
    """The kernel as on a machine whose C compiler fails: a fresh process's view (the result is per process)."""
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: error: no usable compiler here' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    monkeypatch.setenv("NANOSERVE_CACHE", str(tmp_path / "cache"))
    cpu_avx2._load.cache_clear()
    yield
    monkeypatch.undo()
    cpu_avx2._load.cache_clear()


def _same(result: torch.Tensor, expected: torch.Tensor) -> None:
    """bf16: equal but for rare ties (a sum in another order than ATen's); fp32: within a few ulps."""
    assert result.dtype == expected.dtype and result.shape == expected.shape
    if result.dtype == torch.bfloat16:
        assert (result == expected).double().mean() >= 0.999
        torch.testing.assert_close(result, expected, rtol=2**-7, atol=1e-5)
    else:
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)


@needs_gemv
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,size", [(1, 64), (5, 1024), (9, 136), (37, 512)])
def test_add_rms_norm_is_the_references(dtype, rows, size):
    gen = torch.Generator().manual_seed(rows * 100 + size)
    x, residual = (torch.randn(rows, size, generator=gen).to(dtype) for _ in range(2))
    weight = (1 + 0.3 * torch.randn(size, generator=gen)).to(dtype)
    normed, summed = cpu_avx2.add_rms_norm(x, residual, weight, 1e-6)
    expected_normed, expected_summed = fused_add_rms_norm_reference(x, residual, weight, 1e-6)
    assert torch.equal(summed, expected_summed)
    _same(normed, expected_normed)
    normed, same = cpu_avx2.add_rms_norm(x, None, weight, 1e-6)  # the first layer's: no residual yet
    _same(normed, rms_norm_reference(x, weight, 1e-6))
    assert torch.equal(same, x)


def _front_inputs(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q_weight, k_weight = ((1 + 0.3 * torch.randn(head_dim, generator=gen)).to(dtype) for _ in range(2))
    positions = torch.randint(0, 300, (tokens,), generator=gen)
    cos_sin = build_cos_sin_cache(300, head_dim, 1e6)
    k_cache = torch.randn(6, 16, kv_heads, head_dim, generator=gen).to(dtype)
    slots = torch.randperm(6 * 16, generator=gen)[:tokens]
    return qkv, q_weight, k_weight, 1e-6, positions, cos_sin, k_cache, torch.randn(k_cache.shape, generator=gen).to(dtype), slots


@needs_gemv
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,heads,kv_heads,head_dim", [(1, 16, 8, 128), (3, 8, 2, 64), (9, 4, 4, 16),
                                                            (33, 16, 8, 128)])
def test_attention_front_is_the_references(dtype, tokens, heads, kv_heads, head_dim):
    args = _front_inputs(tokens, heads, kv_heads, head_dim, dtype, seed=tokens + heads + head_dim)
    if tokens > 1:
        args[-1][1] = -1  # a padding token: computed, not stored
    k_cache, v_cache, slots = args[6], args[7], args[8]
    expected_k_cache, expected_v_cache = k_cache.clone(), v_cache.clone()
    q, k, v = cpu_avx2.attention_front(*args)
    keep = slots >= 0
    qkv = args[0]
    expected = attention_frontend_torch(qkv[keep], *args[1:4], args[4][keep], args[5], expected_k_cache,
                                        expected_v_cache, slots[keep])
    _same(q[keep], expected[0])
    _same(k[keep], expected[1])
    assert torch.equal(v, qkv[:, (heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim))
    _same(k_cache, expected_k_cache)  # the stored keys, and every other slot as it was
    assert torch.equal(v_cache, expected_v_cache)


@needs_gemv
def test_the_small_ops_refuse_what_they_cannot_run_and_write_nothing():
    args = list(_front_inputs(4, 8, 2, 64, torch.bfloat16, seed=3))
    with pytest.raises(cpu_avx2.Avx2Unavailable, match="bf16 or fp32 tensors of one dtype only"):
        cpu_avx2.add_rms_norm(torch.randn(2, 64).half(), None, torch.ones(64).half(), 1e-6)
    with pytest.raises(cpu_avx2.Avx2Unavailable, match="multiple of 8"):
        cpu_avx2.add_rms_norm(torch.randn(2, 60), None, torch.ones(60), 1e-6)
    with pytest.raises(ValueError, match="RMSNorm of"):
        cpu_avx2.add_rms_norm(torch.randn(2, 64), None, torch.ones(32), 1e-6)
    with pytest.raises(cpu_avx2.Avx2Unavailable, match="head_dim a multiple"):
        cpu_avx2.attention_front(*_front_inputs(2, 4, 2, 8, torch.float32, seed=4))
    k_cache, v_cache = args[6].clone(), args[7].clone()
    for index, bad in ((4, torch.tensor([0, 1, 300, 2])), (4, torch.tensor([0, -1, 2, 3])), (8, torch.tensor([0, 1, 2, 96]))):
        broken = list(args)
        broken[index] = bad
        with pytest.raises(IndexError, match="outside the cos/sin cache's 300 rows or a slot past the KV cache's 96"):
            cpu_avx2.attention_front(*broken)
        assert torch.equal(args[6], k_cache) and torch.equal(args[7], v_cache)


@needs_gemv
@pytest.mark.parametrize("rows,out,inner", [(1, 384, 64), (1, 7, 13), (1, 1030, 200), (2, 5, 24), (4, 64, 64),
                                            (5, 131, 72), (9, 258, 1032), (33, 96, 160), (128, 67, 96)])
def test_products_are_the_fp32_products_rounded_to_bf16(rows, out, inner):
    gen = torch.Generator().manual_seed(rows * 1000 + out + inner)
    x = torch.randn(rows, inner, generator=gen).bfloat16()
    weight = torch.randn(out, inner, generator=gen).bfloat16()
    exact = x.double() @ weight.double().T
    result = cpu_avx2.gemv_linear(x, weight)
    assert result.dtype == torch.bfloat16 and result.shape == (rows, out)
    # fp32 sums in another order than float64's may cross a bf16 rounding boundary, rarely; never by more
    torch.testing.assert_close(result.double(), exact, rtol=2**-8, atol=1e-6 * inner)
    assert (result == exact.bfloat16()).double().mean() >= 0.99


SHAPES = [(1, 7, 13), (1, 1030, 200), (3, 5, 24), (9, 258, 1032), (128, 67, 96)]


@needs_gemv
@pytest.mark.parametrize("rows,out,inner", SHAPES)
def test_fp32_products_are_the_exact_products_to_fp32_rounding(rows, out, inner):
    gen = torch.Generator().manual_seed(rows * 1000 + out + inner)
    x, weight = torch.randn(rows, inner, generator=gen), torch.randn(out, inner, generator=gen)
    result = cpu_avx2.gemv_linear(x, weight)
    assert result.dtype == torch.float32 and result.shape == (rows, out)
    exact = x.double() @ weight.double().T
    # fp32 sums of `inner` products: each adds at most ~2^-24 of the running magnitude
    bound = inner * 2**-23 * (x.double().abs() @ weight.double().abs().T)
    assert bool(((result.double() - exact).abs() <= bound).all())


@needs_gemv
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,out,inner", SHAPES)
def test_int8_products_are_the_dequantized_weights_products(dtype, rows, out, inner):
    gen = torch.Generator().manual_seed(rows * 1000 + out + inner + 1)
    x = torch.randn(rows, inner, generator=gen).to(dtype)
    q = torch.randint(-127, 128, (out, inner), generator=gen, dtype=torch.int8)
    scale = torch.rand(out, generator=gen) * 0.1 + 1e-3  # rows of different scales
    result = cpu_avx2.int8_linear(x, q, scale)
    assert result.dtype == dtype and result.shape == (rows, out)
    exact = x.double() @ (q.double() * scale.double()[:, None]).T
    bound = inner * 2**-23 * (x.double().abs() @ (q.double().abs() * scale.double()[:, None]).T)
    if dtype == torch.bfloat16:  # and the result rounded to bf16
        bound = bound + exact.abs() * 2**-8
    assert bool(((result.double() - exact).abs() <= bound).all())


@needs_gemv
def test_strided_inputs_and_nans_are_handled():
    x = torch.randn(6, 64).bfloat16()[::2]  # rows 0, 2, 4: not contiguous
    weight = torch.randn(12, 64).bfloat16()
    weight[3, 5] = float("nan")
    result = cpu_avx2.gemv_linear(x, weight).float()
    assert result[:, 3].isnan().all() and not result[:, [0, 1, 2, 4]].isnan().any()
    torch.testing.assert_close(result[:, 4], (x.float() @ weight.float().T)[:, 4], rtol=2**-8, atol=1e-3)


@needs_gemv
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch,context,heads,kv_heads,head_dim", [(1, 128, 16, 8, 128), (3, 37, 8, 2, 64),
                                                                   (4, 300, 8, 1, 64), (2, 5, 4, 4, 64)])
def test_decode_attention_is_the_references(dtype, batch, context, heads, kv_heads, head_dim):
    torch.manual_seed(batch * context + heads)
    q, k_cache, v_cache, tables, lens, scale = _attention_inputs(batch, context, heads, kv_heads, head_dim, dtype)
    lens[0] = max(1, context - 7)  # ragged: the first sequence ends inside a block the others fill
    reference = _attention_reference(q, k_cache, v_cache, tables, lens, scale)
    out = cpu_avx2.decode_attention(q, k_cache, v_cache, tables, lens, scale)
    assert out.dtype == dtype and out.shape == q.shape
    error = (out.float() - reference).abs().max() / reference.abs().max()
    assert error <= (2e-6 if dtype == torch.float32 else 2**-8)


@needs_gemv
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_keeps_peaked_softmaxes(dtype):
    """Scores hundreds apart (a query 60x its usual size): the exp of most of them underflows, and
    the result is still the references' (the one or two tokens that carry the weight). fp32 at 2e-5:
    scores of ~500 differ by a few 1e-5 between two summation orders, and the exp carries that over."""
    torch.manual_seed(5)
    q, k_cache, v_cache, tables, lens, scale = _attention_inputs(3, 45, 8, 2, 64, dtype)
    q = (q.float() * 60).to(dtype)
    lens[1] = 13
    reference = _attention_reference(q, k_cache, v_cache, tables, lens, scale)
    out = cpu_avx2.decode_attention(q, k_cache, v_cache, tables, lens, scale)
    error = (out.float() - reference).abs().max() / reference.abs().max()
    assert not out.isnan().any() and error <= (2e-5 if dtype == torch.float32 else 2**-8)


def test_other_dtypes_and_mismatched_shapes_are_refused():
    with pytest.raises(cpu_avx2.Avx2Unavailable, match="bf16 or fp32 matrices of one dtype only"):
        cpu_avx2.gemv_linear(torch.randn(1, 8).half(), torch.randn(4, 8).half())
    with pytest.raises(cpu_avx2.Avx2Unavailable, match="bf16 or fp32 matrices of one dtype only"):
        cpu_avx2.gemv_linear(torch.randn(1, 8), torch.randn(4, 8).bfloat16())
    with pytest.raises(cpu_avx2.Avx2Unavailable, match="int8 weights with a scale per row"):
        cpu_avx2.int8_linear(torch.randn(1, 8), torch.ones(4, 8, dtype=torch.int8), torch.ones(3))
    if REASON is None:
        with pytest.raises(ValueError, match="cannot be multiplied"):
            cpu_avx2.gemv_linear(torch.randn(1, 8).bfloat16(), torch.randn(4, 16).bfloat16())


@needs_gemv
def test_a_build_is_cached_by_source_and_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOSERVE_CACHE", str(tmp_path))
    compiler = cpu_avx2._compiler()
    first = cpu_avx2._build(compiler)
    built_at = first.stat().st_mtime_ns
    assert cpu_avx2._build(compiler) == first and first.stat().st_mtime_ns == built_at
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no partial files left behind


def test_without_a_working_compiler_it_is_unavailable_and_says_why(unbuildable):
    reason = cpu_avx2.unavailable_reason()
    assert reason is not None
    with pytest.raises(cpu_avx2.Avx2Unavailable):
        cpu_avx2.gemv_linear(torch.randn(1, 16).bfloat16(), torch.randn(4, 16).bfloat16())
    if cpu_avx2.platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        assert "could not build cpu_avx2.c: cc: error: no usable compiler here" in reason


@pytest.fixture
def bf16_model(tmp_path_factory):
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, tie_word_embeddings=True, dtype="bfloat16")
    directory = write_checkpoint(tmp_path_factory.mktemp("gemv"), shape, seed=9, with_tokenizer=False)
    return directory, load_model(directory, "cpu", "bfloat16")


def _shapes(model) -> set[tuple[int, int]]:
    return {tuple(getattr(owner, name).shape) for owner, name in model._matmul_weights()}


def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    cache = model.allocate_kv_cache(8, 16)
    tokens, step = list(prompt), SequenceStep(prompt, 0, range(8))
    for _ in range(steps):
        token = int(model.forward(make_batch([step], 16, "cpu"), cache)[-1].argmax())
        step = SequenceStep([token], len(tokens), range(8))
        tokens.append(token)
    return tokens[len(prompt):]


@needs_gemv
def test_a_model_on_the_kernels_gives_hfs_greedy_tokens(bf16_model, monkeypatch):
    directory, model = bf16_model
    prompt = [random.Random(5).randrange(VOCAB) for _ in range(21)]
    hf = Qwen3ForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    shapes = _shapes(model)
    # the prompt's 21 rows and every decode row through the matmul kernel, every decode step's attention through its own
    # and the norms and attention front-ends through the C passes
    model.cpu_plan = CpuPlan({shape: GEMV for shape in shapes}, [AttentionChoice(1, 64, "avx2")], 0.0,
                             several_rows_linear={shape: GEMV for shape in shapes}, small_ops="avx2")
    calls = []
    for name in ("add_rms_norm", "attention_front"):
        original = getattr(cpu_avx2, name)
        monkeypatch.setattr(cpu_avx2, name, lambda *args, fn=original, name=name: calls.append(name) or fn(*args))
    assert _greedy(model, prompt, 16) == expected
    # per step: 2 layers' two norms and front-end each, and the final norm
    assert calls.count("add_rms_norm") == 16 * 5 and calls.count("attention_front") == 16 * 2
    assert "(several rows: gemv)" in model.cpu_plan.describe()
    assert "norms and attention front-end: avx2" in model.cpu_plan.describe()


def test_the_plan_offers_the_kernel_for_bf16_and_fp32_weights_only():
    for dtype in (torch.bfloat16, torch.float32):
        assert GEMV in cpu_plan.plain_linears(cpu_plan.ONE_ROW_LINEARS, dtype)
        assert GEMV in cpu_plan.plain_linears(cpu_plan.SEVERAL_ROW_LINEARS, dtype)
    assert GEMV not in cpu_plan.plain_linears(cpu_plan.ONE_ROW_LINEARS, torch.float16)
    assert GEMV not in cpu_plan.plain_linears(cpu_plan.SEVERAL_ROW_LINEARS, torch.float16)


def _timed(seconds: dict[int, dict[str, float]], calls: list[int]):
    def times(operands, rows, plain, skipped, rounds=cpu_plan.ROUNDS):
        calls.append(rows)
        return {name: t for name, t in seconds[rows].items() if name in plain or name in operands.held}
    return times


@pytest.mark.parametrize("prefill,several", [
    ({"linear": 5.0, GEMV: 1.0}, GEMV),  # the kernel wins at every row count
    ({"linear": 1.0, GEMV: 5.0}, "linear"),  # ATen's F.linear wins a prompt chunk by 5x: it keeps several rows
])
def test_the_several_row_function_is_chosen_at_decode_and_prompt_rows(bf16_model, monkeypatch, prefill, several):
    _, model = bf16_model
    seconds = {1: {"linear": 1.0, "mv": 1.0, GEMV: 0.7, FP32: 1.4}, 8: {"linear": 4.0, GEMV: 1.0, FP32: 1.5},
               cpu_plan.PREFILL_ROWS: prefill}
    calls: list[int] = []
    monkeypatch.setattr(cpu_plan, "held_layouts", lambda dtype, quantization=None: [FP32])
    monkeypatch.setattr(cpu_plan, "_times", _timed(seconds, calls))
    weight = PlannedWeight(model.layers[0].o_proj, replaced=2)
    choice = cpu_plan._choose_linear(weight, [1, 8], cpu_plan._MemoryBudget(), {})
    assert calls == [1, 8, cpu_plan.PREFILL_ROWS]
    if several == GEMV:
        assert choice == (GEMV, None, 0, GEMV)  # the plain weight, no copy: nothing added
    else:  # plain at one row (the kernel), 4x slower for 8 rows than the fp32 copy's 1.5: a split, the copy for several
        assert choice[:2] == (GEMV, FP32)


def test_the_lm_head_is_not_timed_at_a_prompt_chunks_rows(bf16_model, monkeypatch):
    _, model = bf16_model
    calls: list[int] = []
    seconds = {1: {"linear": 1.0, "mv": 1.0, GEMV: 0.7}, 8: {"linear": 4.0, GEMV: 1.0}}
    monkeypatch.setattr(cpu_plan, "held_layouts", lambda dtype, quantization=None: [])
    monkeypatch.setattr(cpu_plan, "_times", _timed(seconds, calls))
    head = PlannedWeight(model.lm_head, replaced=0, copied=1, prefill=False)
    assert cpu_plan._choose_linear(head, [1, 8], cpu_plan._MemoryBudget(), {}) == (GEMV, None, 0, GEMV)
    assert calls == [1, 8]
    assert [w.prefill for w in model._planned_weights() if w.sample is model.lm_head] == [False]


@needs_gemv
def test_a_measured_bf16_plan_runs_the_models_tokens(bf16_model):
    _, model = bf16_model
    prompt = [random.Random(8).randrange(VOCAB) for _ in range(9)]
    expected = _greedy(model, prompt, 12)
    try:
        plan = model.plan_cpu_ops(max_batch=4, max_context=64)
        assert not any(reason.startswith(("gemv:", "avx2:")) for reason in plan.skipped.values())
        assert _greedy(model, prompt, 12) == expected
    finally:
        model.cpu_plan = None


def test_a_plan_without_the_kernel_names_it_and_runs(unbuildable, bf16_model):
    _, model = bf16_model
    prompt = [random.Random(6).randrange(VOCAB) for _ in range(9)]
    expected = _greedy(model, prompt, 12)
    try:
        plan = model.plan_cpu_ops(max_batch=4, max_context=64)
        assert GEMV not in plan.one_row_linear.values() and GEMV not in plan.several_rows_linear.values()
        assert all(choice.name != "avx2" for choice in plan.decode_attention)
        for name in (GEMV, "avx2"):
            assert f"{name}: unavailable here ({cpu_avx2.unavailable_reason()[:100]}" in plan.describe()
        assert plan.small_ops == "torch"
        assert "norms and attention front-end avx2: unavailable here" in plan.describe()
        assert _greedy(model, prompt, 12) == expected
    finally:
        model.cpu_plan = None


@pytest.mark.parametrize("avx2_seconds,winner", [({1: 0.2, 8: 0.5}, "avx2"), ({1: 0.5, 8: 5.0}, "torch"),
                                                 ({1: 0.98, 8: 0.97}, "torch")])
def test_the_small_ops_are_chosen_by_their_worst_ratio(monkeypatch, avx2_seconds, winner):
    """Faster at both batch sizes: chosen; a worse worst ratio (2x faster at one, 5x slower at the other)
    or within MARGIN: torch stays."""
    rows_seen = []

    def timed(candidates, rounds):
        rows = len(rows_seen) and 8 or 1
        rows_seen.append(rows)
        return {name: {"torch": 1.0, "avx2": avx2_seconds[rows]}[name] for name in candidates}

    monkeypatch.setattr(cpu_plan, "runnable", lambda candidates, reference, dtype, dropped: candidates)
    monkeypatch.setattr(cpu_plan, "_fastest_seconds", timed)
    assert cpu_plan._choose_small_ops(64, 8, 2, 64, torch.bfloat16, [1, 8], {}) == winner
    assert rows_seen == [1, 8]
