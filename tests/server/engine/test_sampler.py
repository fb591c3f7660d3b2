"""The sampler on hand-made logits: each parameter changes the distribution as specified."""

import itertools
import math

import pytest
import torch

from server.engine.request import GenerationRequest, SamplingParams
from server.engine.sampler import (
    Sampler,
    apply_min_p,
    apply_presence_frequency_penalties,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_k_top_p,
)
from server.engine.sequence import Sequence

VOCAB = 64
EOS = 7
_seq_ids = itertools.count()  # unique ids, as an engine gives them


@pytest.fixture
def sampler() -> Sampler:
    return Sampler(VOCAB, torch.device("cpu"), eos_token_ids=(EOS,))


def make_seq(sampler: Sampler, params: SamplingParams, prompt: list[int] | None = None) -> Sequence:
    prompt = prompt or [1, 2, 3]
    seq_id = next(_seq_ids)
    seq = Sequence(seq_id, GenerationRequest(f"r{seq_id}", prompt, params), 0, 1000, (EOS,), detokenizer=None)
    seq.sampling = sampler.new_state(params, prompt, 0)
    return seq


def step(sampler: Sampler, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
    """One sampling step as the engine runs it: the sampled tokens join their sequences."""
    tokens = sampler.sample(logits, seqs).token_ids.tolist()
    for seq, token in zip(seqs, tokens):
        seq.token_ids.append(token)
    return tokens


def one_hot_logits(token: int) -> torch.Tensor:
    logits = torch.zeros(1, VOCAB)
    logits[0, token] = 10.0
    return logits


def logits_of(probs: list[float], order: list[int]) -> torch.Tensor:
    """A [1, VOCAB] row whose softmax puts `probs` on the tokens `order` and ~0 elsewhere."""
    logits = torch.full((1, VOCAB), -1e4)
    logits[0, order] = torch.tensor(probs).log()
    return logits


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(logits[0] > float("-inf")).flatten().tolist())


def test_greedy_and_top_k_1_take_the_argmax(sampler):
    logits = torch.randn(16, VOCAB) * 3
    greedy = [make_seq(sampler, SamplingParams(temperature=0.0)) for _ in range(16)]
    top1 = [make_seq(sampler, SamplingParams(temperature=1.5, top_k=1)) for _ in range(16)]
    assert sampler.sample(logits.clone(), greedy).token_ids.tolist() == logits.argmax(-1).tolist()
    for _ in range(5):
        assert sampler.sample(logits.clone(), top1).token_ids.tolist() == logits.argmax(-1).tolist()


def test_top_k_keeps_the_k_largest_and_rows_without_it_keep_all():
    logits = torch.randn(3, VOCAB)
    filtered = logits.clone()
    apply_top_k(filtered, torch.tensor([[5], [1], [VOCAB]]), max_top_k=5)
    for row, k in ((0, 5), (1, 1), (2, VOCAB)):
        expected = set(logits[row].topk(k).indices.tolist())
        assert kept(filtered[row : row + 1]) == expected
        assert torch.equal(filtered[row, list(expected)], logits[row, list(expected)])


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    order = [9, 4, 30, 2]  # probabilities 0.5, 0.3, 0.15, 0.05 in this order
    for top_p, expected in ((0.4, {9}), (0.7, {9, 4}), (0.8, {9, 4}), (0.81, {9, 4, 30}), (0.99, set(order))):
        logits = logits_of([0.5, 0.3, 0.15, 0.05], order)
        apply_top_k_top_p(logits, None, torch.tensor([[top_p]]))
        assert kept(logits) == expected, top_p
        probs = logits.softmax(-1)[0]
        mass = sum([0.5, 0.3, 0.15, 0.05][: len(expected)])
        assert probs[9].item() == pytest.approx(0.5 / mass, rel=1e-5)  # renormalised over the kept set


def test_top_p_applies_over_the_top_k_renormalised():
    logits = logits_of([0.5, 0.3, 0.15, 0.05], [9, 4, 30, 2])
    # top-2 leaves 0.625 / 0.375; top_p 0.6 is reached by the first alone.
    apply_top_k_top_p(logits, torch.tensor([[2]]), torch.tensor([[0.6]]))
    assert kept(logits) == {9}
    logits = logits_of([0.5, 0.3, 0.15, 0.05], [9, 4, 30, 2])
    apply_top_k_top_p(logits, torch.tensor([[3]]), torch.tensor([[math.inf]]))
    assert kept(logits) == {9, 4, 30}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    order = [9, 4, 30, 2]
    for min_p, expected in ((0.0, set(range(VOCAB))), (0.2, {9, 4, 30}), (0.5, {9, 4}), (0.7, {9})):
        logits = logits_of([0.5, 0.3, 0.15, 0.05], order)
        apply_min_p(logits, torch.tensor([[min_p]]))
        assert kept(logits) == expected, min_p


