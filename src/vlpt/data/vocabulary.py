"""The caption vocabulary of a data set: every token its training captions use.

    ids = caption_vocabulary(cfg.data.train, tokenizer, max_samples=200_000)
    model.caption_decoder().set_output_vocabulary(ids.token_ids)

Captioning models trained on COCO predict over a vocabulary of their training split (~10k words
in Karpathy's split) rather than a tokenizer's whole vocabulary; a caption decoder with an output
vocabulary does the same over BPE tokens (see `vlpt.models.decoder`). Only the `.txt` files of
the shards are used. The BPE tokenizer splits text at whitespace before anything else, so the
tokens of a caption are those of its words, and each distinct word is encoded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from typing import NamedTuple

from vlpt.config import Source
from vlpt.data.samples import SkipCounter, SkipReason, caption_lines
from vlpt.data.shards import expand_urls, read_shard
from vlpt.models import Tokenizer


class CaptionVocabulary(NamedTuple):
    token_ids: list[int]
    """Sorted token ids of the captions, the start and end tokens included, padding (id 0,
    also the BPE token '!') excluded."""
    n_samples: int
    """Samples whose captions were read."""
    n_words: int
    """Distinct whitespace-separated words among their captions."""


def caption_vocabulary(
    sources: Sequence[Source], tokenizer: Tokenizer, max_samples: int, pad_id: int = 0
) -> CaptionVocabulary:
    """The tokens of the captions of the first `max_samples` samples of each source (shard
    order). Samples without a usable caption are passed over, as in training."""
    words: set[str] = set()
    n_samples = 0
    skips = SkipCounter()
    for source in sources:
        raws = (raw for url in expand_urls(source.url) for raw in read_shard(url, skips))
        for raw in islice(raws, max_samples):
            captions = caption_lines(raw.get("txt"))
            if isinstance(captions, SkipReason):
                continue
            n_samples += 1
            for caption in captions:
                words.update(caption.split())
    ids = tokenizer.token_ids(sorted(words)) - {pad_id}
    return CaptionVocabulary(sorted(ids), n_samples, len(words))
