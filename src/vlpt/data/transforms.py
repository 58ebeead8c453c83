"""Image transforms: random-resized crop for training, resize + center crop for evaluation.

They do what open_clip's `image_transform(size, is_train)` does (bicubic, RandomResizedCrop with
torchvision's sampling for training, shortest-side resize + center crop for evaluation; no flip),
restructured for speed, which is why they are not open_clip's `Compose` itself:

- the crop box is chosen from the image *header* size, before any pixel is decoded;
- a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8, PIL `draft`) that still covers the
  box at the target size, which makes large photos several times cheaper to decode;
- crop and resize are one PIL call (`resize(box=...)`), giving uint8 (S, S, 3);
- normalisation runs once per batch (`normalize_batch`), not once per image.
`tests/test_data.py` checks both transforms against open_clip / torchvision numerically.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

Box = tuple[float, float, float, float]
"""(left, top, right, bottom) in pixels of the full-size image."""

_BICUBIC = Image.Resampling.BICUBIC


class CropResize:
    """Base: pick a crop box from the image size, decode, return the box resized to S x S."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def box(self, width: int, height: int, rng: random.Random | None) -> Box:
        """The region of a width x height image that becomes the output."""
        raise NotImplementedError

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> np.ndarray:
        """Decode a lazily opened PIL image -> uint8 array (S, S, 3), RGB."""
        box = self.box(*image.size, rng)
        image, box = _draft(image, box, self.image_size)
        if image.mode not in ("RGB", "L"):  # palette, alpha, CMYK...: resample in RGB
            image = image.convert("RGB")
        out = image.resize((self.image_size, self.image_size), _BICUBIC, box=box)
        if out.mode != "RGB":
            out = out.convert("RGB")
        return np.asarray(out)


class TrainTransform(CropResize):
    """Random-resized crop of area fraction `scale` and aspect `ratio`; no horizontal flip
    (captions talk about left and right)."""

    def __init__(
        self,
        image_size: int,
        scale: Sequence[float] = (0.9, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
    ) -> None:
        super().__init__(image_size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))

    def box(self, width: int, height: int, rng: random.Random | None) -> Box:
        # torchvision's RandomResizedCrop.get_params, drawing from a seeded per-worker
        # random.Random instead of torch's global generator (reproducible streams that leave the
        # training process's RNG alone).
        rng = rng or random.Random(0)
        area = width * height
        for _ in range(10):
            target_area = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*self.log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                return (left, top, left + w, top + h)
        return _central_box(width, height, self.ratio)


class EvalTransform(CropResize):
    """open_clip's evaluation preprocessing: shortest side to S, then the central S x S."""

    def box(self, width: int, height: int, rng: random.Random | None = None) -> Box:
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        return (left, top, left + side, top + side)


def _central_box(width: int, height: int, ratio: tuple[float, float]) -> Box:
    """torchvision's fallback when no random box fits: the largest central box within `ratio`."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return (left, top, left + w, top + h)


def _draft(image: Image.Image, box: Box, size: int) -> tuple[Image.Image, Box]:
    """Ask the JPEG decoder for the largest 1/2^k reduction that keeps the box >= size x size."""
    width, height = image.size
    box_w, box_h = box[2] - box[0], box[3] - box[1]
    request = (max(1, math.ceil(width * size / box_w)), max(1, math.ceil(height * size / box_h)))
    drafted = image.draft("RGB", request)  # None for formats other than JPEG
    if drafted is None:
        return image, box
    reduction = width / drafted[1][2]
    if reduction == 1:
        return image, box
    return image, (box[0] / reduction, box[1] / reduction, box[2] / reduction, box[3] / reduction)


def normalize_batch(
    pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) holding (x / 255 - mean) / std."""
    if not pixels.flags.writeable:  # torch warns about read-only arrays (e.g. from PIL)
        pixels = pixels.copy()
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2)  # (B, 3, H, W) view, channels-last
    out = torch.empty(images.shape, dtype=torch.float32)  # contiguous NCHW
    out.copy_(images)  # one pass: uint8 -> float and NHWC -> NCHW together
    scale = torch.tensor([1 / (255 * s) for s in std]).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, 3, 1, 1)
    return out.mul_(scale).add_(shift)


def normalize_pixels(
    pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> float32 (B, 3, S, S); clips (B, T, S, S, 3) -> (B, T, 3, S, S)."""
    if pixels.ndim == 4:
        return normalize_batch(pixels, mean, std)
    b, t = pixels.shape[:2]
    frames = normalize_batch(pixels.reshape(b * t, *pixels.shape[2:]), mean, std)
    return frames.view(b, t, *frames.shape[1:])
