"""Draw frames of the synthetic world: a textured background and anti-aliased sprites.

`render_scene` (one image) and `render_clip` (the frames of a video clip) know nothing about
captions, splits or grid cells: they take continuous sprite parameters, and both paint every
sprite with the same `draw_sprite`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageDraw

from vlpt.data.synthetic.world import Background, Scene, Sprite

# Shapes are drawn on a canvas this many times larger, then box-filtered down: cheap
# anti-aliasing that keeps 12 px stars and crosses readable.
SUPERSAMPLE = 4


def render_scene(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Render `scene` as a `size` x `size` RGB image.

    `rng` only feeds the "noise" background texture; pass an identically seeded generator for
    every frame of a clip to keep the background still.
    """
    image = Image.fromarray(render_background(scene.background, size, rng), "RGB")
    for sprite in scene.sprites:
        draw_sprite(image, sprite)
    return image


def render_clip(scenes: Sequence[Scene], size: int, rng: np.random.Generator) -> list[Image.Image]:
    """Render the scenes of one clip (all with the background of the first) as RGB frames.

    The background, noise included, is drawn once, so it stays still while the sprites move.
    """
    background = Image.fromarray(render_background(scenes[0].background, size, rng), "RGB")
    frames = []
    for scene in scenes:
        frame = background.copy()
        for sprite in scene.sprites:
            draw_sprite(frame, sprite)
        frames.append(frame)
    return frames


def render_background(bg: Background, size: int, rng: np.random.Generator) -> np.ndarray:
    """The background texture as a (size, size, 3) uint8 array."""
    ys, xs = _grid(size)
    base = np.asarray(bg.base, dtype=np.float32)
    accent = np.asarray(bg.accent, dtype=np.float32)
    along = (ys, xs, (xs + ys) / 2)[bg.direction]  # coordinate the texture varies along
    if bg.kind == "plain":
        mix = np.zeros_like(xs)
    elif bg.kind == "stripes":
        mix = ((along / bg.period) % 1.0 < 0.5).astype(np.float32)
    elif bg.kind == "checker":
        mix = ((np.floor(xs / bg.period) + np.floor(ys / bg.period)) % 2).astype(np.float32)
    elif bg.kind == "dots":
        dx = (xs / bg.period) % 1.0 - 0.5
        dy = (ys / bg.period) % 1.0 - 0.5
        mix = (dx * dx + dy * dy < 0.07).astype(np.float32)
    elif bg.kind == "noise":
        mix = rng.uniform(0.0, 1.0, size=xs.shape).astype(np.float32)
    elif bg.kind == "gradient":
        mix = along
    else:
        mix = _novel_background(bg, xs, ys)
    pixels = base + mix[..., None] * (accent - base)  # (size, size, 3)
    return np.clip(pixels + 0.5, 0, 255).astype(np.uint8)


