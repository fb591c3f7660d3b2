"""Speculative decoding: which sequences bring draft tokens to a step, and what it paid.

A speculating sequence brings its last token and k draft tokens (`proposers.py`) to one step; the
model scores all 1 + k like a prompt chunk over the cached context, and the sampler keeps the
drafts up to the first that the target would not have produced, plus the target's own token
after them (greedy: argmax match; sampling: rejection sampling, `sampler.py`). So every step
yields at least the token plain decoding would, and what the user sees is what the plain decoder
gives. The K/V of rejected drafts is dropped (their slots go back, `BlockManager.trim`), and the
prefix cache registers blocks only of accepted tokens.

Never slower: each sequence tracks how many drafts its steps accept. A proposer not yet proven
right (no draft of the sequence accepted so far) starts with a window of FIRST_WINDOW drafts, not k
(on a 2-core AMD EPYC, fp32 Qwen3-0.6B, verifying 2 tokens cost 1.24 decode steps, 5 tokens 1.51,
9 tokens 1.91: a rejected window of 4 costs half of one of 8, and one accepted whole doubles to k
at once); when it is rejected at once the sequence decodes plainly at once, for UNPROVEN_PAUSE
steps, four times longer after each failed single-draft retry, so a prediction that never matches
costs about one decode step over a reply. Once a draft was accepted, a window rejected at its first
draft makes the next one a single draft, a single draft rejected too starts a pause at once, and
each window accepted whole doubles the next, up to k; one whose drafts stop paying decodes plainly
for a while (twice as long after each failed retry, up to MAX_BACKOFF steps). No n-gram drafts are
made while more sequences decode than `disable_by_batch_size` (a large batch is no longer bound by
reading the weights, so verifying drafts costs what it saves; measured at load by default,
`spec_cutoff.py`). A client's prediction is not held to that limit: it asked.

`--speculative-config '<json>'` takes vLLM's field names:
`{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}`.
A chat request's `prediction` (Predicted Outputs) speculates on every server, flag or not.
"""

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from server.engine.proposers import NgramProposer, PredictionProposer

if TYPE_CHECKING:  # the CLI reads this module's config parser before torch is imported
    from server.engine.draft_model import DraftModel
    from server.engine.sequence import Sequence

METHODS = ("ngram", "draft_model")
# A draft token the draft model has yet to propose: `propose` counts them, `complete` fills them in,
# once the scheduler has given the sequence slots for them (the draft model writes K/V there).
PENDING = -1
DEFAULT_PREDICTION_TOKENS = 8  # drafts per step from a prediction when no --speculative-config sets k
MAX_SPECULATIVE_TOKENS = 32
# Acceptance tracking: an exponential average of accepted drafts per verification step; below
# MIN_ACCEPTED the sequence decodes plainly for a while, then tries again.
ACCEPTANCE_DECAY = 0.5
MIN_ACCEPTED = 0.5
MAX_BACKOFF = 64
FIRST_WINDOW = 4  # drafts in the first window of a proposer not yet proven right (k if smaller)
UNPROVEN_PAUSE = 4  # plain steps after an unproven proposer's first rejected window (x4 after each retry)


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    # No n-gram drafts while more sequences than this decode; None: measured at load (`spec_cutoff.py`).
    disable_by_batch_size: int | None = None
    model: str | None = None  # draft_model: the draft checkpoint's directory


def parse_speculative_config(text: str) -> SpeculativeConfig:
    """`--speculative-config`'s JSON object, or ValueError saying what is wrong with it."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--speculative-config is not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError("--speculative-config must be a JSON object, e.g. "
                         '\'{"method": "ngram", "num_speculative_tokens": 4}\'')
    known = set(SpeculativeConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"--speculative-config: unknown field(s) {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(sorted(known))}")
    method = raw.get("method", "ngram")
    if method not in METHODS:
        raise ValueError(f"--speculative-config: method {method!r} is not supported; choose one of {', '.join(METHODS)} "
                         "(a chat request's `prediction` speculates without any)")
    if method == "draft_model" and not isinstance(raw.get("model"), str):
        raise ValueError('--speculative-config: the draft_model method needs "model": the draft checkpoint\'s '
                         "directory (a smaller Qwen3 with the target's tokenizer)")
    if method != "draft_model" and "model" in raw:
        raise ValueError('--speculative-config: "model" is for the draft_model method')
    for name in known - {"method", "model"}:
        value = raw.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"--speculative-config: {name} must be a positive integer, got {value!r}")
    config = SpeculativeConfig(**raw)
    if config.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
        raise ValueError(f"--speculative-config: num_speculative_tokens must be at most {MAX_SPECULATIVE_TOKENS}, "
                         f"got {config.num_speculative_tokens}")
    if config.prompt_lookup_min > config.prompt_lookup_max:
        raise ValueError(f"--speculative-config: prompt_lookup_min ({config.prompt_lookup_min}) exceeds "
                         f"prompt_lookup_max ({config.prompt_lookup_max})")
    return config


@dataclass
class SpeculationState:
    """One sequence's proposers and how well its drafts have paid."""

    prediction: PredictionProposer | None
    ngram: NgramProposer | None
    draft_model: bool  # the server's draft model proposes where the prediction does not
    accepted_average: float
    window: int  # drafts the next step may bring: k, or fewer after a window failed at once
    skip: int = 0  # steps to decode plainly before proposing again
    backoff: int = 1  # the next pause's length
    proven: bool = False  # a draft of this sequence was accepted
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    draft_from_prediction: bool = False  # where the draft in flight came from


