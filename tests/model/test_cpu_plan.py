"""CPU op choices by measurement: the chooser picks what is faster (and keeps the default on a
near tie), the plan dispatches by shape and batch, and every candidate gives the model's results."""

import random
import time

import pytest
import torch

from model.batch import SequenceStep, make_batch
import model.cpu_avx2 as cpu_avx2
import model.cpu_plan as cpu_plan
from model.cpu_plan import (
    BATCHED_COPY,
    DECODE_ATTENTIONS,
    FP32,
    ONE_ROW_LINEARS,
    PACKED,
    MAX_WINDOW_ROWS,
    WINDOW_ATTENTIONS,
    AttentionChoice,
    CpuPlan,
    fastest,
    probe_packing,
)
from model.demo import write_checkpoint
from model.load import load_model

VOCAB = 384


def _sleeper(seconds: float):
    return lambda: time.sleep(seconds)


def test_fastest_takes_a_clearly_faster_challenger():
    assert fastest({"default": _sleeper(0.012), "challenger": _sleeper(0.002)}, rounds=5) == "challenger"


def test_fastest_keeps_the_default_when_it_wins_or_ties():
    assert fastest({"default": _sleeper(0.002), "challenger": _sleeper(0.012)}, rounds=5) == "default"
    # A challenger that is no faster never replaces the default.
    assert fastest({"default": _sleeper(0.004), "challenger": _sleeper(0.004)}, rounds=5) == "default"


def test_plan_dispatches_single_rows_by_weight_shape(monkeypatch):
    used = []
    monkeypatch.setitem(ONE_ROW_LINEARS, "mv", lambda x, w: used.append(tuple(w.shape)) or torch.mv(w, x[0])[None])
    plan = CpuPlan({(8, 4): "mv", (4, 8): "linear"}, [AttentionChoice(1, 16, "sdpa")], 0.0)
    w1, w2 = torch.randn(8, 4), torch.randn(4, 8)
    x1, x2, x3 = torch.randn(1, 4), torch.randn(1, 8), torch.randn(3, 4)
    torch.testing.assert_close(plan.linear(x1, w1), x1 @ w1.T)
    torch.testing.assert_close(plan.linear(x2, w2), x2 @ w2.T)
    torch.testing.assert_close(plan.linear(x3, w1), x3 @ w1.T)  # several rows: always F.linear
    assert used == [(8, 4)]


def test_plan_picks_the_nearest_measured_attention_point():
    plan = CpuPlan({}, [AttentionChoice(1, 128, "grouped"), AttentionChoice(1, 2048, "sdpa"),
                        AttentionChoice(8, 128, "grouped"), AttentionChoice(8, 2048, "grouped")], 0.0)
    assert plan.attention_for(1, 100) is DECODE_ATTENTIONS["grouped"]
    assert plan.attention_for(2, 1500) is DECODE_ATTENTIONS["sdpa"]
    assert plan.attention_for(6, 1500) is DECODE_ATTENTIONS["grouped"]


@pytest.fixture(scope="module")
def fp32_checkpoint(tmp_path_factory):
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, tie_word_embeddings=False, dtype="float32")
    return write_checkpoint(tmp_path_factory.mktemp("plan"), shape, seed=5, with_tokenizer=False)


@pytest.fixture
def model(fp32_checkpoint):
    """Loaded for each test: a plan may hold its weights in another layout."""
    return load_model(fp32_checkpoint, "cpu")


