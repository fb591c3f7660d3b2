"""The parts of speculative decoding on hand-made inputs: the config's errors, the proposers, the
acceptance tracking, the block manager's rollback, and rejection sampling's distribution."""

import itertools

import pytest
import torch

from server.engine.block_manager import BlockManager
from server.engine.model_runner import _verified
from server.engine.proposers import NgramProposer, PredictionProposer
from server.engine.request import GenerationRequest, SamplingParams
from server.engine.sampler import Sampler, apply_top_k, apply_top_k_top_p
from server.engine.scheduler import Scheduler
from server.engine.sequence import Sequence, SequenceStatus
from server.engine.speculative import (
    FIRST_WINDOW,
    MAX_BACKOFF,
    UNPROVEN_PAUSE,
    SpeculativeConfig,
    Speculator,
    parse_speculative_config,
)

_ids = itertools.count()


def make_seq(prompt: list[int], params: SamplingParams | None = None, sampler: Sampler | None = None) -> Sequence:
    seq_id = next(_ids)
    request = GenerationRequest(f"r{seq_id}", list(prompt), params or SamplingParams(temperature=0))
    seq = Sequence(seq_id, request, 0, 1000, (), detokenizer=None)
    if sampler is not None:
        seq.sampling = sampler.new_state(request.params, prompt, 0)
    return seq


@pytest.mark.parametrize("text, words", [
    ("{", "is not valid JSON"),
    ("[4]", "must be a JSON object"),
    ('{"method": "eagle"}', "method 'eagle' is not supported"),
    ('{"num_speculative_tokens": 0}', "num_speculative_tokens must be a positive integer, got 0"),
    ('{"num_speculative_tokens": true}', "num_speculative_tokens must be a positive integer, got True"),
    ('{"num_speculative_tokens": 33}', "at most 32"),
    ('{"prompt_lookup_min": 4, "prompt_lookup_max": 2}', "prompt_lookup_min (4) exceeds prompt_lookup_max (2)"),
    ('{"k": 4}', "unknown field(s) 'k'"),
    ('{"method": "draft_model"}', 'the draft_model method needs "model"'),
    ('{"model": "/m"}', '"model" is for the draft_model method'),
])
def test_bad_speculative_configs_say_what_is_wrong(text, words):
    with pytest.raises(ValueError, match="--speculative-config") as err:
        parse_speculative_config(text)
    assert words in str(err.value)


def test_a_speculative_config_takes_vllms_field_names():
    config = parse_speculative_config('{"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_min": 1, '
                                      '"prompt_lookup_max": 4, "disable_by_batch_size": 8}')
    assert config == SpeculativeConfig("ngram", 6, 1, 4, 8)
    draft = parse_speculative_config('{"method": "draft_model", "model": "/ckpt", "num_speculative_tokens": 3}')
    assert (draft.method, draft.model, draft.num_speculative_tokens) == ("draft_model", "/ckpt", 3)


def test_ngram_proposes_what_followed_the_longest_recurring_suffix():
    proposer = NgramProposer(3, 2, 4)
    #          an earlier "5 6 7" followed by 8 9 1; a later "6 7" followed by 3
    tokens = [5, 6, 7, 8, 9, 1, 2, 6, 7, 3, 4, 5, 6, 7]
    assert proposer.propose(tokens) == [8, 9, 1]  # the 3-gram wins over the more recent 2-gram
    assert proposer.propose([1, 2, 3, 4]) == []
    assert proposer.propose([1, 2, 9, 1, 2]) == [9, 1, 2]
    assert NgramProposer(3, 1, 1).propose([4, 8, 4]) == [8, 4]  # what there is, up to the end


def test_a_prediction_realigns_after_a_mismatch():
    prediction = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    proposer = PredictionProposer(prediction, 3)
    assert proposer.propose([]) == [10, 11, 12]
    assert proposer.propose([10, 11]) == [12, 13, 14]
    assert proposer.propose([10, 11, 99]) == []  # 99 is nowhere in the prediction
    assert proposer.propose([10, 11, 99, 98, 15]) == [16, 17, 18]  # "15" found: go on after it
    assert proposer.propose([10, 11, 99, 98, 15, 16, 17, 18, 19]) == []  # the prediction is used up
    repeated = PredictionProposer([1, 2, 3, 1, 2, 4], 2)
    assert repeated.propose([1, 2, 3, 7, 1, 2]) == [4]  # the later "1 2", after the point reached


def _windows_until_paused(speculator: Speculator, seq: Sequence, steps: int) -> list[int]:
    """The step indices, over `steps` steps, at which the sequence brought drafts, each rejected at once."""
    at = []
    for step in range(steps):
        draft = speculator.propose(seq, 10)
        if draft:
            at.append(step)
            speculator.record(seq, len(draft), 0)
    return at


