"""Paraphrased captions of a `SceneSpec`.

Every caption names, for every object, its colour, a size word and its shape, plus either its
grid position or its relation to another object, so a caption picks out its scene among
thousands (only two-object scenes get position-free captions: one relation, e.g. 'above and to
the left of', leaves few layouts open). Templates, synonyms and word order vary to keep the text encoder from
keying on one fixed sentence shape.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vlpt.data.synthetic.world import ObjectSpec, SceneSpec

SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny", "little"),
    "large": ("large", "big"),
}

PREDICATE_SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "tiny"),
    "large": ("large", "big"),
}

# Noun phrases naming each grid cell; the first is the canonical name in POSITIONS.
POSITION_NOUNS: dict[str, tuple[str, ...]] = {
    "top left": ("top left", "upper left", "top left corner"),
    "top": ("top", "top middle", "top centre"),
    "top right": ("top right", "upper right", "top right corner"),
    "left": ("left", "middle left", "left side"),
    "center": ("center", "centre", "middle"),
    "right": ("right", "middle right", "right side"),
    "bottom left": ("bottom left", "lower left", "bottom left corner"),
    "bottom": ("bottom", "bottom middle", "bottom centre"),
    "bottom right": ("bottom right", "lower right", "bottom right corner"),
}

BACKGROUND_WORDS: dict[str, tuple[str, ...]] = {
    "plain": ("plain", "flat"),
    "stripes": ("striped",),
    "checker": ("checkered", "chequered"),
    "dots": ("dotted", "spotted"),
    "noise": ("noisy", "grainy"),
    "gradient": ("gradient", "shaded"),
    # the `novel` domain's textures
    "waves": ("wavy", "rippled"),
    "grid": ("grid", "lined"),
    "rings": ("ringed", "concentric"),
}

COUNT_WORDS = ("one", "two", "three", "four")

Template = Callable[[SceneSpec, np.random.Generator], str]


def make_captions(spec: SceneSpec, n: int, rng: np.random.Generator) -> list[str]:
    """`n` captions of `spec`, from different templates where possible, without duplicates."""
    captions: list[str] = []
    order = [TEMPLATES[i] for i in rng.permutation(len(TEMPLATES))]
    for attempt in range(8 * n):
        if len(captions) == n:
            break
        text = order[attempt % len(order)](spec, rng)
        if rng.uniform() < 0.35:  # the background is a detail; mention it sometimes
            text += background_phrase(spec, rng)
        if text not in captions:
            captions.append(text)
    return captions


def listing(spec: SceneSpec, rng: np.random.Generator) -> str:
    """'a small red circle at the top left and a big blue square in the bottom right corner'."""
    parts = [f"{noun_phrase(o, rng)} {position_phrase(o, rng)}" for o in shuffled(spec, rng)]
    return pick(rng, ("", "a picture of ", "an image of ", "a drawing of ")) + join(parts)


def there_is(spec: SceneSpec, rng: np.random.Generator) -> str:
    """'in the top left there is a small red circle and at the bottom right a large blue square'."""
    objs = shuffled(spec, rng)
    first = f"{position_phrase(objs[0], rng)} there is {noun_phrase(objs[0], rng)}"
    rest = [f"{position_phrase(o, rng)} {noun_phrase(o, rng)}" for o in objs[1:]]
    return join([first, *rest])


def layout(spec: SceneSpec, rng: np.random.Generator) -> str:
    """'top left: small red circle; bottom right: large blue square', in reading order."""
    objs = sorted(spec.objects, key=lambda o: (o.row, o.col))
    return "; ".join(f"{position_noun(o, rng)}: {bare_phrase(o, rng)}" for o in objs)


def attributes_last(spec: SceneSpec, rng: np.random.Generator) -> str:
    """'the circle in the top left is small and red, and the square at the bottom is big and blue'."""
    parts = []
    for o in shuffled(spec, rng):
        # 'little' only works before a noun ('the star is little' reads oddly).
        size, colour = pick(rng, PREDICATE_SIZE_WORDS[o.size]), o.colour
        adjectives = f"{size} and {colour}" if rng.uniform() < 0.5 else f"{colour} and {size}"
        parts.append(f"the {o.shape} {position_phrase(o, rng)} is {adjectives}")
    return join(parts)


def counted(spec: SceneSpec, rng: np.random.Generator) -> str:
    """'two shapes: a small red circle (top left) and a large blue square (bottom right)'."""
    n = len(spec.objects)
    noun = pick(rng, ("shape", "object")) + ("s" if n > 1 else "")
    parts = [f"{noun_phrase(o, rng)} ({position_noun(o, rng)})" for o in shuffled(spec, rng)]
    return f"{COUNT_WORDS[n - 1]} {noun}: {join(parts)}"


def anchored(spec: SceneSpec, rng: np.random.Generator) -> str:
    """'a small red circle at the top left, with a large blue square below and to the right of it'."""
    objs = shuffled(spec, rng)
    anchor, others = objs[0], objs[1:]
    head = f"{noun_phrase(anchor, rng)} {position_phrase(anchor, rng)}"
    if not others:
        return pick(rng, ("just ", "only ", "a single shape: ")) + head
    rels = [f"{noun_phrase(o, rng)} {relation_phrase(o, anchor)} it" for o in others]
    return f"{head}, with {join(rels)}"


def related(spec: SceneSpec, rng: np.random.Generator) -> str:
    """'there is a large blue square below and to the right of a small red circle'.

    Two-object scenes only (one relation names the whole layout up to translation); other
    scenes fall back to `anchored`.
    """
    if len(spec.objects) != 2:
        return anchored(spec, rng)
    a, b = shuffled(spec, rng)
    sentence = f"{noun_phrase(a, rng)} {relation_phrase(a, b)} {noun_phrase(b, rng)}"
    return pick(rng, ("there is ", "", "we see ")) + sentence


TEMPLATES: tuple[Template, ...] = (
    listing,
    there_is,
    layout,
    attributes_last,
    counted,
    anchored,
    related,
)


def background_phrase(spec: SceneSpec, rng: np.random.Generator) -> str:
    """' on a striped background', ' against a grainy backdrop'."""
    word = with_article(pick(rng, BACKGROUND_WORDS[spec.background.kind]))
    return pick(rng, (f" on {word} background", f" against {word} backdrop"))


def relation_phrase(a: ObjectSpec, b: ObjectSpec) -> str:
    """Where `a` is relative to `b`: 'above', 'to the left of', 'below and to the right of'."""
    vertical = "above" if a.row < b.row else "below" if a.row > b.row else ""
    horizontal = "to the left of" if a.col < b.col else "to the right of" if a.col > b.col else ""
    # Objects sit in distinct cells, so at least one of the two is set.
    if vertical and horizontal:
        return f"{vertical} and {horizontal}"
    return vertical or horizontal


def noun_phrase(o: ObjectSpec, rng: np.random.Generator) -> str:
    """'a small red circle', 'an orange star': `bare_phrase` with the right article."""
    return with_article(bare_phrase(o, rng))


def bare_phrase(o: ObjectSpec, rng: np.random.Generator) -> str:
    """'small red circle', 'big blue square'."""
    return f"{pick(rng, SIZE_WORDS[o.size])} {o.colour} {o.shape}"


def position_phrase(o: ObjectSpec, rng: np.random.Generator) -> str:
    """'in the top left corner', 'at the top', 'on the left side', 'in the middle'."""
    noun = position_noun(o, rng)
    if o.position == "center" or noun.endswith("corner"):
        return f"in the {noun}"
    if noun in ("left", "right", "left side", "right side"):
        return f"on the {noun}"
    if o.col == 1:  # edge middles: 'at the top', never 'in the bottom'
        return f"at the {noun}"
    return f"{pick(rng, ('at', 'in'))} the {noun}"


def position_noun(o: ObjectSpec, rng: np.random.Generator) -> str:
    return pick(rng, POSITION_NOUNS[o.position])


def shuffled(spec: SceneSpec, rng: np.random.Generator) -> list[ObjectSpec]:
    return [spec.objects[i] for i in rng.permutation(len(spec.objects))]


def join(parts: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]
