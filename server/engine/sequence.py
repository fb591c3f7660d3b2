"""A request's choices as the engine tracks them: tokens, KV blocks, stops and streamed text.

Each of a request's `n` choices is one `Sequence`: scheduled, given KV blocks and preempted on
its own. A `RequestState` gathers what its sequences gained in a step into one `RequestOutput`.
"""

import enum
from dataclasses import dataclass

import torch

from server.engine.detokenizer import IncrementalDetokenizer, StopStrings
from server.engine.request import ChoiceDelta, GenerationRequest, RequestOutput, TokenLogprob
from server.engine.structured import GrammarMatcher


@dataclass
class SequenceSampling:
    """A sequence's own sampling state, built once: what varies per step lives on the device."""

    generator: torch.Generator | None
    bias_ids: torch.Tensor | None
    bias_values: torch.Tensor | None
    min_tokens_ids: torch.Tensor | None  # EOS and stop token ids, masked until min_tokens are out
    output_counts: torch.Tensor | None  # [V] float: how often each token was generated
    seen: torch.Tensor | None  # [V] bool: tokens in the prompt or generated


# The token id an unresolved token holds in `Sequence.token_ids` (no token has it).
UNRESOLVED = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        seq_id: int,
        request: GenerationRequest,
        index: int,
        max_tokens: int,
        eos_token_ids: tuple[int, ...],
        detokenizer: IncrementalDetokenizer,
    ):
        self.seq_id = seq_id
        self.request_id = request.request_id
        self.index = index
        self.params = request.params
        self.token_ids = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.max_tokens = max_tokens
        self.status = SequenceStatus.WAITING
        self.num_cached = 0  # leading tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # content hashes of leading full blocks (the block manager's)
        # Prompt tokens found in the prefix cache when first admitted (None until then).
        self.num_cached_prompt_tokens: int | None = None
        # Requests that must compute every prompt token (for prompt logprobs) skip the cache
        # lookup; the blocks they compute are still cached for others.
        self.skip_reading_prefix_cache = not self.params.uses_prefix_cache
        # Choice 0 of the same request, for choices 1.. of n > 1: they wait until it has cached
        # the prompt's full blocks, then share them.
        self.prompt_leader: Sequence | None = None
        self.sampling: SequenceSampling | None = None  # the sampler's state: generator, penalty counts
        self.grammar: GrammarMatcher | None = None  # structured output: where the reply is in its grammar
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        # Choice 0 of a request that asks scores its prompt: the model runner fills this with one
        # entry per prompt token after the first, as prefill chunks compute them.
        self.wants_prompt_logprobs = self.params.prompt_logprobs is not None and index == 0
        self.prompt_logprobs: list[TokenLogprob] = []
        # With async scheduling, the row of the launched step that samples this sequence's last
        # token, while that token is still on the device (its place in `token_ids` holds
        # UNRESOLVED until `resolve_token` fills it); None when every token is known.
        self.unresolved_row: int | None = None
        self.speculation = None  # speculative.SpeculationState: proposers and acceptance, when it speculates
        self._stop_ids = frozenset(() if self.params.ignore_eos else eos_token_ids)
        self._detokenizer = detokenizer
        self._stop_strings = StopStrings(self.params.stop)
        self._unsent = ""  # text not streamed yet: what may still become a stop string

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: TokenLogprob | None) -> ChoiceDelta:
        """Add a sampled token, apply the stop conditions, and return what the client sees of it."""
        self.token_ids.append(token_id)
        return self._accept(token_id, logprob)

    def append_tokens(self, tokens: list[tuple[int, TokenLogprob | None]]) -> ChoiceDelta:
        """`append_token` for each of a verification step's tokens in turn, up to the first that
        ends the choice (so it ends where plain decoding would), as one delta."""
        deltas = []
        for token_id, logprob in tokens:
            deltas.append(self.append_token(token_id, logprob))
            if self.is_finished:
                break
        last = deltas[-1]
        return ChoiceDelta(
            index=self.index,
            text="".join(delta.text for delta in deltas),
            token_ids=[token for delta in deltas for token in delta.token_ids],
            logprobs=None if last.logprobs is None else [entry for delta in deltas for entry in delta.logprobs],
            finish_reason=last.finish_reason,
            stop_reason=last.stop_reason,
        )

    def append_unresolved(self, row: int) -> None:
        """Hold the place of the token that row `row` of the launched step samples: the next step
        is scheduled (and reads it on the device) before the host knows it."""
        self.token_ids.append(UNRESOLVED)
        self.unresolved_row = row

    def resolve_token(self, token_id: int, logprob: TokenLogprob | None) -> ChoiceDelta:
        """The token behind `append_unresolved`, now on the host: `append_token`'s work for it."""
        self.token_ids[-1] = token_id
        self.unresolved_row = None
        return self._accept(token_id, logprob)

    def _accept(self, token_id: int, logprob: TokenLogprob | None) -> ChoiceDelta:
        if self.grammar is not None:  # once per generated token: a recompute after preemption replays none
            self.grammar.accept(token_id)
        # The first `min_tokens` tokens never end the choice (the sampler keeps EOS out of them too).
        stops_active = self.num_generated > self.params.min_tokens
        if stops_active and token_id in self._stop_ids:
            self._finish("stop", None)
        elif stops_active and token_id in self.params.stop_token_ids:
            self._finish("stop", token_id)
        else:  # a stop token's own text is never shown
            self._unsent += self._detokenizer.add(token_id)
            if stops_active and self._stop_strings and (found := self._stop_strings.find(self._unsent)):
                self._unsent = self._unsent[: found[0]]
                self._finish("stop", found[1])
            elif self.num_generated >= self.max_tokens:
                self._finish("length", None)
        if self.is_finished and not isinstance(self.stop_reason, str):
            self._unsent += self._detokenizer.flush()
        return ChoiceDelta(
            index=self.index,
            text=self._take_text(),
            token_ids=[token_id],
            logprobs=None if logprob is None else [logprob],
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )

    def finish_unsampled(self) -> ChoiceDelta:
        """End a choice with max_tokens 0 once its prompt is computed: scored, nothing generated."""
        self._finish("length", None)
        return ChoiceDelta(index=self.index, text="", token_ids=[], logprobs=None, finish_reason="length")

    def abort(self) -> ChoiceDelta:
        self._finish("abort", None)
        return ChoiceDelta(index=self.index, text="", token_ids=[], logprobs=None, finish_reason="abort")

    def _finish(self, reason: str, stop_reason: str | int | None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason

    def _take_text(self) -> str:
        """The unsent text, less an end that may still become a stop string while running."""
        keep = self._stop_strings.holdback(self._unsent) if self._stop_strings and not self.is_finished else 0
        text = self._unsent[: len(self._unsent) - keep]
        self._unsent = self._unsent[len(text) :]
        return text


class RequestState:
    """A request in the engine: its sequences and what they gained since the last output."""

    def __init__(self, request: GenerationRequest, seqs: list[Sequence]):
        self.request = request
        self.seqs = seqs
        self._deltas: list[ChoiceDelta] = []
        self._prompt_logprobs_pending = request.params.prompt_logprobs is not None

    @property
    def has_output(self) -> bool:
        """Whether deltas wait and may go out: not before the prompt's logprobs, which come first."""
        return bool(self._deltas) and not (self._prompt_logprobs_pending and not self._prompt_scored())

    def _prompt_scored(self) -> bool:
        return len(self.seqs[0].prompt_logprobs) == self.seqs[0].num_prompt_tokens - 1

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    def add(self, delta: ChoiceDelta) -> None:
        self._deltas.append(delta)

    def take_output(self) -> RequestOutput:
        deltas, self._deltas = self._deltas, []
        prompt_logprobs = None
        if self._prompt_logprobs_pending and self._prompt_scored():
            prompt_logprobs, self._prompt_logprobs_pending = self.seqs[0].prompt_logprobs, False
        speculating = [seq for seq in self.seqs if seq.speculation is not None]
        return RequestOutput(
            request_id=self.request.request_id,
            choices=sorted(deltas, key=lambda delta: delta.index),
            prompt_tokens=len(self.request.prompt_token_ids),
            completion_tokens=sum(seq.num_generated for seq in self.seqs),
            finished=self.is_finished,
            prompt_logprobs=prompt_logprobs,
            num_cached_tokens=self.seqs[0].num_cached_prompt_tokens or 0,  # the prompt counts once
            accepted_prediction_tokens=sum(s.speculation.accepted_prediction_tokens for s in speculating),
            rejected_prediction_tokens=sum(s.speculation.rejected_prediction_tokens for s in speculating),
        )
