"""The checkpoint's own tokenizer and chat template, through `transformers.AutoTokenizer`.

Two ways to encode: `encode` reads text as the tokenizer does, special-token text (`<|im_end|>`)
included, for raw prompts; `encode_chat` renders messages with the chat template and lets only
the template place special tokens, so that text inside a message cannot forge a turn.
"""

import copy
import json
import re
import sys
import unicodedata
import uuid
from functools import cache, cached_property
from pathlib import Path

import tokenizers
from transformers import AutoTokenizer

# NFC can compose up to this many code points into one (U+1F82 is four): the most by which it
# shortens a text, hence the factor between a text's length and its length once normalised.
NFC_MAX_COMPOSED = max(len(unicodedata.normalize("NFD", chr(c))) for c in range(sys.maxunicode + 1))


@cache
def byte_alphabet() -> dict[int, str]:
    """Byte-level BPE's printable spelling of each byte (as GPT-2 defined it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@cache
def _byte_of_char() -> dict[str, int]:
    return {char: byte for byte, char in byte_alphabet().items()}


class TokenizerError(ValueError):
    """A checkpoint's tokenizer files are unreadable (truncated, corrupt)."""


class PromptTooLong(ValueError):
    """A text that certainly has more tokens than allowed, known from its length alone."""

    def __init__(self, num_chars: int, min_tokens: int, limit: int):
        super().__init__(f"its {num_chars} characters are at least {min_tokens} tokens, more than {limit}")
        self.min_tokens = min_tokens


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "vocab.json").is_file():
            raise FileNotFoundError(f"no tokenizer files (tokenizer.json or vocab.json) in {model_dir}")
        try:
            self._hf = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as err:  # transformers and tokenizers raise many kinds; each means the same here
            raise TokenizerError(f"the tokenizer files in {model_dir} cannot be read ({type(err).__name__}: {err})") \
                from None
        # Encoding and decoding go straight to the Rust tokenizer: transformers' encode re-applies
        # padding and truncation settings to it on every call (which fails while another thread
        # decodes), and its decode holds the GIL for a second on a megabyte of tokens.
        self._rust: tokenizers.Tokenizer = self._hf.backend_tokenizer
        self.eos_token_ids: tuple[int, ...] = _eos_token_ids(model_dir, self._hf.eos_token_id)
        special = [t.content for t in self._rust.get_added_tokens_decoder().values() if t.special]
        self._special_ids = {content: self._rust.token_to_id(content) for content in special}
        # Longest first, so that a special token that begins with another one is found whole.
        self._special_pattern = re.compile("|".join(map(re.escape, sorted(special, key=len, reverse=True))))
        self._max_chars_per_token = _max_chars_per_token(self._rust)

    def __len__(self) -> int:
        return len(self._hf)

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """`text` as the tokenizer reads it, special-token text included; PromptTooLong when it is
        certainly more than `limit` tokens (checked before any work)."""
        self._check_length(text, limit)
        return _encode(self._rust, text)

    def min_tokens(self, num_chars: int) -> int:
        """The fewest tokens that any text of `num_chars` characters can be (0 where unknown)."""
        return 0 if self._max_chars_per_token is None else -(-num_chars // self._max_chars_per_token)

    def _check_length(self, text: str, limit: int | None) -> None:
        if limit is not None and (at_least := self.min_tokens(len(text))) > limit:
            raise PromptTooLong(len(text), at_least, limit)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    enable_thinking: bool | None = None, limit: int | None = None,
                    tools: list[dict] | None = None) -> list[int]:
        """The chat template's rendering of `messages` (and the function `tools`) as token ids, with
        special tokens only where the template put them: special-token text inside any message
        field or tool description is plain text.

        Special-token text in the messages is swapped for markers before rendering; the rendering
        is split at the special tokens that remain (the template's), and each piece in between is
        encoded on its own, which is also how the tokenizer itself treats text between special
        tokens, so messages without such text get exactly the ids of `encode(rendering)`.
        """
        markers = _Markers(self._special_pattern)
        rendered = self.apply_chat_template(markers.hide(messages), add_generation_prompt, enable_thinking,
                                            tools=markers.hide(tools))
        self._check_length(rendered, limit)
        ids: list[int] = []
        start = 0
        for special in self._special_pattern.finditer(rendered):
            ids += self._encode_piece(rendered[start : special.start()], markers)
            ids.append(self._special_ids[special.group()])
            start = special.end()
        return ids + self._encode_piece(rendered[start:], markers)

    def _encode_piece(self, piece: str, markers: "_Markers") -> list[int]:
        if not piece:
            return []
        if not markers.found_in(piece):
            return _encode(self._rust, piece)
        return _encode(self._plain_text_tokenizer, markers.reveal(piece))

    @cached_property
    def _plain_text_tokenizer(self) -> tokenizers.Tokenizer:
        """A copy that reads special-token text as plain text; built on first need (about a second)."""
        plain = tokenizers.Tokenizer.from_str(self._rust.to_str())
        plain.encode_special_tokens = True
        return plain

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._hf.clean_up_tokenization_spaces:  # transformers' extra pass over the text
            return self._hf.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return self._rust.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_ids: list[int]) -> list[bytes]:
        """The exact bytes each token stands for: possibly part of a UTF-8 character for a byte-level
        BPE token; an added token (e.g. `<|im_end|>`) its own text; b"" for an id with no token."""
        byte_of = _byte_of_char()
        out = []
        for spelling in self._hf.convert_ids_to_tokens(token_ids):
            if spelling is None:  # embedding rows past the vocabulary
                out.append(b"")
            elif all(char in byte_of for char in spelling):
                out.append(bytes(byte_of[char] for char in spelling))
            else:
                out.append(spelling.encode())
        return out

    def backend_json(self) -> str:
        """The tokenizer as the `tokenizers` library serialises it (vocabulary, merges, added
        tokens): what a grammar engine builds its token tables from."""
        backend = copy.copy(self._hf.backend_tokenizer)
        backend.no_padding()  # the copy's settings only: the serialised form must not pad or cut
        backend.no_truncation()
        return backend.to_str()

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        enable_thinking: bool | None = None,
        tools: list[dict] | None = None,
    ) -> str:
        """Render `messages` ([{role, content, tool_calls?}, ...]) and the function `tools`
        ([{"type": "function", "function": {...}}, ...]) with the checkpoint's chat template."""
        extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        return self._hf.apply_chat_template(
            messages, tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
        )


