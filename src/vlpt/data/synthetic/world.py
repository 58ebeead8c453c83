"""The synthetic world as pure data: vocabularies, scene sampling and held-out pairs.

Two descriptions of a picture live here, kept apart on purpose:

- `SceneSpec` is the *discrete* scene that captions and metadata talk about: 1-3 objects, each a
  shape, colour and size in a distinct cell of a 3x3 grid, on a textured background.
- `Scene` is the *continuous* scene the renderer draws: `Sprite`s with a centre (x, y), a scale,
  an angle and an RGB colour. Video clips of the same world animate these parameters frame by
  frame and draw each frame with the same `render_scene`.

Nothing in this module draws or does I/O, so it is cheap to import and easy to test.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, replace

import numpy as np

RGB = tuple[int, int, int]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")

# Saturated, far apart in hue or lightness, so they stay distinguishable at 12 px after JPEG.
COLOUR_RGB: dict[str, RGB] = {
    "red": (220, 30, 35),
    "green": (40, 185, 60),
    "blue": (35, 85, 235),
    "yellow": (250, 225, 30),
    "purple": (150, 45, 200),
    "orange": (250, 135, 15),
    "white": (252, 252, 252),
    "black": (12, 12, 12),
}
COLOURS: tuple[str, ...] = tuple(COLOUR_RGB)

# Object diameter as a fraction of the image side: ~12 px and ~20 px at 64 px.
SIZE_SCALE: dict[str, float] = {"small": 0.19, "large": 0.31}
SIZES: tuple[str, ...] = tuple(SIZE_SCALE)

# Row-major names of the 3x3 grid cells; POSITIONS[3 * row + col].
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip

BACKGROUNDS: tuple[str, ...] = ("plain", "stripes", "checker", "dots", "noise", "gradient")

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Domain:
    """A variant of the world: the shapes and background textures its scenes are drawn from.

    Colours, sizes, positions, relations and caption templates are shared by every domain, so a
    model trained on one can be tested zero-shot on another: what differs is only what it has
    never seen (for retrieval fine-tuning on a held-out domain)."""

    name: str
    shapes: tuple[str, ...]
    backgrounds: tuple[str, ...]


# `novel` shares nothing visual with the default world but colours: four new shapes (and words
# for them) on three new textures. It is what "a held-out domain" means in the benchmarks.
DOMAINS: dict[str, Domain] = {
    "default": Domain("default", SHAPES, BACKGROUNDS),
    "novel": Domain("novel", ("heart", "hexagon", "arrow", "crescent"), ("waves", "grid", "rings")),
}

SPLITS: tuple[str, ...] = ("train", "val", "test")

N_HELD_OUT = 8
# Stream id that keeps the held-out draw independent of every image's random stream.
_HELD_OUT_STREAM = 7_777


@dataclass(frozen=True)
class Background:
    """A muted, textured backdrop; every parameter is fixed here so all frames of a clip match."""

    kind: str  # one of BACKGROUNDS
    base: RGB
    accent: RGB
    period: float  # texture period as a fraction of the image side
    direction: int  # 0 horizontal, 1 vertical, 2 diagonal (stripes and gradient)


@dataclass(frozen=True)
class ObjectSpec:
    """One object as captions describe it: discrete attributes and its grid cell."""

    shape: str
    colour: str
    size: str
    row: int  # 0 top .. 2 bottom
    col: int  # 0 left .. 2 right

    @property
    def position(self) -> str:
        return POSITIONS[3 * self.row + self.col]

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)


@dataclass(frozen=True)
class Sprite:
    """One object as the renderer draws it; coordinates are fractions of the image side."""

    shape: str
    x: float  # centre, 0 = left edge, 1 = right edge
    y: float  # centre, 0 = top edge, 1 = bottom edge
    scale: float  # diameter of the circumscribed circle
    angle: float  # degrees, counter-clockwise
    rgb: RGB
    opacity: float = 1.0  # 0 = invisible; video clips fade objects in and out


@dataclass(frozen=True)
class Scene:
    """What `render_scene` draws: a background and sprites, painted in order."""

    background: Background
    sprites: tuple[Sprite, ...]


@dataclass(frozen=True)
class SceneSpec:
    """A sampled scene: background and 1-3 objects in distinct grid cells."""

    background: Background
    objects: tuple[ObjectSpec, ...]

    def relations(self) -> list[dict[str, int | str]]:
        """Spatial relations of each object to every later one (indices into `objects`)."""
        out: list[dict[str, int | str]] = []
        for i, a in enumerate(self.objects):
            for j in range(i + 1, len(self.objects)):
                for rel in relation_words(a, self.objects[j]):
                    out.append({"subject": i, "relation": rel, "object": j})
        return out

    def to_scene(self, rng: np.random.Generator) -> Scene:
        """Place each object at its cell centre with a small jitter that keeps it in its cell."""
        sprites = []
        for obj in self.objects:
            scale = SIZE_SCALE[obj.size]
            # Half the free space in the cell, so neighbours never touch.
            slack = max(0.0, (1 / 3 - scale) / 4)
            dx, dy = rng.uniform(-slack, slack, size=2)
            angle = float(rng.uniform(-10.0, 10.0))  # small tilt: a square must stay a square
            x, y = (obj.col + 0.5) / 3 + dx, (obj.row + 0.5) / 3 + dy
            sprites.append(Sprite(obj.shape, x, y, scale, angle, COLOUR_RGB[obj.colour]))
        return Scene(self.background, tuple(sprites))


def relation_words(a: ObjectSpec, b: ObjectSpec) -> list[str]:
    """Relations of `a` with respect to `b`, horizontal first (e.g. ["left of", "above"])."""
    rels = []
    if a.col != b.col:
        rels.append("left of" if a.col < b.col else "right of")
    if a.row != b.row:
        rels.append("above" if a.row < b.row else "below")
    return rels


def held_out_pairs(seed: int, shapes: tuple[str, ...] = SHAPES) -> tuple[tuple[str, str], ...]:
    """The (colour, shape) pairs that appear only in the test split.

    Each colour is held out with exactly one shape and each shape with at most two colours (the
    default six shapes; four shapes get two each), so every colour and every shape is still
    seen in training with other partners.
    """
    rng = np.random.default_rng([seed, _HELD_OUT_STREAM])
    colours = [COLOURS[i] for i in rng.permutation(len(COLOURS))]
    shapes = tuple(shapes[i] for i in rng.permutation(len(shapes)))
    pairs = [(colours[i], shapes[i % len(shapes)]) for i in range(N_HELD_OUT)]
    return tuple(sorted(pairs))


def sample_background(rng: np.random.Generator, kinds: tuple[str, ...] = BACKGROUNDS) -> Background:
    """A low-saturation, mid-lightness backdrop: both white and black objects stand out on it."""
    kind = kinds[rng.integers(len(kinds))]
    hue = rng.uniform(0.0, 1.0)
    sat = rng.uniform(0.0, 0.25)
    value = rng.uniform(0.42, 0.62)
    shift = rng.choice([-1.0, 1.0]) * rng.uniform(0.08, 0.14)
    base = _hsv_to_rgb(hue, sat, value)
    accent = _hsv_to_rgb(hue, sat, value + shift)
    period = float(rng.uniform(0.08, 0.2))
    return Background(kind, base, accent, period, int(rng.integers(3)))


def sample_scene(
    rng: np.random.Generator,
    *,
    held_out: tuple[tuple[str, str], ...],
    require_held_out: bool,
    max_objects: int = 3,
    domain: Domain = DOMAINS["default"],
) -> SceneSpec:
    """Sample a scene of 1..max_objects objects with distinct cells and distinct colour-shape pairs.

    With `require_held_out` the first object drawn uses a held-out pair (test split); otherwise
    no object does (train and val). Shapes and backgrounds come from `domain`.
    """
    n = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(9, size=n, replace=False)
    all_pairs = [(c, s) for c in COLOURS for s in domain.shapes]
    allowed = [p for p in all_pairs if p not in held_out]
    chosen: list[tuple[str, str]] = []
    if require_held_out:
        chosen.append(held_out[rng.integers(len(held_out))])
    while len(chosen) < n:
        pool = all_pairs if require_held_out else allowed
        pair = pool[rng.integers(len(pool))]
        if pair not in chosen:
            chosen.append(pair)
    order = rng.permutation(n)  # the held-out object must not always come first
    objects = tuple(
        ObjectSpec(
            shape=chosen[k][1],
            colour=chosen[k][0],
            size=SIZES[rng.integers(len(SIZES))],
            row=int(cells[i]) // 3,
            col=int(cells[i]) % 3,
        )
        for i, k in enumerate(order)
    )
    return SceneSpec(sample_background(rng, domain.backgrounds), objects)


def twin_scene(
    spec: SceneSpec,
    rng: np.random.Generator,
    *,
    held_out: tuple[tuple[str, str], ...],
    shapes: tuple[str, ...] = SHAPES,
) -> SceneSpec | None:
    """The same scene with one object's shape changed: a hard-negative twin (TripletCLIP).

    The object (uniform) gets another shape (uniform among those that keep its colour-shape
    pair allowed: not held out, not another object's pair). Rendered and captioned from the
    same random streams, the twin differs from its scene in that one shape and in the caption's
    one shape word: contrastive training with both in a batch can only tell them apart by
    shape, where colour and position tell random negatives apart. None when no object can
    change (possible with a domain of few shapes: every other shape held out or taken).
    """
    objects = list(spec.objects)
    pairs = {o.pair for o in objects}
    for k in rng.permutation(len(objects)):
        obj = objects[int(k)]
        options = [
            s
            for s in shapes
            if s != obj.shape and (obj.colour, s) not in held_out and (obj.colour, s) not in pairs
        ]
        if options:
            objects[int(k)] = replace(obj, shape=options[rng.integers(len(options))])
            return replace(spec, objects=tuple(objects))
    return None


def _hsv_to_rgb(h: float, s: float, v: float) -> RGB:
    """HSV in [0, 1] to 8-bit RGB."""
    r, g, b = colorsys.hsv_to_rgb(h, s, min(v, 1.0))
    return (round(r * 255), round(g * 255), round(b * 255))
