"""The checkpoint's own tokenizer and chat template, through `transformers.AutoTokenizer`."""

import copy
import json
from functools import cache
from pathlib import Path

from transformers import AutoTokenizer


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


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "vocab.json").is_file():
            raise FileNotFoundError(f"no tokenizer files (tokenizer.json or vocab.json) in {model_dir}")
        self._hf = AutoTokenizer.from_pretrained(str(model_dir))
        self.eos_token_ids: tuple[int, ...] = _eos_token_ids(model_dir, self._hf.eos_token_id)

    def __len__(self) -> int:
        return len(self._hf)

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

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