def _proven(speculator: Speculator, seq: Sequence) -> None:
    """Give the sequence one accepted draft, so its proposer counts as proven right."""
    speculator.record(seq, len(speculator.propose(seq, 10)), 1)


def test_an_unproven_proposer_starts_small_and_pauses_at_once_when_wrong():
    speculator = Speculator(None)  # a prediction's window: 8 drafts
    seq = make_seq([1, 2, 3])
    speculator.attach(seq, list(range(100, 200)))
    assert len(speculator.propose(seq, 10)) == FIRST_WINDOW == 4
    speculator.record(seq, 4, 0)  # rejected at its first draft: plain decoding at once
    assert [len(speculator.propose(seq, 10)) for _ in range(UNPROVEN_PAUSE + 1)] == [0] * UNPROVEN_PAUSE + [1]
    speculator.record(seq, 1, 0)
    # each failed single-draft retry pauses four times longer, up to MAX_BACKOFF
    assert _windows_until_paused(speculator, seq, 200) == [16, 16 + 65, 16 + 2 * 65]
    # one that is right grows at once: a first window accepted whole doubles to k
    right = make_seq([1, 2, 3])
    speculator.attach(right, list(range(100, 200)))
    speculator.record(right, len(speculator.propose(right, 10)), FIRST_WINDOW)
    assert len(speculator.propose(right, 10)) == 8


def test_drafts_that_stop_paying_back_off_and_retry():
    speculator = Speculator(SpeculativeConfig("ngram", 4, 1, 2))
    seq = make_seq([1, 2, 1, 2, 1, 2])
    speculator.attach(seq, None)
    _proven(speculator, seq)
    windows = len(_windows_until_paused(speculator, seq, 200))
    assert 5 < windows < 15  # pauses of 1, 2, 4, ... 64 steps
    assert seq.speculation.backoff == MAX_BACKOFF
    while not speculator.propose(seq, 10):
        pass
    speculator.record(seq, 4, 3)
    assert seq.speculation.backoff == 1 and speculator.propose(seq, 10)
    assert speculator.stats.accepted_per_position[:4] == [2, 1, 1, 0]
    assert speculator.propose(seq, 1) == [1]  # capped by the limit


def test_a_window_wrong_at_once_is_followed_by_one_draft_and_grows_back():
    speculator = Speculator(None)  # a prediction's window: 8 drafts
    seq = make_seq([1, 2, 3])
    speculator.attach(seq, list(range(100, 200)))
    speculator.record(seq, len(speculator.propose(seq, 10)), FIRST_WINDOW)  # accepted whole: 8 next
    assert len(speculator.propose(seq, 10)) == 8
    speculator.record(seq, 8, 0)  # rejected at its first draft
    sizes = []
    for accepted_whole in (True, True, True, True):
        draft = speculator.propose(seq, 10)
        sizes.append(len(draft))
        speculator.record(seq, len(draft), len(draft) if accepted_whole else 0)
    assert sizes == [1, 2, 4, 8]  # doubled after each window accepted whole, up to k
    speculator.record(seq, 8, 3)  # a partial window keeps the size
    assert len(speculator.propose(seq, 10)) == 8


def test_a_rejected_single_draft_pauses_speculation_at_once():
    speculator = Speculator(None)
    seq = make_seq([1, 2, 3])
    speculator.attach(seq, list(range(100, 200)))
    _proven(speculator, seq)
    speculator.record(seq, len(speculator.propose(seq, 10)), 0)  # a window wrong at once
    assert speculator.propose(seq, 10) == [100]  # a single draft
    speculator.record(seq, 1, 0)  # wrong too: plain decoding for a step, then one draft again
    assert speculator.propose(seq, 10) == [] and speculator.propose(seq, 10) == [100]


def test_rejected_drafts_give_their_blocks_back():
    manager = BlockManager(8, 4)
    seq = make_seq([1, 2, 3, 4, 5])  # 2 blocks
    manager.allocate(seq, manager.lookup(seq))
    assert manager.free_slots(seq) == 8 * 4 - 5
    manager.append(seq, 7)  # the newest token and 7 drafts: positions up to 11
    assert len(seq.block_table) == 3 and manager.num_free == 5
    seq.token_ids += [6, 7]  # two tokens kept
    manager.trim(seq)
    assert len(seq.block_table) == 2 and manager.num_free == 6


