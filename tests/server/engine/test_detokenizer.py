"""Streamed text: whole characters only, deltas that add up to a full decode, stop strings found."""

import random

import pytest

from model.tokenizer import Tokenizer
from server.engine.detokenizer import REPLACEMENT, IncrementalDetokenizer, StopStrings


@pytest.fixture(scope="module")
def tokenizer(demo_dir) -> Tokenizer:
    return Tokenizer(demo_dir)


def stream(tokenizer: Tokenizer, token_ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    deltas = [detokenizer.add(t) for t in token_ids]
    return deltas + [detokenizer.flush()]


def test_multibyte_characters_split_across_tokens_stream_whole(tokenizer):
    text = "你好，世界！🎉😀👍🏽 naïve café — 日本語のテキスト 🇫🇷"
    token_ids = tokenizer.encode(text)
    # The test only means something if some tokens end inside a character.
    assert any(REPLACEMENT in tokenizer.decode([t]) for t in token_ids)
    deltas = stream(tokenizer, token_ids)
    assert "".join(deltas) == text
    assert not any(REPLACEMENT in delta for delta in deltas)
    assert sum(1 for delta in deltas if delta) > 5  # streamed, not all at the end


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_streams_add_up_to_a_full_decode(tokenizer, skip_special_tokens):
    rng = random.Random(1234)
    emoji_ids = tokenizer.encode("🎉😀日本語")
    specials = [151643, 151645, 151667, 151668, 151700]  # eos, im_end, <think>, </think>, beyond the vocabulary
    for _ in range(30):
        pool = [rng.randrange(151643) for _ in range(20)] + emoji_ids + specials
        token_ids = [rng.choice(pool) for _ in range(rng.randrange(1, 40))]
        deltas = stream(tokenizer, token_ids, skip_special_tokens)
        assert "".join(deltas) == tokenizer.decode(token_ids, skip_special_tokens)


def test_stop_strings_find_the_earliest_and_hold_back_possible_starts():
    stops = StopStrings(["STOP", "end", "xyz"])
    assert stops.find("abc endSTOP") == (4, "end")
    assert stops.find("abc STOPend") == (4, "STOP")
    assert stops.find("abc") is None
    assert stops.holdback("hello ST") == 2  # "ST" may become "STOP"
    assert stops.holdback("hello STO") == 3
    assert stops.holdback("hello en") == 2
    assert stops.holdback("hello x") == 1
    assert stops.holdback("hello") == 0
    assert StopStrings(["aab"]).holdback("xaa") == 2
    assert StopStrings(["aab"]).holdback("a") == 1
    assert not StopStrings([]) and not StopStrings([""])
