"""Tokenizer: open_clip's BPE tokenizer, whose vocabulary file ships inside open_clip (offline)."""

from __future__ import annotations

from functools import lru_cache

import torch
from open_clip.tokenizer import SimpleTokenizer


class Tokenizer:
    """Callable `list[str] -> LongTensor (B, L)`, padded with 0, EOT kept on truncation.

    L is the longest caption of the batch (at most `context_length`), not the context length:
    the text tower's work grows with L, and padding past the end token changes nothing. Pass
    `pad_to_context=True` for open_clip's fixed (B, context_length) shape.

    Captions repeat a lot (paraphrase templates, class prompts), and the BPE tokenizer is pure
    Python, so token ids of each distinct string are cached. A caption seen for the first time
    that is plain printable ASCII (no `&`: nothing for ftfy or the HTML unescaping to change)
    skips open_clip's cleaning and is encoded word by word from a cache of each word's ids:
    the same ids (tests/test_tokenizer.py), ~2x faster, which matters in a data worker that
    shares the cores with training (a batch of 256 new synthetic captions: ~14 ms -> ~6 ms).
    """

    def __init__(self, context_length: int, cache_size: int = 65536) -> None:
        self.context_length = context_length
        self._bpe = SimpleTokenizer(context_length=context_length)
        self.vocab_size = len(self._bpe.encoder)
        self.sot_id = self._bpe.sot_token_id
        self.eot_id = self._bpe.eot_token_id
        self._cache_size = cache_size
        self._ids = lru_cache(maxsize=cache_size)(self._encode)
        self._words: dict[str, tuple[int, ...]] = {}  # word -> its BPE ids (plain captions)

    def __getstate__(self) -> dict:
        # Picklable for spawned/forkserver dataloader workers: the cache is rebuilt there.
        state = self.__dict__.copy()
        del state["_ids"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._ids = lru_cache(maxsize=self._cache_size)(self._encode)

    def _bpe_ids(self, text: str) -> list[int]:
        """open_clip's `SimpleTokenizer.encode(text)`, with a fast path for plain text."""
        if not (text.isascii() and text.isprintable() and "&" not in text):
            return self._bpe.encode(text)
        ids: list[int] = []
        for word in self._bpe.pat.findall(" ".join(text.split()).lower()):
            word_ids = self._words.get(word)
            if word_ids is None:
                word_ids = self._word_ids(word)
            ids.extend(word_ids)
        return ids

    def _word_ids(self, word: str) -> tuple[int, ...]:
        bpe = self._bpe
        token = "".join(bpe.byte_encoder[b] for b in word.encode("utf-8"))
        ids = tuple(bpe.encoder[piece] for piece in bpe.bpe(token).split(" "))
        if len(self._words) < self._cache_size * 4:  # bounded: a word list, not a corpus
            self._words[word] = ids
        return ids

    def _encode(self, text: str) -> tuple[int, ...]:
        ids = [self.sot_id, *self._bpe_ids(text), self.eot_id]
        if len(ids) > self.context_length:
            ids = ids[: self.context_length]
            ids[-1] = self.eot_id
        return tuple(ids)

    def __call__(self, texts: str | list[str], pad_to_context: bool = False) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        ids = [self._ids(text) for text in texts]
        length = self.context_length if pad_to_context else max((len(i) for i in ids), default=2)
        out = torch.zeros(len(ids), length, dtype=torch.long)
        for row, seq in enumerate(ids):
            out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return out

    def token_ids(self, texts: list[str]) -> set[int]:
        """Every token id `texts` encode to (not truncated), with the start and end tokens."""
        ids = {self.sot_id, self.eot_id}
        for text in texts:
            ids.update(self._bpe_ids(text))
        return ids

    def decode(self, tokens: torch.Tensor) -> str:
        """Token ids (1-D) back to text, without the start/end markers and padding."""
        ids = [int(t) for t in tokens if int(t) not in (0, self.sot_id, self.eot_id)]
        return self._bpe.decode(ids).strip()