def _novel_background(bg: Background, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The textures of the `novel` domain (never drawn in the default world), as a 0..1 mix."""
    if bg.kind == "waves":  # sinusoidal bands, wavering across the other axis
        across, along = (xs, ys) if bg.direction == 0 else (ys, xs)
        phase = along + 0.3 * bg.period * np.sin(2 * np.pi * across / (2 * bg.period))
        return ((phase / bg.period) % 1.0 < 0.5).astype(np.float32)
    if bg.kind == "grid":  # thin lines on a plain ground
        line = 0.18
        on_x, on_y = (xs / bg.period) % 1.0 < line, (ys / bg.period) % 1.0 < line
        return (on_x | on_y).astype(np.float32)
    if bg.kind == "rings":  # concentric circles around the image centre
        radius = np.sqrt((xs - 0.5) ** 2 + (ys - 0.5) ** 2)
        return ((radius / bg.period) % 1.0 < 0.5).astype(np.float32)
    raise ValueError(f"unknown background kind {bg.kind!r}")


def draw_sprite(image: Image.Image, sprite: Sprite) -> None:
    """Paint one sprite onto `image` in place, anti-aliased through a supersampled mask."""
    if sprite.opacity <= 0:
        return
    mask, left, top = sprite_mask(
        sprite.shape, sprite.x, sprite.y, sprite.scale, sprite.angle, sprite.opacity, image.width
    )
    image.paste(sprite.rgb, (left, top, left + mask.width, top + mask.height), mask)


# Cached: most sprites of a clip hold still in most frames, and a colour change keeps the mask.
@lru_cache(maxsize=64)
def sprite_mask(
    shape: str, x: float, y: float, scale: float, angle: float, opacity: float, size: int
) -> tuple[Image.Image, int, int]:
    """The 8-bit coverage mask of a sprite on a `size` image and where its top left goes."""
    cx, cy = x * size, y * size
    radius = scale * size / 2
    # Integer native-pixel box around the sprite; the mask is drawn SUPERSAMPLE times finer.
    left, top = math.floor(cx - radius * 1.3) - 1, math.floor(cy - radius * 1.3) - 1
    side = math.ceil(radius * 2.6) + 3
    mask = Image.new("L", (side * SUPERSAMPLE, side * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(mask)
    ox, oy, r = (cx - left) * SUPERSAMPLE, (cy - top) * SUPERSAMPLE, radius * SUPERSAMPLE
    if shape == "circle":
        rc = r * 0.95
        draw.ellipse((ox - rc, oy - rc, ox + rc, oy + rc), fill=255)
    else:
        theta = math.radians(angle)
        cos, sin = math.cos(theta), math.sin(theta)
        # y grows downwards, so counter-clockwise on screen is (x cos + y sin, -x sin + y cos).
        points = [
            (ox + r * (px * cos + py * sin), oy + r * (-px * sin + py * cos))
            for px, py in unit_polygon(shape)
        ]
        draw.polygon(points, fill=255)
    mask = mask.resize((side, side), Image.Resampling.BOX)
    if opacity < 1:
        mask = mask.point(_opacity_table(opacity))
    return mask, left, top


def _opacity_table(opacity: float) -> list[int]:
    """Lookup table scaling an 8-bit mask by `opacity`."""
    return [round(v * opacity) for v in range(256)]


@cache
def unit_polygon(shape: str) -> tuple[tuple[float, float], ...]:
    """Vertices of `shape` around (0, 0), about unit radius, y down, sized to look alike."""
    if shape == "square":
        h = 0.8  # corners beyond the unit circle so its area matches the circle's
        return ((-h, -h), (h, -h), (h, h), (-h, h))
    if shape == "triangle":
        # Equilateral, pointing up, shifted down so its bounding box is centred.
        return tuple(_polar(1.15, a, dy=0.29) for a in (-90, 30, 150))
    if shape == "star":
        # Five points; a fat inner radius keeps the points visible at 12 px.
        return tuple(_polar(1.1 if k % 2 == 0 else 0.5, -90 + 36 * k) for k in range(10))
    if shape == "cross":
        a, w = 0.95, 0.32  # arm length and half-width of a plus sign
        return (
            (-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
            (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w),
        )  # fmt: skip
    if shape == "diamond":
        # Taller than wide, so a slightly tilted square never reads as a diamond.
        return ((0.0, -1.1), (0.72, 0.0), (0.0, 1.1), (-0.72, 0.0))
    return _novel_polygon(shape)


def _novel_polygon(shape: str) -> tuple[tuple[float, float], ...]:
    """The shapes of the `novel` domain (never drawn in the default world)."""
    if shape == "hexagon":
        return tuple(_polar(1.0, 60 * k) for k in range(6))
    if shape == "arrow":  # pointing right: a shaft and a head
        return (
            (-0.95, -0.22), (0.15, -0.22), (0.15, -0.65), (0.95, 0.0),
            (0.15, 0.65), (0.15, 0.22), (-0.95, 0.22),
        )  # fmt: skip
    if shape == "heart":  # the classic parametric heart, point down, scaled to about unit radius
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return tuple((float(a) / 16, -float(b) / 16 - 0.1) for a, b in zip(x, y))
    if shape == "crescent":
        # The unit disc minus a disc of radius 0.8 centred at (0.5, 0): the outer arc through
        # the left, then back along the inner arc; shifted right to centre it.
        outer = [_polar(1.0, a, dx=0.2) for a in np.linspace(52, 308, 16)]
        inner = [_polar(0.8, a, dx=0.7) for a in np.linspace(278, 82, 12)]
        return tuple(outer + inner)
    raise ValueError(f"unknown shape {shape!r}")


def _polar(radius: float, degrees: float, dy: float = 0.0, dx: float = 0.0) -> tuple[float, float]:
    t = math.radians(degrees)
    return (radius * math.cos(t) + dx, radius * math.sin(t) + dy)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as fractions of the side: (ys, xs), each (size, size) float32."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    ys, xs = np.meshgrid(t, t, indexing="ij")
    return ys, xs
