"""Generated tokens to streamed text: whole characters only, and stop strings held back.

Byte-level BPE splits many characters (CJK, emoji) across tokens, so the text of one token can
end inside a UTF-8 character; decoding it alone gives U+FFFD. The detokenizer decodes a short
window of recent tokens and only releases text once it no longer ends in U+FFFD, so the deltas,
concatenated, equal decoding every token at once.
"""

from model.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._token_ids: list[int] = []
        # Tokens before `_read_offset` are released; decoding starts a little earlier, at
        # `_prefix_offset`, so that tokenizers whose text depends on the previous token decode alike.
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes ("" while it ends inside a character)."""
        self._token_ids.append(token_id)
        prefix, full = self._decode_window()
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return ""
        return self._release(prefix, full)

    def flush(self) -> str:
        """Everything not yet released, an unfinished character as U+FFFD (as a full decode shows it)."""
        prefix, full = self._decode_window()
        return self._release(prefix, full) if len(full) > len(prefix) else ""

    def _decode_window(self) -> tuple[str, str]:
        ids = self._token_ids
        decode = self._tokenizer.decode
        prefix = decode(ids[self._prefix_offset : self._read_offset], self._skip_special_tokens)
        return prefix, decode(ids[self._prefix_offset :], self._skip_special_tokens)

    def _release(self, prefix: str, full: str) -> str:
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._token_ids)
        return full[len(prefix) :]


class StopStrings:
    """Finds stop strings in streamed text, and how much of its end might still grow into one."""

    def __init__(self, stop: list[str]):
        self._stop = [s for s in stop if s]
        self._longest = max(map(len, self._stop), default=0)

    def __bool__(self) -> bool:
        return bool(self._stop)

    def find(self, text: str) -> tuple[int, str] | None:
        """The earliest stop string in `text`: (where it begins, which one)."""
        found = [(index, s) for s in self._stop if (index := text.find(s)) >= 0]
        return min(found, default=None)

    def holdback(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper prefix of a stop string."""
        for length in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self._stop):
                return length
        return 0
