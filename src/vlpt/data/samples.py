"""One sample of a shard, from raw bytes to something the batcher can use, and why samples are skipped.

A raw sample is what `vlpt.data.shards.read_shard` yields: the files that share a key in a tar
shard, as `{"__key__": str, "__url__": str, "<ext>": bytes, ...}`. `parse_sample` checks it
cheaply (fields, caption text, image header) and returns a `Sample` whose image is opened but not
yet decoded, so a shuffle buffer holds compressed bytes, not pixels; a sample with a video file
(and no image) becomes a `VideoSample` holding the video's bytes. Decoding happens later, once,
in `decode_pixels` (images) or `vlpt.data.video.decode_clip` (videos). Nothing here raises on bad
data: every rejected sample is counted in a `SkipCounter` under a `SkipReason`.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
"""File extensions of the media file of an image sample, in order of preference."""

VIDEO_EXTENSIONS: tuple[str, ...] = ("mp4", "webm", "mkv", "avi", "mov")
"""File extensions of the media file of a video sample (used when no image file is present)."""


class SkipReason(str, Enum):
    """Why a sample (or a whole shard) was not used. The value is the name shown in reports."""

    MISSING_IMAGE = "missing_image"
    """The sample has no media file: no jpg/jpeg/png/webp image, no mp4/webm/mkv/avi/mov video."""
    EMPTY_FILE = "empty_file"
    """The image, video or caption file has zero bytes."""
    UNDECODABLE_IMAGE = "undecodable_image"
    """The image file is not an image PIL can read, or its data is truncated."""
    IMAGE_TOO_LARGE = "image_too_large"
    """Width * height (read from the header) exceeds `max_image_pixels`: a decompression bomb
    (for a video: its frame size)."""
    UNDECODABLE_VIDEO = "undecodable_video"
    """The video file is not a container FFmpeg can open, or a sampled frame fails to decode."""
    TRUNCATED_VIDEO = "truncated_video"
    """The video is an MP4/MOV file cut short (its boxes run past the end of the file) that
    cannot give the sampled frames."""
    NO_VIDEO_STREAM = "no_video_stream"
    """The video container holds no video stream (e.g. audio only)."""
    UNSUPPORTED_CODEC = "unsupported_codec"
    """The video stream's codec has no decoder in this FFmpeg build."""
    CLIP_OUT_OF_RANGE = "clip_out_of_range"
    """The clip chosen from `json["clips"]` lies outside the video, or is not a [start, end]
    pair of seconds."""
    MISSING_CAPTION = "missing_caption"
    """The sample has no txt file."""
    EMPTY_CAPTION = "empty_caption"
    """The txt file holds only whitespace."""
    BAD_UTF8 = "bad_utf8"
    """The txt file is not valid UTF-8."""
    TRUNCATED_TAR = "truncated_tar"
    """The shard ends in the middle of a file or without its end-of-archive marker (counted once
    per shard; the samples before the cut are used)."""
    EMPTY_SHARD = "empty_shard"
    """The shard holds no sample at all."""
    UNREADABLE_SHARD = "unreadable_shard"
    """The shard cannot be opened (missing file, HTTP error, failing pipe) or is not a tar."""


class SkipCounter(Counter):
    """Counts of skipped samples (and shards) by reason name: `{"bad_utf8": 2, ...}`."""

    def add(self, reason: SkipReason, n: int = 1) -> None:
        """Count `n` more skips for `reason`."""
        self[reason.value] += n

    def take(self) -> dict[str, int]:
        """The counts so far as a plain dict, and reset to zero (one batch's worth of skips)."""
        counts = dict(self)
        self.clear()
        return counts

    def report(self) -> str:
        """One line for logs: `skipped 3: bad_utf8=1 undecodable_image=2` or `skipped 0`."""
        total = sum(self.values())
        details = " ".join(f"{name}={n}" for name, n in sorted(self.items()) if n)
        return f"skipped {total}: {details}" if details else "skipped 0"


@dataclass(slots=True)
class Sample:
    """A sample that passed the cheap checks; its image header is read, its pixels are not."""

    key: str
    image: Image.Image
    """Lazily opened PIL image (header parsed, data still compressed)."""
    captions: list[str]
    """Non-empty lines of the txt file, stripped."""
    meta_bytes: bytes | None = None
    """The raw json file, parsed only when asked (`Sample.meta`)."""
    source: int = 0
    """Index of the source the sample came from (set by the caller)."""
    url: str = ""
    """The shard the sample was read from."""
    twin: bytes | None = None
    """The `twin.jpg` file, if any: the same scene with one thing changed, a hard-negative
    image whose captions are json `twin_captions` (`data.twin_pairs`)."""

    def meta(self) -> dict[str, Any]:
        """The json metadata as a dict, or `{}` when there is none or it is not a JSON object."""
        return _parse_meta(self.meta_bytes)


