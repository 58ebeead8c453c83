"""The tokenizer's fast path for plain captions gives open_clip's ids exactly."""

from __future__ import annotations

import random
import string

import open_clip
import pytest

from vlpt.models import get_tokenizer

SYNTHETIC = [
    "a small red circle at the top left, with a big blue star below it",
    "middle left: little red triangle; middle right: tiny blue square",
    "at the middle left there is a tiny red triangle against a chequered backdrop",
    "Two OBJECTS:   a Cross (right side) and a diamond (bottom-left corner)...",
]
# Not plain: these take open_clip's whole cleaning (ftfy, HTML unescaping, unicode).
ODD = [
    "fish &amp; chips",
    "caf\u00e9 au lait",
    "\u201ccurly\u201d quotes",
    "tab\tseparated\nlines\r",
    "mojibake: caf\u00c3\u00a9",
    "emoji \U0001f600 and \u00bd",
    "\x1b[31mred\x1b[0m terminal",
    "",
    "   ",
]


def random_ascii(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits + string.punctuation + "    "
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))


@pytest.fixture(scope="module")
def reference() -> open_clip.tokenizer.SimpleTokenizer:
    return open_clip.tokenizer.SimpleTokenizer(context_length=40)


def test_plain_and_odd_captions_encode_as_open_clip(reference) -> None:
    rng = random.Random(0)
    texts = SYNTHETIC + ODD + [random_ascii(rng) for _ in range(2000)]
    ours = get_tokenizer("tiny")
    for text in texts:
        assert ours._bpe_ids(text) == reference.encode(text), repr(text)
    assert ours._words, "the plain captions went through the word cache"
    # Again, now from the caches (the per-caption one and the per-word one).
    for text in texts:
        assert ours._bpe_ids(text) == reference.encode(text), repr(text)
    assert ours(texts, pad_to_context=True).equal(reference(texts))


def test_word_cache_is_bounded() -> None:
    ours = get_tokenizer("tiny")
    ours._cache_size = 2  # at most 8 words kept
    ours._bpe_ids(" ".join(f"w{i}x" for i in range(20)))
    assert len(ours._words) == 8
    assert ours._bpe_ids("w19x w0x") == ours._bpe.encode("w19x w0x")  # uncached words too