@dataclass
class SpeculationStats:
    """Totals since start, for the metrics; `accepted_per_position[i]`: drafts accepted at place i."""

    num_drafts: int = 0  # verification steps
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)


class Speculator:
    def __init__(self, config: SpeculativeConfig | None, draft_model: "DraftModel | None" = None):
        self.config = config
        self.draft_model = draft_model
        self.stats = SpeculationStats()
        self.disable_by_batch_size = config.disable_by_batch_size if config else None

    def attach(self, seq: "Sequence", prediction: list[int] | None) -> None:
        """Give a new sequence its proposers: its request's prediction, the server's n-gram method."""
        k = self._max_window()
        predicted = PredictionProposer(prediction, k) if prediction else None
        ngram = None
        if self.config is not None and self.config.method == "ngram":
            ngram = NgramProposer(k, self.config.prompt_lookup_min, self.config.prompt_lookup_max)
        if predicted is not None or ngram is not None or self.draft_model is not None:
            seq.speculation = SpeculationState(predicted, ngram, self.draft_model is not None, accepted_average=k / 2,
                                               window=min(k, FIRST_WINDOW), backoff=UNPROVEN_PAUSE)

    def may_propose(self, seq: "Sequence") -> bool:
        """Whether the sequence could bring drafts: only ones whose next tokens do not depend on
        the tokens before them in ways a window cannot follow (grammars, penalties, min_tokens)."""
        p = seq.params
        return (
            seq.speculation is not None
            and seq.grammar is None
            and seq.unresolved_row is None
            and not (p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)
            and seq.num_generated >= p.min_tokens
        )

    def ngram_enabled_for(self, num_decodes: int) -> bool:
        """Whether the server's drafts (n-gram, draft model) pay at this batch size; a client's
        prediction is not held to it."""
        return self.disable_by_batch_size is None or num_decodes <= self.disable_by_batch_size

    def propose(self, seq: "Sequence", limit: int, ngram: bool = True) -> list[int]:
        """At most `limit` draft tokens for the sequence's next step (none while it backs off):
        from its prediction, else (if `ngram`) from n-gram lookup or as many PENDING as the draft
        model is to propose (`complete`)."""
        state = seq.speculation
        if state.skip:
            state.skip -= 1
            return []
        # the step's own token counts too: drafts never take the sequence past its max_tokens
        limit = min(limit, state.window, seq.max_tokens - seq.num_generated - 1)
        if limit <= 0:
            return []
        draft: list[int] = []
        if state.prediction is not None:
            draft = state.prediction.propose(seq.token_ids[seq.num_prompt_tokens :])
        state.draft_from_prediction = bool(draft)
        if not draft and ngram and state.ngram is not None:
            draft = state.ngram.propose(seq.token_ids)
        if not draft and ngram and state.draft_model:
            draft = [PENDING] * self.config.num_speculative_tokens
        return draft[:limit]

    def complete(self, seqs: list["Sequence"], drafts: list[list[int]]) -> None:
        """Fill in the PENDING drafts (the draft model's, all at the end of a draft) in place."""
        pending = [(seq, draft) for seq, draft in zip(seqs, drafts) if draft and draft[-1] == PENDING]
        if not pending:
            return
        proposed = self.draft_model.propose([seq for seq, _ in pending], [len(draft) for _, draft in pending])
        for (_, draft), tokens in zip(pending, proposed):
            draft[:] = tokens

    def _max_window(self) -> int:
        return self.config.num_speculative_tokens if self.config else DEFAULT_PREDICTION_TOKENS

    def record(self, seq: "Sequence", num_draft: int, num_accepted: int) -> None:
        """A verification step's outcome: `num_accepted` of `num_draft` drafts kept."""
        stats, state = self.stats, seq.speculation
        stats.num_drafts += 1
        stats.draft_tokens += num_draft
        stats.accepted_tokens += num_accepted
        if len(stats.accepted_per_position) < num_draft:
            stats.accepted_per_position += [0] * (num_draft - len(stats.accepted_per_position))
        for position in range(num_accepted):
            stats.accepted_per_position[position] += 1
        if state.draft_from_prediction:
            state.accepted_prediction_tokens += num_accepted
            state.rejected_prediction_tokens += num_draft - num_accepted
        probe_failed = num_accepted == 0 and state.window == 1  # a single draft, wrong too
        if num_accepted == 0:  # wrong at once: the next window is one draft, cheap to verify
            state.window = 1
        elif num_accepted == num_draft:
            state.window = min(2 * state.window, self._max_window())
        if not state.proven:  # one kept draft proves the proposer; none pauses it at once
            if num_accepted:
                state.proven, state.backoff = True, 1
            else:
                state.skip, state.backoff = state.backoff, min(4 * state.backoff, MAX_BACKOFF)
            return
        state.accepted_average = ACCEPTANCE_DECAY * state.accepted_average + (1 - ACCEPTANCE_DECAY) * num_accepted
        if state.accepted_average < MIN_ACCEPTED or probe_failed:  # not paying: decode plainly for a while
            state.skip, state.backoff = state.backoff, min(2 * state.backoff, MAX_BACKOFF)
            state.accepted_average = MIN_ACCEPTED  # the retry gets one step to show it pays
        elif num_accepted:
            state.backoff = 1