def _greedy(model, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Greedy tokens for a batch of prompts: one prefill step, then decode steps."""
    block_size, width = 8, 6
    cache = model.allocate_kv_cache(width * len(prompts), block_size)
    tables = [range(i * width, (i + 1) * width) for i in range(len(prompts))]
    seqs = [list(p) for p in prompts]
    batch = [SequenceStep(p, 0, t) for p, t in zip(prompts, tables)]
    for _ in range(steps):
        tokens = model.forward(make_batch(batch, block_size, "cpu"), cache).argmax(-1).tolist()
        batch = [SequenceStep([tok], len(seq), t) for tok, seq, t in zip(tokens, seqs, tables)]
        for seq, tok in zip(seqs, tokens):
            seq.append(tok)
    return [seq[len(p):] for seq, p in zip(seqs, prompts)]


@pytest.mark.parametrize("one_row,attention", [("mv", "grouped"), ("linear", "sdpa"), ("mv", "sdpa")])
def test_every_candidate_gives_the_models_tokens(model, one_row, attention):
    rng = random.Random(3)
    single = [[rng.randrange(VOCAB) for _ in range(7)]]
    batch = [[rng.randrange(VOCAB) for _ in range(n)] for n in (5, 11, 3)]
    model.cpu_plan = None
    expected = _greedy(model, single, 20), _greedy(model, batch, 20)
    c = model.config
    shapes = {(c.q_size + 2 * c.kv_size, c.hidden_size), (c.hidden_size, c.q_size),
              (2 * c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size), (VOCAB, c.hidden_size)}
    model.cpu_plan = CpuPlan({shape: one_row for shape in shapes}, [AttentionChoice(1, 64, attention)], 0.0)
    try:
        assert (_greedy(model, single, 20), _greedy(model, batch, 20)) == expected
    finally:
        model.cpu_plan = None


def test_plan_cpu_ops_measures_every_projection_shape(model):
    try:
        plan = model.plan_cpu_ops(max_batch=4, max_context=64)
    finally:
        model.cpu_plan = None
    c = model.config
    assert set(plan.one_row_linear) == {(c.q_size + 2 * c.kv_size, c.hidden_size), (c.hidden_size, c.q_size),
                                        (2 * c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size),
                                        (VOCAB, c.hidden_size)}
    assert [(a.batch, a.context) for a in plan.decode_attention] == [(1, 64), (4, 64)]
    assert "CPU ops chosen by timing them here" in plan.describe()
    assert "; freed memory kept" in plan.describe() or "; freed memory returned" in plan.describe()


@pytest.fixture(scope="module")
def bf16_tied_model(tmp_path_factory):
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, tie_word_embeddings=True, dtype="bfloat16")
    return load_model(write_checkpoint(tmp_path_factory.mktemp("packed"), shape, seed=6, with_tokenizer=False), "cpu",
                      "bfloat16")


def _projection_shapes(model) -> set[tuple[int, int]]:
    c = model.config
    return {(c.q_size + 2 * c.kv_size, c.hidden_size), (c.hidden_size, c.q_size),
            (2 * c.intermediate_size, c.hidden_size), (c.hidden_size, c.intermediate_size), (VOCAB, c.hidden_size)}


@pytest.fixture
def bf16_tied_model(tmp_path_factory):
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=64, tie_word_embeddings=True, dtype="bfloat16")
    return load_model(write_checkpoint(tmp_path_factory.mktemp("held"), shape, seed=6, with_tokenizer=False), "cpu",
                      "bfloat16")


@pytest.mark.skipif(bool(probe_packing(torch.bfloat16)), reason=f"{probe_packing(torch.bfloat16)}")
def test_packed_weights_give_the_models_tokens_and_keep_the_tied_embedding(bf16_tied_model):
    model = bf16_tied_model
    rng = random.Random(4)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (6, 13, 2)]
    expected = _greedy(model, prompts, 16)
    table = model.embed_tokens.detach().clone()
    plan = CpuPlan({shape: PACKED for shape in _projection_shapes(model)}, [AttentionChoice(1, 64, "sdpa")], 0.0)
    model._hold_weights(plan)
    model.cpu_plan = plan
    assert all(getattr(layer, name).is_mkldnn for layer in model.layers
               for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    assert model.lm_head.is_mkldnn and not model.embed_tokens.is_mkldnn  # the lookup keeps its plain table
    torch.testing.assert_close(model.embed_tokens, table, rtol=0, atol=0)
    assert _greedy(model, prompts, 16) == expected  # prefill (several rows) and decode through packed weights
    again = model.plan_cpu_ops(max_batch=4, max_context=64)  # a second plan keeps what is held
    assert set(again.one_row_linear.values()) == {PACKED} and again.extra_bytes == VOCAB * 64 * 2
    assert "held weights add" in again.describe()


def test_fp32_held_weights_give_the_models_tokens_and_count_their_memory(bf16_tied_model):
    model = bf16_tied_model
    rng = random.Random(8)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (9, 4, 15)]
    expected = _greedy(model, prompts, 16)
    table = model.embed_tokens.detach().clone()
    plan = CpuPlan({shape: FP32 for shape in _projection_shapes(model)}, [AttentionChoice(1, 64, "grouped")], 0.0)
    model._hold_weights(plan)
    model.cpu_plan = plan
    assert all(getattr(layer, name).dtype == torch.float32 for layer in model.layers
               for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    assert model.lm_head.dtype == torch.float32 and model.embed_tokens.dtype == torch.bfloat16
    torch.testing.assert_close(model.embed_tokens, table, rtol=0, atol=0)
    assert _greedy(model, prompts, 16) == expected
    again = model.plan_cpu_ops(max_batch=4, max_context=64)
    layer_numel = sum(getattr(layer, name).numel() for layer in model.layers
                      for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
    # bf16 -> fp32 adds 2 bytes per layer weight element; the tied head is a 4-byte copy beside the table.
    assert set(again.one_row_linear.values()) == {FP32}
    assert again.extra_bytes == layer_numel * 2 + VOCAB * 64 * 4


def test_a_candidate_that_raises_or_computes_wrongly_is_dropped_and_named(model, monkeypatch):
    def raises(x, w):
        raise RuntimeError("this processor lacks the instructions\nsecond line")

    monkeypatch.setitem(ONE_ROW_LINEARS, "mv", raises)
    monkeypatch.setitem(DECODE_ATTENTIONS, "grouped", lambda q, *args: 2 * DECODE_ATTENTIONS["sdpa"](q, *args))
    try:
        plan = model.plan_cpu_ops(max_batch=4, max_context=64)
    finally:
        model.cpu_plan = None
    assert "mv" not in plan.one_row_linear.values()
    assert {a.name for a in plan.decode_attention} <= {"sdpa", "avx2"}  # avx2 where it runs
    assert plan.skipped["mv"] == "mv: unavailable here (this processor lacks the instructions)"
    assert plan.skipped["grouped"].startswith("grouped: gives wrong results here (max |difference| ")
    line = plan.describe()
    assert "skipped: " in line and plan.skipped["mv"] in line and plan.skipped["grouped"] in line


def test_fp32_copies_are_refused_when_they_would_not_fit(bf16_tied_model, monkeypatch):
    monkeypatch.setattr(cpu_plan, "available_memory_bytes", lambda: 1000)
    model = bf16_tied_model
    plan = model.plan_cpu_ops(max_batch=4, max_context=64)
    assert FP32 not in plan.one_row_linear.values() and plan.extra_bytes == 0
    assert "would need" in plan.skipped[FP32] and "of the memory available" in plan.skipped[FP32]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.is_mkldnn)


def test_fp32_models_are_not_offered_fp32_copies(model):
    try:
        plan = model.plan_cpu_ops(max_batch=4, max_context=64)  # an fp32 model
    finally:
        model.cpu_plan = None
    assert FP32 not in plan.one_row_linear.values() and FP32 not in plan.skipped
    assert all(p.dtype == torch.float32 for p in model.parameters() if not p.is_mkldnn)


@pytest.mark.parametrize("one_row,batch,winner,split", [
    # (seconds per option at one row, at a full batch) -> the option whose worse ratio to the fastest
    # is least, or the plain weight for one row with a held copy for several (a split)
    ({"linear": 1.0, "mv": 0.9, FP32: 1.1}, {"linear": 10.0, FP32: 1.0}, "mv", FP32),  # each side its fastest
    ({"linear": 1.0, "mv": 0.5, FP32: 1.1}, {"linear": 1.0, FP32: 1.0}, "mv", None),  # held 2.2x slower for one row
    ({"linear": 1.0, "mv": 1.0, FP32: 0.98}, {"linear": 1.0, FP32: 0.98}, "linear", None),  # within the margin: the default
    ({"linear": 1.0, "mv": 1.0, FP32: 1.02}, {"linear": 10.0, FP32: 1.0}, FP32, None),  # a split gains < MARGIN: one copy
])
def test_held_layouts_are_compared_at_one_row_and_a_full_batch(bf16_tied_model, monkeypatch, one_row, batch, winner,
                                                               split):
    monkeypatch.setattr(cpu_plan, "held_layouts", lambda dtype, quantization=None: [FP32])
    monkeypatch.setattr(cpu_plan, "_times", lambda operands, rows, plain, skipped: one_row if rows == 1 else batch)
    weight = cpu_plan.PlannedWeight(bf16_tied_model.layers[0].o_proj, replaced=2)
    assert cpu_plan._choose_linear(weight, [1, 8], cpu_plan._MemoryBudget(), {})[:3] == (winner, split, {
        FP32: 2 * weight.sample.numel() * 2,  # bf16 -> fp32 in place: 2 more bytes an element
        "split": 2 * weight.sample.numel() * 4,  # an fp32 copy beside each bf16 weight
    }.get("split" if split else winner, 0))


def test_a_split_that_would_not_fit_falls_back_to_one_layout(bf16_tied_model, monkeypatch):
    monkeypatch.setattr(cpu_plan, "held_layouts", lambda dtype, quantization=None: [FP32])
    monkeypatch.setattr(cpu_plan, "_times", lambda operands, rows, plain, skipped:
                        {"linear": 1.0, "mv": 0.9, FP32: 1.1} if rows == 1 else {"linear": 10.0, FP32: 1.0})
    weight = cpu_plan.PlannedWeight(bf16_tied_model.layers[0].o_proj, replaced=2)
    budget = cpu_plan._MemoryBudget()
    budget.left = 2 * weight.sample.numel() * 4 - 1  # room for the fp32 weights in place, not beside the bf16 ones
    assert cpu_plan._choose_linear(weight, [1, 8], budget, {})[:3] == (FP32, None, 2 * weight.sample.numel() * 2)


def test_held_layouts_are_compared_at_a_verification_steps_rows_too(bf16_tied_model, monkeypatch):
    # The plain weight wins at one row and at a full batch but takes 4x as long as the held copy
    # for a verification window of 9 rows: timed at 9 rows too, the plan keeps a copy for several rows.
    seconds = {1: {"linear": 1.0, "mv": 1.0, FP32: 1.2}, 9: {"linear": 4.0, FP32: 1.0}, 16: {"linear": 2.0, FP32: 2.0}}
    monkeypatch.setattr(cpu_plan, "held_layouts", lambda dtype, quantization=None: [FP32])
    monkeypatch.setattr(cpu_plan, "_times", lambda operands, rows, plain, skipped: dict(seconds[rows]))
    weight = cpu_plan.PlannedWeight(bf16_tied_model.layers[0].o_proj, replaced=2)
    assert cpu_plan._choose_linear(weight, [1, 16], cpu_plan._MemoryBudget(), {})[:2] == ("linear", None)
    assert cpu_plan._choose_linear(weight, [1, 9, 16], cpu_plan._MemoryBudget(), {})[:2] == ("linear", FP32)


def test_a_split_plan_keeps_the_plain_weights_and_gives_the_models_tokens(bf16_tied_model):
    model = bf16_tied_model
    rng = random.Random(11)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (7, 12, 3)]
    expected = _greedy(model, prompts, 16)  # prefill and decode of three sequences: several rows every step
    table = model.embed_tokens.detach().clone()
    shapes = _projection_shapes(model)
    plan = CpuPlan({shape: "linear" for shape in shapes}, [AttentionChoice(1, 64, "sdpa")], 0.0,
                   batched_layout={shape: FP32 for shape in shapes})
    model._hold_weights(plan)
    model.cpu_plan = plan
    try:
        weights = [getattr(layer, name) for layer in model.layers for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")]
        assert all(w.dtype == torch.bfloat16 and getattr(w, BATCHED_COPY).dtype == torch.float32 for w in weights)
        assert model.lm_head is model.embed_tokens and getattr(model.lm_head, BATCHED_COPY).dtype == torch.float32
        torch.testing.assert_close(model.embed_tokens, table, rtol=0, atol=0)
        assert _greedy(model, prompts, 16) == expected
        assert _greedy(model, prompts[:1], 16) == expected[:1]  # one sequence: one row, the plain weights
        assert "(several rows: fp32)" in plan.describe()
        again = model.plan_cpu_ops(max_batch=4, max_context=64)  # a second plan keeps the split
        assert again.batched_layout == plan.batched_layout
        assert again.extra_bytes == sum(w.numel() for w in weights) * 4 + VOCAB * 64 * 4
    finally:
        model.cpu_plan = None
        for w in [*weights, model.embed_tokens]:
            delattr(w, BATCHED_COPY)


def test_the_plan_times_matmuls_at_one_row_a_verification_window_and_a_full_batch(model, monkeypatch):
    timed_rows = []
    times = cpu_plan._times
    monkeypatch.setattr(cpu_plan, "_times", lambda operands, rows, *rest: timed_rows.append(rows) or times(operands, rows, *rest))
    try:
        model.plan_cpu_ops(max_batch=4, max_context=64)
    finally:
        model.cpu_plan = None
    # and a prompt chunk's rows when there are two several-row functions to choose from (F.linear, gemv)
    prompt = {cpu_plan.PREFILL_ROWS} if cpu_avx2.unavailable_reason() is None else set()
    assert set(timed_rows) == {1, 4, cpu_plan.VERIFY_ROWS} | prompt


def test_plan_takes_its_window_attention_only_for_chunks_as_short_as_a_verification_window():
    plan = CpuPlan({}, [AttentionChoice(1, 128, "sdpa")], 0.0,
                   window_attention=[AttentionChoice(9, 128, "grouped"), AttentionChoice(9, 2048, "sdpa")])
    assert plan.window_attention_for(9, 100) is WINDOW_ATTENTIONS["grouped"]
    assert plan.window_attention_for(MAX_WINDOW_ROWS, 1500) is WINDOW_ATTENTIONS["sdpa"]
    assert plan.window_attention_for(MAX_WINDOW_ROWS + 1, 100) is None  # a prompt chunk: the kernels' op
    assert CpuPlan({}, [AttentionChoice(1, 128, "sdpa")], 0.0).window_attention_for(9, 100) is None


@pytest.mark.parametrize("window", list(WINDOW_ATTENTIONS))
def test_verification_windows_give_the_kernels_logits(model, window):
    # Two sequences with cached prompts: one decodes, one brings a window of 5 tokens, as a
    # speculative verification step does; every row's logits as without a plan.
    rng = random.Random(4)
    block_size, width = 8, 6
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (13, 9)]
    tables = [range(i * width, (i + 1) * width) for i in range(2)]
    window_tokens = [rng.randrange(VOCAB) for _ in range(5)]

    def logits() -> torch.Tensor:
        cache = model.allocate_kv_cache(2 * width, block_size)
        model.forward(make_batch([SequenceStep(p, 0, t) for p, t in zip(prompts, tables)], block_size, "cpu"), cache)
        steps = [SequenceStep([7], len(prompts[0]), tables[0]), SequenceStep(window_tokens, len(prompts[1]), tables[1])]
        return model.forward(make_batch(steps, block_size, "cpu", all_logits=True), cache)

    model.cpu_plan = None
    expected = logits()
    model.cpu_plan = CpuPlan({}, [AttentionChoice(1, 64, "sdpa")], 0.0, window_attention=[AttentionChoice(9, 64, window)])
    try:
        got = logits()
    finally:
        model.cpu_plan = None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()


def test_the_plan_measures_window_attention_and_names_it(model):
    try:
        plan = model.plan_cpu_ops(max_batch=2, max_context=64)
    finally:
        model.cpu_plan = None
    assert [(c.batch, c.context) for c in plan.window_attention] == [(cpu_plan.VERIFY_ROWS, 64)]
    assert all(c.name in WINDOW_ATTENTIONS for c in plan.window_attention)
    assert "verification window attention: Q=9 L=64" in plan.describe()


def test_a_context_shorter_than_a_window_is_timed_at_the_windows_length(model):
    try:
        plan = model.plan_cpu_ops(max_batch=1, max_context=4)
    finally:
        model.cpu_plan = None
    assert [(c.batch, c.context) for c in plan.window_attention] == [(cpu_plan.VERIFY_ROWS, cpu_plan.VERIFY_ROWS)]
