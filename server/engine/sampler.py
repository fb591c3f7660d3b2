"""Next tokens for a batch of logits rows, each row with its own sampling parameters, on the device.

Order, as vLLM does it: logprobs from the raw logits; then logit_bias, min_tokens (EOS and stop
token ids masked) and the penalties; greedy rows take the argmax of that; other rows divide by
their temperature and filter by min-p, top-k and top-p, then draw with the exponential race
(`argmax(probs / q)`, q ~ Exp(1)), which equals a multinomial draw. A seeded row draws its q from
its own generator, so its tokens do not depend on the rest of the batch.

Work is only done for what some row asks for: a batch whose rows are all greedy and ask for
nothing else (no logprobs, logit_bias, penalties or min_tokens) is one max over the logits and
nothing more, and the vocabulary is sorted only when a row uses top-p. Per-row parameters are turned into
tensors once per batch composition, not every step.

Speculative decoding: a row may check a draft token (`draft_ids`). A greedy row's token is its
argmax, which equals the draft exactly when the draft is accepted. A sampled row accepts its draft
d with probability min(1, p(d) / q(d)) = p(d), the proposal q being deterministic (one-hot at d),
and otherwise draws from the normalised residual max(0, p - q): p without d. Its token is then
the draft exactly when accepted, and the window's tokens are distributed as the target's
(Leviathan et al., 2023). The caller keeps a window's tokens up to the first that differs from
its draft. A seeded row draws its uniform from its own generator too.
"""

from dataclasses import dataclass

import torch

from nanoserve_kernels import apply_token_bitmask_
from model.batch import to_device
from server.engine.request import SamplingParams
from server.engine.sequence import Sequence, SequenceSampling