@pytest.mark.parametrize("params", [
    dict(temperature=0.8),
    dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, top_p=0.7),
], ids=["temperature", "top-k", "top-p"])
def test_rejection_sampling_keeps_the_target_distribution(params):
    """Windows of two drafts over fixed synthetic logits: the first token is distributed as the
    target's first row, and, where the first draft was accepted, the second as its second row.
    Pearson's chi-square against the exact probabilities, each at a false-alarm rate of 1e-4
    (the test is seeded, so it gives the same answer every run)."""
    torch.manual_seed(0)
    vocab, windows = 12, 6000
    sampler = Sampler(vocab, torch.device("cpu"), eos_token_ids=())
    seq = make_seq([1], SamplingParams(**params), sampler)
    rows = torch.randn(3, vocab) * 1.5
    drafts = [int(rows[0].argsort()[-2]), int(rows[1].argmax())]  # a likely first draft, the best second
    logits = rows.repeat(windows, 1)
    tokens = sampler.sample(logits.clone(), [seq] * (3 * windows), None, (drafts + [-1]) * windows).token_ids.tolist()
    kept = [_verified(drafts, tokens, 3 * w, {}) for w in range(windows)]
    exact = [_target(sampler, rows[i], seq) for i in range(2)]
    first = torch.bincount(torch.tensor([window[0][0] for window in kept]), minlength=vocab)
    second = torch.bincount(torch.tensor([window[1][0] for window in kept if window[0][0] == drafts[0]]),
                            minlength=vocab)
    for counts, probs in ((first, exact[0]), (second, exact[1])):
        assert _chi_square_p_value(counts, probs) > 1e-4
    assert 0 < first[drafts[0]] < windows  # drafts were accepted and rejected


def _target(sampler: Sampler, row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """The target's probabilities for one row: what plain sampling draws from."""
    logits = row[None].clone()
    params = seq.params
    logits /= params.temperature
    if params.top_p < 1:
        apply_top_k_top_p(logits, None, torch.tensor([[params.top_p]]))
    elif params.top_k:
        apply_top_k(logits, torch.tensor([[params.top_k]]), params.top_k)
    return logits.softmax(-1)[0]


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(X >= observed) for Pearson's statistic over the tokens the target can draw."""
    possible = probs > 0
    assert counts[~possible].sum() == 0, "a token the target never draws was drawn"
    expected = probs[possible].double() * counts.sum()
    statistic = ((counts[possible].double() - expected) ** 2 / expected).sum()
    df = int(possible.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), statistic / 2))


def test_seeded_windows_are_reproducible():
    sampler = Sampler(16, torch.device("cpu"), eos_token_ids=())
    logits = torch.randn(4, 16)
    results = []
    for _ in range(2):
        seq = make_seq([1], SamplingParams(temperature=1.0, seed=3), sampler)
        results.append(sampler.sample(logits.clone(), [seq] * 4, None, [2, 5, 7, -1]).token_ids.tolist())
    assert results[0] == results[1]


def test_the_cutoff_is_the_largest_batch_whose_verification_costs_at_most_twice_a_decode(monkeypatch):
    """A device whose steps cost max(1, tokens / 8): bound by weights up to 8 tokens, then by compute."""
    from server.engine import spec_cutoff

    monkeypatch.setattr(spec_cutoff, "_step_seconds", lambda model, cache, bs, b, q: max(1.0, b * q / 8))
    assert spec_cutoff.measure_cutoff(None, None, 16, 3, 64)[0] == 4  # 4 x 4 tokens: 2 units vs 1
    assert spec_cutoff.measure_cutoff(None, None, 16, 3, 2)[0] == 2  # never above max_num_seqs
    assert spec_cutoff.measure_cutoff(None, None, 16, 31, 64)[0] == 0  # 32 tokens cost 4 decodes


def test_ngram_drafts_stop_above_the_batch_cutoff_but_predictions_do_not():
    manager = BlockManager(64, 4)
    speculator = Speculator(SpeculativeConfig("ngram", 3, 1, 2, disable_by_batch_size=1))
    scheduler = Scheduler(manager, 8, 256, speculator)
    seqs = [make_seq([1, 2, 3, 1, 2]) for _ in range(2)]
    speculator.attach(seqs[0], None)
    speculator.attach(seqs[1], [9, 8, 7, 6])
    for seq in seqs:  # running, past their prompts: each decodes its last token next
        manager.allocate(seq, [])
        seq.num_cached, seq.status = seq.num_tokens - 1, SequenceStatus.RUNNING
        scheduler.running.append(seq)
    batch = scheduler.schedule()
    assert batch.seqs == seqs and batch.drafts == [[], [9, 8, 7]] and batch.num_decodes == 1
    assert batch.num_new_tokens == [1, 4] and len(seqs[1].block_table) == 2  # slots for 5 + 3 tokens
    scheduler.remove(seqs[1])
    batch = scheduler.schedule()  # alone: n-gram drafts again
    assert batch.drafts == [[3, 1, 2]] and batch.num_decodes == 0 and batch.samples(0)
