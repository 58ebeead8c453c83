"""Captioning metrics: BLEU-4, CIDEr-D, ROUGE-L, and attribute accuracy on the synthetic world.

    scores = caption_scores({"img1": "a red circle"}, {"img1": ["a red circle", "one red disc"]})
    accuracy = attribute_accuracy("a small red circle at the top left", meta)

`caption_scores` runs pycocoevalcap's scorers (the COCO caption evaluation code), with a
pure-Python stand-in for its Java PTB tokenizer so that no Java is needed.

`attribute_accuracy` reads a generated caption of a synthetic scene and checks which objects it
names correctly: colour + shape, and the size and grid position where the caption gives them
(a position only where the caption places the object unambiguously). The vocabulary is an
`AttributeVocab`, built from the world's constants; `vlpt.eval.clip_attributes` reuses the
parser for the video world, adding its actions.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from vlpt.data.synthetic import world
from vlpt.data.synthetic.captions import POSITION_NOUNS, SIZE_WORDS

# ---- corpus metrics ----------------------------------------------------------------------------

# PTB splits clitics off their word: "man's" -> "man 's", "don't" -> "do n't".
_CLITIC = re.compile(r"(?<=[^\W_])('s|'re|'ve|'ll|'d|'m|n't)\b")
# A token: a clitic, or a word possibly joined by inner hyphens, dots, apostrophes ('3.5',
# 'black-and-white', 'u.s'); everything else (punctuation, brackets, quotes) is dropped.
_TOKEN = re.compile(r"n't|'[^\W_]+|[^\W_]+(?:[-.'&/][^\W_]+)*")


def ptb_tokenize(text: str) -> str:
    """Lowercase, split off clitics and drop punctuation, as the COCO evaluation's PTB step does.

    "A man's dog, running (fast)." -> "a man 's dog running fast". A hand-written stand-in for
    pycocoevalcap's `PTBTokenizer`, which shells out to Stanford CoreNLP (Java); it agrees
    with it on ordinary captions, not necessarily on every edge case of the Java tokenizer.
    """
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    text = _CLITIC.sub(r" \1", text)
    return " ".join(_TOKEN.findall(text))


Key = TypeVar("Key", bound=Hashable)


def caption_scores(
    predictions: Mapping[Key, str], references: Mapping[Key, Sequence[str]]
) -> dict[str, float | int]:
    """Corpus BLEU-4, CIDEr-D and ROUGE-L of one predicted caption per item against its references.

    Every key of `predictions` must have at least one non-empty reference (a ValueError names
    the first item that has none); references of items without a prediction are ignored.
    Returns `{"bleu4", "cider", "rouge_l", "n_items"}`.

    - BLEU-4 is corpus-level (n-gram counts pooled over all items, 'closest' reference length
      for the brevity penalty), as pycocoevalcap computes it, not a mean of sentence scores.
    - CIDEr is pycocoevalcap's `Cider`, which *is* CIDEr-D (the COCO server's metric): clipped
      n-gram counts, a Gaussian length penalty (sigma 6) and the x10 scale. Its idf comes from
      the references of the evaluated items themselves, so scores compare only across the same
      evaluation set; a one-item set gives 0 (every n-gram has idf log(1/1) = 0).
    - ROUGE-L is the LCS F-measure with beta 1.2, best reference per item, mean over items.
    """
    if not predictions:
        raise ValueError("there are no predictions to score.")
    res: dict[Hashable, list[str]] = {}
    gts: dict[Hashable, list[str]] = {}
    for key, prediction in predictions.items():
        refs = [ptb_tokenize(r) for r in references.get(key, ())]
        refs = [r for r in refs if r]
        if not refs:
            raise ValueError(
                f"item {key!r} has no non-empty reference caption; give every predicted item "
                "at least one reference."
            )
        gts[key], res[key] = refs, [ptb_tokenize(prediction)]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    return {
        "bleu4": float(bleu[3]),
        "cider": float(cider),
        "rouge_l": float(rouge),
        "n_items": len(res),
    }


# ---- attribute accuracy on the synthetic world -------------------------------------------------


@dataclass(frozen=True)
class AttributeVocab:
    """The words `attribute_accuracy` understands.

    An object is named by a noun phrase `[modifier] colour shape`, or by the shape followed by
    a predicate ('the circle ... is small and red'). Positions are phrases naming grid cells.
    """

    colours: tuple[str, ...]
    shapes: tuple[str, ...]
    modifiers: tuple[str, ...] = ()
    """Adjectives that may stand between article and colour (sizes; a video world: 'moving')."""
    sizes: Mapping[str, str] = field(default_factory=dict)
    """Size word -> canonical size (as in the metadata): 'tiny' -> 'small'."""
    positions: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Canonical position (as in the metadata) -> phrases that name it."""
    relation_heads: tuple[str, ...] = ("above", "below")
    """Words that may be joined to a relation by 'and' ('below and to the right of')."""
    clause_breaks: tuple[str, ...] = ()
    """Words that end a clause and start the next one (a video world: 'then', 'after')."""


