"""The whole model on the Triton kernels (the interpreter on CPU) against HF and the torch ops."""

import os
import random
import subprocess
import sys

import pytest
import torch
from transformers import Qwen3ForCausalLM

from model.batch import SequenceStep, make_batch
from model.demo import write_checkpoint
from model.load import load_model
from model.tokenizer import Tokenizer
from tests.kernels.common import kernel_backend

VOCAB = 384
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU the kernels run in the interpreter

# GQA 5:1 (not a power of two) at head_dim 64; GQA 2:1 at head_dim 128.
SHAPES = {
    "gqa5-d64": dict(num_attention_heads=10, num_key_value_heads=2, head_dim=64),
    "gqa2-d128": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=128, tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def checkpoint(request, tmp_path_factory):
    shape = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 tie_word_embeddings=False, dtype="float32") | SHAPES[request.param]
    return write_checkpoint(tmp_path_factory.mktemp(request.param), shape, seed=11, with_tokenizer=False)


def _prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(length)]


def test_greedy_tokens_on_triton_kernels_match_hf(checkpoint):
    prompt, steps, block_size = _prompt(13, seed=1), 12, 8
    hf = Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    model = load_model(checkpoint, DEVICE, "float32")
    blocks = random.Random(2).sample(range(8), 4)
    cache = model.allocate_kv_cache(8, block_size)
    step, produced = SequenceStep(prompt, 0, blocks), []
    with kernel_backend("triton"):
        for _ in range(steps):
            token = int(model.forward(make_batch([step], block_size, DEVICE), cache).argmax(-1))
            produced.append(token)
            step = SequenceStep([token], step.num_cached + len(step.new_token_ids), blocks)
    assert produced == expected


def _hf_greedy(checkpoint, prompt: list[int], steps: int) -> list[int]:
    hf = Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return hf.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(prompt):].tolist()


def test_chunked_prefill_and_mixed_steps_on_triton_kernels_match_hf(checkpoint):
    """The fused front-end and the prefill kernel on every path a step takes: a prompt in two
    chunks (the second over a cached prefix that ends inside a block), then a step that decodes
    it while prefilling a second prompt, then batched decodes; greedy tokens equal HF's."""
    first, second, steps, block_size = _prompt(21, seed=3), _prompt(13, seed=4), 6, 8
    expected = [_hf_greedy(checkpoint, first, steps), _hf_greedy(checkpoint, second, steps)]
    model = load_model(checkpoint, DEVICE, "float32")
    cache = model.allocate_kv_cache(12, block_size)
    for k, v in cache:
        k.normal_(), v.normal_()  # stale values, never zeros
    tables = [[7, 2, 9, 4], [0, 11, 5, 1]]
    produced: list[list[int]] = [[], []]

    def step(seqs: list[SequenceStep]) -> list[int]:
        return model.forward(make_batch(seqs, block_size, DEVICE), cache).argmax(-1).tolist()

    with kernel_backend("triton"):
        step([SequenceStep(first[:10], 0, tables[0])])
        produced[0] += step([SequenceStep(first[10:], 10, tables[0])])
        mixed = step([SequenceStep(produced[0][-1:], len(first), tables[0]), SequenceStep(second, 0, tables[1])])
        for seq, token in enumerate(mixed):
            produced[seq].append(token)
        for _ in range(steps - 1):
            decodes = [SequenceStep(out[-1:], len(prompt) + len(out) - 1, table)
                       for prompt, out, table in zip((first, second), produced, tables)]
            for seq, token in enumerate(step(decodes)):
                if len(produced[seq]) < steps:
                    produced[seq].append(token)
    assert produced == expected


def _batched_logits(model, backend: str) -> list[torch.Tensor]:
    """A prefill of four sequences (lengths on and past block boundaries), then three decode steps."""
    block_size, lengths = 4, [4, 5, 7, 1]
    tables = [[4 * i + j for j in (3, 0, 2, 1)] for i in range(len(lengths))]
    cache = model.allocate_kv_cache(16, block_size)
    for k, v in cache:
        k.normal_(), v.normal_()  # stale values, never zeros
    steps = [SequenceStep(_prompt(n, seed=n), 0, t) for n, t in zip(lengths, tables)]
    logits = []
    with kernel_backend(backend):
        for _ in range(4):
            logits.append(model.forward(make_batch(steps, block_size, DEVICE), cache))
            tokens = logits[-1].argmax(-1).tolist()
            steps = [SequenceStep([t], s.num_cached + len(s.new_token_ids), s.block_table) for t, s in zip(tokens, steps)]
    return logits


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_batched_steps_on_triton_equal_torch_ops(checkpoint, dtype, tol):
    model = load_model(checkpoint, DEVICE, dtype)
    for ours, ref in zip(_batched_logits(model, "triton"), _batched_logits(model, "torch")):
        assert ((ours - ref).abs().max() / ref.abs().max()).item() <= tol


# All on Triton, and one op on its reference (per-op backends): prefill on the kernels, decode
# attention on torch.
@pytest.mark.parametrize("spec", ["triton", "triton,decode_attention=torch"])
def test_generate_cli_on_triton_kernels(chat_checkpoint, spec):
    prompt = "The capital of France is"
    tokenizer = Tokenizer(chat_checkpoint)
    ids = tokenizer.encode(prompt)
    hf = Qwen3ForCausalLM.from_pretrained(chat_checkpoint, dtype=torch.float32).eval()
    expected = tokenizer.decode(hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids):].tolist())
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "generate", "--kernels", spec, "--model", str(chat_checkpoint),
         "--max-tokens", "6", prompt],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