GREEDY_BELOW = 1e-5  # temperatures under this are greedy
GOLDEN = 0x9E3779B97F4A7C15  # spreads choice indices over the seed space


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice `index` of a request seeded with `seed` (choice 0 uses `seed` itself)."""
    return (seed + index * GOLDEN) % 2**64


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprob_rows: list[int]  # rows that asked for logprobs
    token_logprobs: torch.Tensor | None = None  # [R]: each such row's sampled token
    top_ids: torch.Tensor | None = None  # [R, K]: K = the largest `logprobs` asked for
    top_logprobs: torch.Tensor | None = None  # [R, K]


@dataclass
class _BatchParams:
    seqs: list[Sequence]  # the batch these are for, the same objects in the same order
    all_greedy: bool
    argmax_only: bool  # every row greedy, and none biased, penalised, held by min_tokens or asking for logprobs
    greedy: torch.Tensor | None  # [B] bool, when greedy rows share the batch with sampled ones
    temperature: torch.Tensor | None  # [B, 1], 1 on greedy rows
    min_p: torch.Tensor | None  # [B, 1]
    top_k: torch.Tensor | None  # [B, 1] int64, the vocabulary size where off
    max_top_k: int
    top_p: torch.Tensor | None  # [B, 1], inf where off
    seeded: list[tuple[int, torch.Generator]]
    biased: list[tuple[int, Sequence]]
    min_tokens: list[tuple[int, Sequence]]
    penalized: list[tuple[int, Sequence]]
    logprob_rows: list[int]
    logprob_index: torch.Tensor | None  # [R] rows, None when every row asks
    max_logprobs: int


def _is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_BELOW


def _uses_top_k(params: SamplingParams, vocab_size: int) -> bool:
    return 0 < params.top_k < vocab_size and not _is_greedy(params)


def _uses_penalties(params: SamplingParams) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0)


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, eos_token_ids: tuple[int, ...],
                 num_token_ids: int | None = None):
        """Rows of logits are `vocab_size` wide; ids from `num_token_ids` on (default: none) have no token."""
        self.vocab_size = vocab_size
        self.num_token_ids = vocab_size if num_token_ids is None else num_token_ids
        self.device = device
        self.eos_token_ids = eos_token_ids
        self._params: _BatchParams | None = None
        self._one = torch.ones(1, device=device)

    def new_state(self, params: SamplingParams, prompt_token_ids: list[int], choice_index: int) -> SequenceSampling:
        def ids(values) -> torch.Tensor:
            return to_device(list(values), torch.int64, self.device)

        generator = None
        if params.seed is not None and not _is_greedy(params):
            generator = torch.Generator(self.device).manual_seed(choice_seed(params.seed, choice_index))
        min_tokens_ids = None
        if params.min_tokens:
            min_tokens_ids = ids({*(() if params.ignore_eos else self.eos_token_ids), *params.stop_token_ids})
        output_counts = seen = None
        if params.presence_penalty or params.frequency_penalty:
            output_counts = torch.zeros(self.vocab_size, device=self.device)
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            seen[ids(prompt_token_ids)] = True
        return SequenceSampling(
            generator=generator,
            bias_ids=ids(params.logit_bias) if params.logit_bias else None,
            bias_values=to_device(list(params.logit_bias.values()), torch.float32, self.device)
            if params.logit_bias
            else None,
            min_tokens_ids=min_tokens_ids,
            output_counts=output_counts,
            seen=seen,
        )

    def sample(
        self, logits: torch.Tensor, seqs: list[Sequence], token_bitmask: tuple[torch.Tensor, torch.Tensor] | None = None,
        draft_ids: list[int] | None = None,
    ) -> SamplerOutput:
        """Tokens for `logits` [B, V] (fp32, changed in place), row i sampled as `seqs[i]` asks;
        `token_bitmask` (mask rows, their logits rows) forbids what the rows' grammars do not allow;
        `draft_ids[i]` is the draft token row i verifies (-1: none)."""
        self.prepare(seqs)
        if self._params.argmax_only and token_bitmask is None:  # the common case: one op, no loops
            # ids without a token are never sampled: the argmax runs over the ids that have one
            return SamplerOutput(logits[:, : self.num_token_ids].max(-1).indices, [])
        return self._sample(logits, self._params, token_bitmask, draft_ids)

    @torch.inference_mode()
    def _sample(
        self, logits: torch.Tensor, p: _BatchParams, token_bitmask: tuple[torch.Tensor, torch.Tensor] | None,
        draft_ids: list[int] | None = None,
    ) -> SamplerOutput:
        if self.num_token_ids < self.vocab_size:  # ids without a token are never sampled nor listed
            logits[:, self.num_token_ids :] = float("-inf")
        logprobs = None
        if p.logprob_rows:  # from the logits as the model gave them
            rows = logits if p.logprob_index is None else logits[p.logprob_index]
            logprobs = rows.log_softmax(-1)
        self._process(logits, p)
        if token_bitmask is not None:  # structured outputs: after bias and penalties, before any choice
            apply_token_bitmask_(logits, *token_bitmask)
        if p.all_greedy:
            token_ids = logits.max(-1).indices  # max(dim) is several times faster than argmax on CPU
        else:
            greedy_ids = logits.max(-1).indices if p.greedy is not None else None
            token_ids = self._sample_random(logits, p, draft_ids)
            if greedy_ids is not None:
                token_ids = torch.where(p.greedy, greedy_ids, token_ids)
        self._count(token_ids, p)
        out = SamplerOutput(token_ids, p.logprob_rows)
        if logprobs is not None:
            sampled = token_ids if p.logprob_index is None else token_ids[p.logprob_index]
            out.token_logprobs = logprobs.gather(-1, sampled[:, None]).squeeze(-1)
            out.top_logprobs, out.top_ids = logprobs.topk(p.max_logprobs, -1)
        return out

    def _process(self, logits: torch.Tensor, p: _BatchParams) -> None:
        """logit_bias, min_tokens and penalties: they change greedy choices too."""
        for row, seq in p.biased:
            logits[row].index_add_(0, seq.sampling.bias_ids, seq.sampling.bias_values)
        for row, seq in p.min_tokens:
            if seq.num_generated < seq.params.min_tokens:
                logits[row].index_fill_(0, seq.sampling.min_tokens_ids, float("-inf"))
        for row, seq in p.penalized:
            self._penalize(logits[row], seq)

    def _penalize(self, row: torch.Tensor, seq: Sequence) -> None:
        state, params = seq.sampling, seq.params
        if state.seen is not None:
            apply_repetition_penalty(row, state.seen, params.repetition_penalty)
        if state.output_counts is not None:
            apply_presence_frequency_penalties(
                row, state.output_counts, params.presence_penalty, params.frequency_penalty
            )

    def _sample_random(self, logits: torch.Tensor, p: _BatchParams, draft_ids: list[int] | None = None) -> torch.Tensor:
        logits.div_(p.temperature)
        if p.min_p is not None:
            apply_min_p(logits, p.min_p)
        if p.top_p is not None:
            apply_top_k_top_p(logits, p.top_k, p.top_p)
        elif p.top_k is not None:
            apply_top_k(logits, p.top_k, p.max_top_k)
        probs = logits.softmax(-1)
        accepted = None
        if draft_ids is not None:
            drafts, accepted = self._accept_drafts(probs, p, draft_ids)
        q = torch.empty_like(probs).exponential_()
        for row, generator in p.seeded:
            q[row].exponential_(generator=generator)
        token_ids = probs.div_(q).max(-1).indices
        return token_ids if accepted is None else torch.where(accepted, drafts, token_ids)

    def _accept_drafts(self, probs: torch.Tensor, p: _BatchParams, draft_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rejection sampling against one-hot proposals: which rows accept their draft (with
        probability p(draft)); `probs` becomes the residual, p without the draft, to draw from
        where a draft is rejected (the exponential race needs no normalisation)."""
        drafts = to_device(draft_ids, torch.int64, probs.device)
        has_draft = drafts >= 0
        index = drafts.clamp(min=0)[:, None]
        draft_probs = probs.gather(-1, index).squeeze(-1)
        uniforms = torch.rand(probs.shape[0], device=probs.device)
        for row, generator in p.seeded:
            if draft_ids[row] >= 0:
                uniforms[row] = torch.rand(1, generator=generator, device=probs.device)[0]
        accepted = has_draft & (uniforms < draft_probs)
        probs.scatter_(-1, index, torch.where(has_draft, 0.0, draft_probs)[:, None])
        return drafts, accepted

    def _count(self, token_ids: torch.Tensor, p: _BatchParams) -> None:
        """Record the sampled tokens on the device for the penalties of later steps."""
        for row, seq in p.penalized:
            token = token_ids[row : row + 1]
            if seq.sampling.output_counts is not None:
                seq.sampling.output_counts.index_add_(0, token, self._one)
            if seq.sampling.seen is not None:
                seq.sampling.seen.index_fill_(0, token, True)

    def prepare(self, seqs: list[Sequence]) -> None:
        """Turn the batch's per-row parameters into tensors, when the batch's sequences changed."""
        # Compared by identity (Sequence has no __eq__), in C: no per-step key to build.
        if self._params is None or self._params.seqs != seqs:
            self._params = self._build_params(list(seqs))

    def _build_params(self, seqs: list[Sequence]) -> _BatchParams:
        params = [seq.params for seq in seqs]
        greedy = [_is_greedy(sp) for sp in params]
        sampled = [sp for sp, g in zip(params, greedy) if not g]

        def column(values: list, dtype=torch.float32) -> torch.Tensor:
            return to_device(values, dtype, self.device)[:, None]

        any_top_k = any(_uses_top_k(sp, self.vocab_size) for sp in params)
        top_k = [sp.top_k if _uses_top_k(sp, self.vocab_size) else self.vocab_size for sp in params]
        logprob_rows = [row for row, sp in enumerate(params) if sp.logprobs is not None]
        biased = [(row, seq) for row, seq in enumerate(seqs) if seq.params.logit_bias]
        min_tokens = [(row, seq) for row, seq in enumerate(seqs) if seq.params.min_tokens]
        penalized = [(row, seq) for row, seq in enumerate(seqs) if _uses_penalties(seq.params)]
        return _BatchParams(
            seqs=seqs,
            all_greedy=all(greedy),
            argmax_only=all(greedy) and not (biased or min_tokens or penalized or logprob_rows),
            greedy=column(greedy, torch.bool)[:, 0] if any(greedy) and sampled else None,
            temperature=column([1.0 if g else sp.temperature for sp, g in zip(params, greedy)]) if sampled else None,
            min_p=column([sp.min_p for sp in params]) if any(sp.min_p > 0 for sp in sampled) else None,
            top_k=column(top_k, torch.int64) if any_top_k else None,
            max_top_k=max((k for k in top_k if k < self.vocab_size), default=0),
            top_p=column([sp.top_p if sp.top_p < 1 else float("inf") for sp in params])
            if any(sp.top_p < 1 for sp in sampled)
            else None,
            seeded=[(row, s.sampling.generator) for row, s in enumerate(seqs) if s.sampling.generator is not None],
            biased=biased,
            min_tokens=min_tokens,
            penalized=penalized,
            logprob_rows=logprob_rows,
            logprob_index=None
            if len(logprob_rows) == len(seqs)
            else to_device(logprob_rows, torch.int64, self.device),
            max_logprobs=max((params[row].logprobs for row in logprob_rows), default=0),
        )


