"""Token logprobs in OpenAI's two shapes: chat/responses entries `{token, logprob, bytes,
top_logprobs}` and the legacy completions columns `{tokens, token_logprobs, top_logprobs,
text_offset}`.

A token's text is its decoded text and its `bytes` the exact bytes it stands for, which for a
byte-level BPE token can be part of one UTF-8 character (its text then holds U+FFFD).
"""

from model.tokenizer import Tokenizer
from server.engine.request import TokenLogprob


class LogprobFormatter:
    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer

    def _token_bytes(self, logprobs: list[TokenLogprob], *more: int) -> dict[int, bytes]:
        """The bytes of every sampled and alternative token in `logprobs`, and of the ids `more`."""
        unique = list(dict.fromkeys([*more, *(tid for lp in logprobs for tid in (lp.token_id, *(t for t, _ in lp.top)))]))
        return dict(zip(unique, self._tokenizer.token_bytes(unique)))

    def chat(self, logprobs: list[TokenLogprob]) -> list[dict]:
        """Entries of a chat `logprobs.content` list (and of a Responses output_text `logprobs`)."""
        as_bytes = self._token_bytes(logprobs)

        def entry(token_id: int, logprob: float) -> dict:
            raw = as_bytes[token_id]
            return {"token": raw.decode(errors="replace"), "logprob": logprob, "bytes": list(raw)}

        return [
            entry(lp.token_id, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in logprobs
        ]

    def completion(self, logprobs: list[TokenLogprob], text_offset: int, unscored_first: int | None = None) -> dict:
        """The legacy columns for these tokens, whose text starts at character `text_offset` of the
        choice; `unscored_first`, a prompt's first token, goes first with null logprobs (nothing
        comes before it to predict it), as OpenAI lists an echoed prompt."""
        first = [] if unscored_first is None else [unscored_first]
        as_bytes = self._token_bytes(logprobs, *first)
        tokens, offsets = [], []
        for token_id in first + [lp.token_id for lp in logprobs]:
            tokens.append(as_bytes[token_id].decode(errors="replace"))
            offsets.append(text_offset)
            text_offset += len(tokens[-1])
        top = [{as_bytes[t].decode(errors="replace"): v for t, v in lp.top} for lp in logprobs]
        return {
            "tokens": tokens,
            "token_logprobs": [None] * len(first) + [lp.logprob for lp in logprobs],
            "top_logprobs": [None] * len(first) + top,
            "text_offset": offsets,
        }