def test_penalty_functions_follow_openai_and_hf():
    row = torch.tensor([2.0, -2.0, 3.0, -1.0, 0.5])
    counts = torch.tensor([2.0, 1.0, 0.0, 0.0, 3.0])
    out = row.clone()
    apply_presence_frequency_penalties(out, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == pytest.approx([2 - 0.5 - 0.5, -2 - 0.25 - 0.5, 3.0, -1.0, 0.5 - 0.75 - 0.5])
    seen = torch.tensor([True, True, False, False, True])
    out = row.clone()
    apply_repetition_penalty(out, seen, 2.0)
    assert out.tolist() == pytest.approx([1.0, -4.0, 3.0, -1.0, 0.25])


def test_presence_and_frequency_count_generated_tokens_only(sampler):
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    seq = make_seq(sampler, params, prompt=[11, 12])
    for token in (3, 3, 5):  # generated: 3 twice, 5 once
        assert step(sampler, [seq], one_hot_logits(token)) == [token]
    raw = torch.randn(1, VOCAB)
    logits = raw.clone()
    sampler.sample(logits, [seq])
    expected = raw.clone()
    expected[0, 3] -= 2 * 0.25 + 0.5
    expected[0, 5] -= 0.25 + 0.5
    assert torch.allclose(logits, expected)  # prompt tokens 11, 12 untouched


def test_repetition_penalty_covers_prompt_and_output(sampler):
    seq = make_seq(sampler, SamplingParams(temperature=0.0, repetition_penalty=1.5), prompt=[11, 12])
    step(sampler, [seq], one_hot_logits(3))
    raw = torch.randn(1, VOCAB)
    raw[0, 11], raw[0, 12], raw[0, 3] = 2.0, -2.0, 3.0
    logits = raw.clone()
    sampler.sample(logits, [seq])
    expected = raw.clone()
    expected[0, 11], expected[0, 12], expected[0, 3] = 2.0 / 1.5, -2.0 * 1.5, 3.0 / 1.5
    assert torch.allclose(logits, expected)


def test_logit_bias_is_added_and_moves_greedy(sampler):
    raw = torch.randn(1, VOCAB)
    low = int(raw.argmin())
    seq = make_seq(sampler, SamplingParams(temperature=0.0, logit_bias={low: 100.0, 0: -5.0}))
    logits = raw.clone()
    assert sampler.sample(logits, [seq]).token_ids.tolist() == [low]
    expected = raw.clone()
    expected[0, low] += 100.0
    expected[0, 0] -= 5.0
    assert torch.allclose(logits, expected)


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_keeps_eos_and_stop_ids_out(sampler, ignore_eos):
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[20], ignore_eos=ignore_eos)
    seq = make_seq(sampler, params)
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS], logits[0, 20], logits[0, 5] = 9.0, 8.0, 1.0
    tokens = [step(sampler, [seq], logits.clone())[0] for _ in range(4)]
    # EOS is only kept out when it would stop the sequence; stop token ids always are.
    assert tokens == ([EOS, EOS, EOS, EOS] if ignore_eos else [5, 5, 5, EOS])


def test_sampling_draws_from_the_filtered_distribution(sampler):
    order = [9, 4, 30, 2]
    probs = [0.5, 0.3, 0.15, 0.05]
    draws = 3000
    seqs = [make_seq(sampler, SamplingParams(temperature=1.0, top_p=0.9)) for _ in range(draws)]
    logits = logits_of(probs, order).expand(draws, VOCAB).clone()
    tokens = sampler.sample(logits, seqs).token_ids.tolist()
    assert set(tokens) == {9, 4, 30}
    for token, p in zip(order[:3], probs[:3]):
        assert tokens.count(token) / draws == pytest.approx(p / 0.95, abs=0.03)


def test_seeded_rows_do_not_depend_on_batch_company(sampler):
    logits = torch.randn(12, VOCAB)  # flat enough that different seeds draw different tokens

    def run(seed: int, company: list[SamplingParams]) -> list[int]:
        seqs = [make_seq(sampler, sp) for sp in company]
        target = make_seq(sampler, SamplingParams(temperature=1.0, seed=seed))
        seqs.insert(len(seqs) // 2, target)
        for row in range(len(logits)):
            batch = logits[row].expand(len(seqs), VOCAB).clone()
            step(sampler, seqs, batch)
        return target.token_ids[3:]

    alone = run(1, [])
    company = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_p=0.8),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.2, seed=5, top_k=3),
    ]
    assert run(1, company) == alone
    assert run(1, company[:2]) == alone
    assert run(2, company) != alone


def test_logprobs_come_from_the_raw_logits(sampler):
    params = SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.3, logprobs=4)
    seqs = [make_seq(sampler, params), make_seq(sampler, SamplingParams(temperature=0.0))]
    raw = torch.randn(2, VOCAB) * 2
    out = sampler.sample(raw.clone(), seqs)
    expected = raw[0].log_softmax(-1)
    assert out.logprob_rows == [0]
    token = out.token_ids[0]
    assert out.token_logprobs.tolist() == pytest.approx([expected[token].item()])
    assert out.top_ids[0].tolist() == expected.topk(4).indices.tolist()
    assert out.top_logprobs[0].tolist() == pytest.approx(expected.topk(4).values.tolist())


def test_an_all_greedy_batch_takes_each_rows_argmax_and_leaves_the_logits(sampler):
    seqs = [make_seq(sampler, SamplingParams(temperature=0.0)) for _ in range(5)]
    logits = torch.randn(5, VOCAB)
    before = logits.clone()
    out = sampler.sample(logits, seqs)
    assert out.token_ids.tolist() == before.argmax(-1).tolist()
    assert out.logprob_rows == [] and out.token_logprobs is None
    assert torch.equal(logits, before)