# Each filter takes logits [B, V] and per-row parameters [B, 1] and masks tokens with -inf in place.


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Drop tokens less likely than `min_p` times the most likely one (0: keep all)."""
    probs = logits.softmax(-1)
    logits.masked_fill_(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    """Keep each row's `top_k` largest logits (ties with the k-th included); rows whose `top_k`
    exceeds `max_top_k` keep all. Only the `max_top_k` largest are found: no full sort."""
    kth = logits.topk(max_top_k, -1).values.gather(-1, top_k.clamp(max=max_top_k) - 1)
    kth.masked_fill_(top_k > max_top_k, float("-inf"))
    logits.masked_fill_(logits < kth, float("-inf"))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor) -> None:
    """Top-k (when given; the vocabulary size where off), then the smallest set of most likely
    tokens whose probability reaches `top_p` (inf where off), renormalised over the top-k."""
    sorted_logits, order = logits.sort(-1, descending=True)
    if top_k is not None:
        positions = torch.arange(logits.shape[-1], device=logits.device)
        sorted_logits.masked_fill_(positions >= top_k, float("-inf"))
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1).sub_(probs)
    sorted_logits.masked_fill_(mass_before >= top_p, float("-inf"))  # the set already reached top_p
    logits.scatter_(-1, order, sorted_logits)


def apply_repetition_penalty(row: torch.Tensor, seen: torch.Tensor, penalty: float) -> None:
    """HF semantics on one row: every token of prompt or output has its logit divided by `penalty`
    when positive and multiplied by it when negative."""
    row.copy_(torch.where(seen, torch.where(row > 0, row / penalty, row * penalty), row))


def apply_presence_frequency_penalties(
    row: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float
) -> None:
    """OpenAI semantics on one row: minus `frequency` per occurrence of a token in the output so
    far, and minus `presence` once if it occurs at all."""
    row.add_(counts, alpha=-frequency)
    row.add_(counts.clamp(max=1.0), alpha=-presence)