def _encode(rust: tokenizers.Tokenizer, text: str) -> list[int]:
    # encode_batch releases the GIL while it works, encode does not: a megabyte takes seconds.
    return rust.encode_batch([text], add_special_tokens=False)[0].ids


class _Markers:
    """Stand-ins for special-token text inside messages: unique per call, and made of private-use
    characters, which the template's string operations (strip, split) treat as the text they hide."""

    def __init__(self, special_pattern: re.Pattern):
        self._special_pattern = special_pattern
        self._nonce = uuid.uuid4().hex
        self._marker = re.compile(f"\ue000{self._nonce}(\\d+)\ue001")
        self._hidden: list[str] = []

    def hide(self, value):
        """`value` (messages: dicts, lists, strings) with every special-token text in its strings replaced."""
        if isinstance(value, str):
            return self._special_pattern.sub(self._stand_in, value)
        if isinstance(value, dict):
            return {key: self.hide(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.hide(item) for item in value]
        return value

    def _stand_in(self, match: re.Match) -> str:
        self._hidden.append(match.group())
        return f"\ue000{self._nonce}{len(self._hidden) - 1}\ue001"

    def found_in(self, text: str) -> bool:
        return bool(self._hidden) and self._marker.search(text) is not None

    def reveal(self, text: str) -> str:
        return self._marker.sub(lambda match: self._hidden[int(match.group(1))], text)


def _max_chars_per_token(rust: tokenizers.Tokenizer) -> int | None:
    """The most characters of input text one token can stand for, or None where this tokenizer's
    pipeline is not one whose steps are known never to drop characters.

    A token's spelling is at least as long as the text it covers (byte-level BPE spells one byte per
    character; added tokens are their own text); NFC can merge NFC_MAX_COMPOSED characters into one.
    """
    spec = json.loads(rust.to_str())
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        return None
    pre_tokenizer = spec.get("pre_tokenizer") or {}
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    for step in steps:
        if step.get("type") not in ("Split", "ByteLevel") or step.get("behavior") == "Removed":
            return None
    longest = max(map(len, rust.get_vocab(with_added_tokens=True)))
    return longest * (NFC_MAX_COMPOSED if normalizer == "NFC" else 1)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _eos_token_ids(model_dir: Path, tokenizer_eos: int | None) -> tuple[int, ...]:
    """EOS ids from generation_config.json, config.json and the tokenizer, in that order, deduplicated."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            ids += _as_list(json.loads(path.read_text()).get("eos_token_id"))
    ids += _as_list(tokenizer_eos)
    return tuple(dict.fromkeys(ids))