SYNTHETIC_IMAGE_VOCAB = AttributeVocab(
    colours=world.COLOURS,
    shapes=world.SHAPES,
    modifiers=tuple(sorted({w for words in SIZE_WORDS.values() for w in words})),
    sizes={w: size for size, words in SIZE_WORDS.items() for w in words},
    positions=POSITION_NOUNS,
)


@dataclass(frozen=True)
class ObjectMention:
    """An object a caption names: its colour (None if no colour is attached), shape, position
    and size (None where the caption gives none)."""

    colour: str | None
    shape: str
    position: str | None
    size: str | None = None


def attribute_accuracy(
    prediction: str, meta: Mapping[str, Any], vocab: AttributeVocab = SYNTHETIC_IMAGE_VOCAB
) -> float:
    """Fraction of the scene's objects the caption names correctly, penalising invented ones.

    An object of `meta["objects"]` (dicts with `colour`, `shape`, `position`, `size`, as the
    synthetic shards' `.json` holds) counts as correct when the caption names its colour-shape
    pair and the position and size the caption gives that mention (if any) are right. Each distinct
    colour-shape pair the caption names that is not in the scene adds one to the denominator:

        accuracy = correct objects / (objects in the scene + invented pairs)

    so 1.0 means every object named, none invented, and no position or size wrong.
    """
    objects = meta.get("objects") or []
    if not objects:
        raise ValueError(f"item {meta.get('key', '?')!r} has no 'objects' in its metadata.")
    mentions = parse_mentions(prediction, vocab)
    scene_pairs = {(o["colour"], o["shape"]) for o in objects}
    correct = sum(any(_names(m, o) for m in mentions) for o in objects)
    invented = {(m.colour, m.shape) for m in mentions if m.colour is not None} - scene_pairs
    return correct / (len(objects) + len(invented))


def _names(mention: ObjectMention, obj: Mapping[str, Any]) -> bool:
    """Whether the mention names the metadata object with nothing wrong."""
    return (
        (mention.colour, mention.shape) == (obj["colour"], obj["shape"])
        and mention.position in (None, obj["position"])
        and mention.size in (None, obj.get("size", mention.size))
    )


def parse_mentions(
    caption: str, vocab: AttributeVocab = SYNTHETIC_IMAGE_VOCAB
) -> list[ObjectMention]:
    """The objects a caption names, each with its colour, size and (when unambiguous) position.

    The caption is cut into clauses at ',', ';' and at 'and' between two noun phrases (not in
    'small and red' or 'below and to the right of'). A position phrase is given to the object
    of its clause when the clause names exactly one object; relative phrases ('to the left of')
    are not positions.
    """
    mentions = []
    for clause in _clauses(caption.lower(), vocab):
        found = _objects_in(clause, vocab)
        positions = _positions_in(clause, vocab)
        position = positions[0] if len(found) == 1 and len(set(positions)) == 1 else None
        mentions += [ObjectMention(colour, shape, position, size) for colour, shape, size in found]
    return mentions


def _clauses(text: str, vocab: AttributeVocab) -> list[list[str]]:
    """Words of the caption, split into clauses."""
    joins_adjectives = set(vocab.colours) | set(vocab.modifiers) | set(vocab.relation_heads)
    clauses: list[list[str]] = [[]]
    for token in re.findall(r"[^\W\d_]+|[,;]", text):
        previous = clauses[-1][-1] if clauses[-1] else None
        breaks = token in (",", ";") or token in vocab.clause_breaks
        if breaks or (token == "and" and previous not in joins_adjectives):
            clauses.append([])
        else:
            clauses[-1].append(token)
    return [c for c in clauses if c]


def _objects_in(
    words: list[str], vocab: AttributeVocab
) -> list[tuple[str | None, str, str | None]]:
    """(colour, shape, size) of each shape word: the words right before it ('small red circle'),
    or, when no colour stands before it, the first colour and size after it before the next
    shape ('the circle at the top is small and red')."""
    shape_at = [i for i, w in enumerate(words) if w in vocab.shapes]
    found: list[tuple[str | None, str, str | None]] = []
    for n, i in enumerate(shape_at):
        before = words[max(i - 2, 0) : i]  # [size, colour], [.., colour] or [.., size]
        colour: str | None
        if before and before[-1] in vocab.colours:
            colour, size = before[-1], vocab.sizes.get(before[0])
        else:  # predicate form: the adjectives follow
            after = words[i + 1 : shape_at[n + 1] if n + 1 < len(shape_at) else len(words)]
            colour = next((w for w in after if w in vocab.colours), None)
            size = next((vocab.sizes[w] for w in [*before[-1:], *after] if w in vocab.sizes), None)
        found.append((colour, words[i], size))
    return found


def _positions_in(words: list[str], vocab: AttributeVocab) -> list[str]:
    """Canonical positions named in a clause, longest phrase first; 'left of' is a relation."""
    phrases = sorted(
        ((tuple(p.split()), canonical) for canonical, ps in vocab.positions.items() for p in ps),
        key=lambda item: -len(item[0]),
    )
    found, i = [], 0
    while i < len(words):
        for phrase, canonical in phrases:
            end = i + len(phrase)
            if tuple(words[i:end]) == phrase and (end == len(words) or words[end] != "of"):
                found.append(canonical)
                i = end
                break
        else:
            i += 1
    return found
