"""The hand-written Qwen3 against transformers' Qwen3ForCausalLM on random checkpoints."""

import random

import pytest
import torch
from transformers import Qwen3ForCausalLM

from model.batch import SequenceStep, make_batch
from model.load import load_model

SMALL_VOCAB = 384

# (name, shape, shards): tied and untied, GQA ratios 1/2/4, head_dim 64/128, sharded and single-file.
CHECKPOINTS = [
    ("tied-gqa1-d64", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True), 1),
    ("untied-gqa2-d128-sharded", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=128), 3),
    ("tied-gqa4-d64-sharded", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True), 2),
    ("untied-gqa4-d128", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=128), 1),
]


def _shape(extra: dict) -> dict:
    shape = dict(
        vocab_size=SMALL_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        tie_word_embeddings=False,
        dtype="float32",
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
    )
    return shape | extra


@pytest.fixture(scope="module", params=CHECKPOINTS, ids=[c[0] for c in CHECKPOINTS])
def checkpoint(request, tmp_path_factory):
    from model.demo import write_checkpoint

    name, extra, shards = request.param
    return write_checkpoint(tmp_path_factory.mktemp(name), _shape(extra), seed=len(name), num_shards=shards, with_tokenizer=False)


def _hf(checkpoint, dtype):
    return Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(SMALL_VOCAB) for _ in range(length)]


def _shuffled_blocks(count: int, pool: int, seed: int) -> list[int]:
    return random.Random(seed).sample(range(pool), count)


def _full_logits(model, tokens: list[int], block_size: int = 16) -> torch.Tensor:
    blocks = _shuffled_blocks((len(tokens) + block_size - 1) // block_size, 64, seed=len(tokens))
    cache = model.allocate_kv_cache(64, block_size)
    batch = make_batch([SequenceStep(tokens, 0, blocks)], block_size, "cpu", all_logits=True)
    return model.forward(batch, cache)


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_full_sequence_logits_match_hf(checkpoint, dtype, tol):
    tokens = _prompt(45, seed=1)
    ref = _hf(checkpoint, dtype)(torch.tensor([tokens])).logits[0]
    ours = _full_logits(load_model(checkpoint, "cpu", str(dtype).removeprefix("torch.")), tokens)
    assert ours.shape == (len(tokens), SMALL_VOCAB)
    assert _rel_err(ours, ref) <= tol


def test_greedy_tokens_match_hf(checkpoint):
    prompt = _prompt(11, seed=2)
    hf = _hf(checkpoint, torch.float32)
    expected = hf.generate(
        torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt) :].tolist()

    model = load_model(checkpoint, "cpu", "float32")
    block_size = 8
    blocks = _shuffled_blocks(6, 16, seed=3)
    cache = model.allocate_kv_cache(16, block_size)
    step, produced = SequenceStep(prompt, 0, blocks), []
    for _ in range(32):
        token = int(model.forward(make_batch([step], block_size, "cpu"), cache).argmax(-1))
        produced.append(token)
        step = SequenceStep([token], step.num_cached + len(step.new_token_ids), blocks)
    assert produced == expected


@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_prefill_then_decode_equals_full_recompute(checkpoint, block_size):
    """Several sequences share the cache; lengths end on and just past block boundaries."""
    model = load_model(checkpoint, "cpu", "float32")
    lengths = [block_size, block_size + 1, 2 * block_size - 1, 3]
    prompts = [_prompt(n, seed=10 + n) for n in lengths]
    decode_steps = block_size + 2  # every sequence crosses at least one more block boundary
    per_seq_blocks = (max(lengths) + decode_steps + block_size - 1) // block_size
    pool = per_seq_blocks * len(prompts) + 3
    shuffled = _shuffled_blocks(per_seq_blocks * len(prompts), pool, seed=block_size)
    tables = [shuffled[i * per_seq_blocks : (i + 1) * per_seq_blocks] for i in range(len(prompts))]
    cache = model.allocate_kv_cache(pool, block_size)
    cache_fill = torch.randn_like(cache[0][0])  # stale garbage, never zeros
    for k, v in cache:
        k.copy_(cache_fill)
        v.copy_(cache_fill)

    steps = [SequenceStep(p, 0, t) for p, t in zip(prompts, tables)]
    sequences = [list(p) for p in prompts]
    logits = model.forward(make_batch(steps, block_size, "cpu"), cache)
    for _ in range(decode_steps):
        tokens = logits.argmax(-1).tolist()
        for seq, token in zip(sequences, tokens):
            seq.append(token)
        steps = [SequenceStep([tok], len(seq) - 1, s.block_table) for tok, seq, s in zip(tokens, sequences, steps)]
        logits = model.forward(make_batch(steps, block_size, "cpu"), cache)
        for i, seq in enumerate(sequences):
            recomputed = _full_logits(model, seq)[-1]
            assert _rel_err(logits[i], recomputed) <= 1e-5


def test_prefill_over_cached_prefix_equals_single_prefill(checkpoint):
    """A prompt prefilled in two chunks (the second attending to the first through the cache)."""
    model = load_model(checkpoint, "cpu", "float32")
    tokens = _prompt(29, seed=5)
    block_size = 8
    blocks = _shuffled_blocks(4, 9, seed=6)
    cache = model.allocate_kv_cache(9, block_size)
    first = model.forward(make_batch([SequenceStep(tokens[:13], 0, blocks)], block_size, "cpu", all_logits=True), cache)
    second = model.forward(make_batch([SequenceStep(tokens[13:], 13, blocks)], block_size, "cpu", all_logits=True), cache)
    assert _rel_err(torch.cat([first, second]), _full_logits(model, tokens)) <= 1e-5


def test_mixed_step_equals_separate_steps(checkpoint):
    """One step holding decodes (first) and prompt chunks over cached prefixes gives each sequence
    the logits it gets alone."""
    model = load_model(checkpoint, "cpu", "float32")
    block_size = 8
    prompts = [_prompt(n, seed=40 + n) for n in (12, 21, 30, 9)]
    cached = [11, 20, 16, 0]  # two decodes (one token left), a chunk over two blocks, a fresh prompt
    tables = [list(range(i * 5, i * 5 + 5)) for i in range(len(prompts))]

    def run(indices: list[int]) -> torch.Tensor:
        cache = model.allocate_kv_cache(20, block_size)
        for i in indices:  # the cached prefixes, as earlier steps left them
            if cached[i]:
                model.forward(make_batch([SequenceStep(prompts[i][: cached[i]], 0, tables[i])], block_size, "cpu"), cache)
        steps = [SequenceStep(prompts[i][cached[i] :], cached[i], tables[i]) for i in indices]
        return model.forward(make_batch(steps, block_size, "cpu", all_logits=True), cache)

    mixed = run([0, 1, 2, 3])
    assert make_batch([SequenceStep(prompts[i][cached[i]:], cached[i], tables[i]) for i in range(4)],
                      block_size, "cpu").num_decodes == 2
    alone = torch.cat([run([i]) for i in range(4)])
    assert _rel_err(mixed, alone) <= 1e-5
