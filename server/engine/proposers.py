"""Draft tokens for speculative decoding: guesses of what a sequence generates next, checked by
the target model in one step (`speculative.py`), so a wrong guess costs compute, never tokens.

- `NgramProposer` (prompt lookup): the longest suffix of the sequence's tokens (prompt and output)
  that occurred earlier in them, and the tokens that followed it there. It pays where the output
  copies its input: code edits, quoting, summaries, repetition.
- `PredictionProposer` (OpenAI's Predicted Outputs): the request's own prediction of its reply.
  It walks the prediction along the output; after a mismatch it looks the output's last tokens up
  in the prediction and continues from there, so an edit in the middle of a file costs only the
  edited lines.
"""

import numpy as np

# Re-aligning a prediction after a mismatch: the output's last REALIGN_MAX .. 1 tokens are looked
# up in it, longest first.
REALIGN_MAX = 8


def _last_match(haystack: np.ndarray, needle: np.ndarray, end: int) -> int | None:
    """The start of the last occurrence of `needle` in `haystack[:end]`, or None."""
    n = len(needle)
    if end < n:
        return None
    windows = np.lib.stride_tricks.sliding_window_view(haystack[:end], n)
    hits = np.flatnonzero((windows == needle).all(axis=1))
    return int(hits[-1]) if len(hits) else None


def _first_match(haystack: np.ndarray, needle: np.ndarray, start: int) -> int | None:
    """The start of the first occurrence of `needle` in `haystack[start:]`, or None."""
    n = len(needle)
    if len(haystack) - start < n:
        return None
    windows = np.lib.stride_tricks.sliding_window_view(haystack[start:], n)
    hits = np.flatnonzero((windows == needle).all(axis=1))
    return start + int(hits[0]) if len(hits) else None


class NgramProposer:
    """Prompt lookup over the sequence's own tokens."""

    def __init__(self, num_tokens: int, min_n: int, max_n: int):
        self.num_tokens = num_tokens
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, token_ids: list[int]) -> list[int]:
        """Up to `num_tokens` tokens that followed the most recent earlier occurrence of the longest
        suffix (of `max_n` .. `min_n` tokens) of `token_ids`; none when no suffix recurs."""
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            # an occurrence that ends before the suffix itself, so a token follows it
            start = _last_match(tokens, tokens[-n:], len(tokens) - 1)
            if start is not None:
                follow = start + n
                return tokens[follow : follow + self.num_tokens].tolist()
        return []


class PredictionProposer:
    """A request's predicted reply, walked along its output."""

    def __init__(self, prediction: list[int], num_tokens: int):
        self.prediction = np.asarray(prediction, dtype=np.int64)
        self.num_tokens = num_tokens
        self._next = 0  # where in the prediction the next output token is expected
        self._num_seen = 0  # output tokens followed so far
        self._aligned = True

    def propose(self, output_ids: list[int]) -> list[int]:
        """The prediction's tokens after the output so far (`output_ids`, the generated tokens)."""
        self._follow(output_ids)
        if not self._aligned and not self._realign(output_ids):
            return []
        return self.prediction[self._next : self._next + self.num_tokens].tolist()

    def _follow(self, output_ids: list[int]) -> None:
        for token in output_ids[self._num_seen :]:
            if self._aligned and self._next < len(self.prediction) and self.prediction[self._next] == token:
                self._next += 1
            else:
                self._aligned = False
        self._num_seen = len(output_ids)

    def _realign(self, output_ids: list[int]) -> bool:
        """Continue after the longest suffix of the output found in the prediction: first at or
        after the point reached so far (an edit moves forward through a file), else anywhere."""
        tail = np.asarray(output_ids[-REALIGN_MAX:], dtype=np.int64)
        for n in range(len(tail), 0, -1):
            needle = tail[-n:]
            start = _first_match(self.prediction, needle, self._next)
            if start is None:
                start = _first_match(self.prediction, needle, 0)
            if start is not None:
                self._next, self._aligned = start + n, True
                return True
        return False
