"""Hard-negative pairs that enter a training batch together: a clip and its reversal
(`data.reversed_pairs`), an image and its twin (`data.twin_pairs`).

Each sample is yielded with caption k, then its partner with the partner caption k from the
sample's json (`reversed_captions`, `twin_captions`): consecutive, so with an even batch size
the two land in the same batch as each other's hardest negative, both ways.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

from vlpt.data.samples import (
    Sample,
    SkipCounter,
    SkipReason,
    VideoSample,
    decode_pixels,
    open_image,
)

Pixels = np.ndarray
"""uint8 (S, S, 3) for an image, (T, S, S, 3) for a video clip."""


def with_partner(
    pixels: Pixels,
    sample: Sample | VideoSample,
    captions_key: str,
    partner: Callable[[], Pixels | None],
    rng: random.Random,
) -> Iterator[tuple[Pixels, str]]:
    """The sample with caption k, then `partner()` (None: the sample goes alone) with
    `json[captions_key][k]`; without those captions, the sample alone with a random caption."""
    partner_captions = sample.meta().get(captions_key)
    if not isinstance(partner_captions, list) or not partner_captions:
        yield pixels, rng.choice(sample.captions)
        return
    i = rng.randrange(len(sample.captions))
    yield pixels, sample.captions[i]
    other = partner()
    if other is not None:
        # Paired by index, as the temporal-order evaluation pairs them (vlpt.eval.embed).
        yield other, str(partner_captions[i % len(partner_captions)])


def with_reversed_pair(
    clip: Pixels, sample: VideoSample, rng: random.Random
) -> Iterator[tuple[Pixels, str]]:
    """The clip, then its frames in reverse order with the reversed caption."""
    return with_partner(
        clip, sample, "reversed_captions", lambda: np.ascontiguousarray(clip[::-1]), rng
    )


def with_twin(
    image: Pixels,
    sample: Sample,
    transform: Callable[[Image.Image, random.Random | None], Pixels],
    crop_state: tuple,
    max_pixels: int,
    skips: SkipCounter,
    rng: random.Random,
) -> Iterator[tuple[Pixels, str]]:
    """The image, then its twin (`twin.jpg`, the same scene with one thing changed) cropped by
    the same draws (`crop_state`: the crop RNG's state before the image's crop). A twin that
    does not decode is counted and the image goes alone."""

    def twin() -> Pixels | None:
        opened = open_image(sample.twin or b"", max_pixels)
        if isinstance(opened, SkipReason):
            skips.add(opened)
            return None
        replay = random.Random()
        replay.setstate(crop_state)
        return decode_pixels(Sample(sample.key, opened, sample.captions), transform, replay, skips)

    return with_partner(image, sample, "twin_captions", twin, rng)