@dataclass(slots=True)
class VideoSample:
    """A video sample that passed the cheap checks; its container is opened only when decoded."""

    key: str
    data: bytes
    """The compressed video file (`ext`)."""
    ext: str
    captions: list[str]
    """Non-empty lines of the txt file, stripped."""
    meta_bytes: bytes | None = None
    """The raw json file, parsed only when asked (`VideoSample.meta`)."""
    source: int = 0
    """Index of the source the sample came from (set by the caller)."""
    url: str = ""
    """The shard the sample was read from."""

    def meta(self) -> dict[str, Any]:
        """The json metadata as a dict (video2dataset: `clips`, `duration`...), or `{}`."""
        return _parse_meta(self.meta_bytes)


def _parse_meta(meta_bytes: bytes | None) -> dict[str, Any]:
    if not meta_bytes:
        return {}
    try:
        meta = json.loads(meta_bytes)
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def parse_sample(
    raw: dict[str, Any], *, max_image_pixels: int, skips: SkipCounter, source: int = 0
) -> Sample | VideoSample | None:
    """Check a raw sample and open its image lazily; count and return None when it is unusable.

    Checks run cheapest first; the image header is read (PIL's lazy `Image.open`) to reject
    non-images and decompression bombs before any pixel is decoded. A sample with a video file
    and no image file becomes a `VideoSample` (bytes kept as they are; checked when decoded).
    """
    checked = _check(raw, max_image_pixels)
    if isinstance(checked, SkipReason):
        skips.add(checked)
        return None
    if isinstance(checked, VideoSample):
        checked.source = source
        return checked
    image, captions = checked
    url = raw.get("__url__", "")
    return Sample(
        raw["__key__"], image, captions, raw.get("json"), source, url, raw.get("twin.jpg")
    )


def _check(
    raw: dict[str, Any], max_pixels: int
) -> tuple[Image.Image, list[str]] | VideoSample | SkipReason:
    """The lazily opened image and the captions of a raw sample, or why it is unusable."""
    image_bytes = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image_bytes is None:
        return _check_video(raw)
    captions = caption_lines(raw.get("txt"))
    if isinstance(captions, SkipReason):
        return captions
    if not image_bytes:
        return SkipReason.EMPTY_FILE
    image = open_image(image_bytes, max_pixels)
    return image if isinstance(image, SkipReason) else (image, captions)


def _check_video(raw: dict[str, Any]) -> VideoSample | SkipReason:
    ext = next((ext for ext in VIDEO_EXTENSIONS if ext in raw), None)
    if ext is None:
        return SkipReason.MISSING_IMAGE
    captions = caption_lines(raw.get("txt"))
    if isinstance(captions, SkipReason):
        return captions
    if not raw[ext]:
        return SkipReason.EMPTY_FILE
    return VideoSample(
        raw["__key__"], raw[ext], ext, captions, raw.get("json"), url=raw.get("__url__", "")
    )


def caption_lines(text: bytes | None) -> list[str] | SkipReason:
    """Non-empty stripped lines of the txt file, or why there are none."""
    if text is None:
        return SkipReason.MISSING_CAPTION
    if not text:
        return SkipReason.EMPTY_FILE
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return SkipReason.BAD_UTF8
    captions = [line.strip() for line in lines if line.strip()]
    return captions or SkipReason.EMPTY_CAPTION


def open_image(data: bytes, max_pixels: int) -> Image.Image | SkipReason:
    """Open image bytes lazily (header only), or why they cannot be used."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return SkipReason.IMAGE_TOO_LARGE
    except Exception:  # PIL raises many types for garbage input; all mean "not an image"
        return SkipReason.UNDECODABLE_IMAGE
    width, height = image.size
    if width * height > max_pixels:
        return SkipReason.IMAGE_TOO_LARGE
    if width < 1 or height < 1:
        return SkipReason.UNDECODABLE_IMAGE
    return image


def decode_pixels(
    sample: Sample,
    transform: Callable[[Image.Image, random.Random | None], np.ndarray],
    rng: random.Random | None,
    skips: SkipCounter,
) -> np.ndarray | None:
    """Decode, crop and resize the sample's image -> uint8 (S, S, 3); None (counted) if it fails."""
    try:
        return transform(sample.image, rng)
    except Exception:  # truncated data, corrupt stream: never stop training on one bad image
        skips.add(SkipReason.UNDECODABLE_IMAGE)
        return None
    finally:
        sample.image.close()
