"""Caption image and video files (`vlpt caption PATH...`).

    for result in caption_files(model, tokenizer, ["cat.jpg", "dog.mp4"], num_beams=3):
        print(result.path, result.caption or result.error)

Files are read with `vlpt.data.MediaFileReader` (the evaluation preprocessing: resize + center
crop; a video's middle frames of `num_frames` equal segments) and captioned in batches that hold
images only or clips only. A file that cannot be read gives a result with `error` set and the
others go on.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlpt.data import MediaFileReader, UnreadableMedia, normalize_pixels
from vlpt.data.loader import DEFAULT_NUM_FRAMES, batched_by_modality
from vlpt.eval.caption import captioning_config
from vlpt.eval.embed import evaluation_mode
from vlpt.models import GenerationConfig, Tokenizer, VisionLanguageModel, caption_images


@dataclass(frozen=True)
class FileCaption:
    """The caption of one input file, or why there is none."""

    path: str
    caption: str | None = None
    error: str | None = None
    """One sentence naming the file and the reason (`cannot read 'x.jpg': undecodable_image`)."""


def caption_files(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    paths: Sequence[str],
    *,
    batch_size: int = 16,
    num_frames: int = DEFAULT_NUM_FRAMES,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    config: GenerationConfig | None = None,
    **options: Any,
) -> Iterator[FileCaption]:
    """One `FileCaption` per path. `options` are `GenerationConfig` fields (default greedy).

    Captions come a batch at a time: within images and within videos in input order, the two
    kinds interleaved as their batches fill; unreadable files come out before the next batch.
    A model without a caption decoder is a `ConfigError` before any file is read.
    """
    generation = captioning_config(model, config, **options)
    reader = MediaFileReader(model.image_size, num_frames)
    failed: list[FileCaption] = []
    items = _readable(paths, reader, failed)
    batches = batched_by_modality(items, batch_size=batch_size, collate=_collate, partial=True)
    with evaluation_mode(model, device, precision):
        for batch in batches:
            yield from _drain(failed)
            pixels = normalize_pixels(batch["pixels"], model.image_mean, model.image_std)
            texts = caption_images(model, tokenizer, pixels.to(device), config=generation)
            yield from (FileCaption(path, text) for path, text in zip(batch["path"], texts))
    yield from _drain(failed)


def _readable(
    paths: Iterable[str], reader: MediaFileReader, failed: list[FileCaption]
) -> Iterator[tuple[np.ndarray, str]]:
    """(uint8 pixels, path) of each file that reads; the others are appended to `failed`."""
    for path in paths:
        try:
            yield reader(path), path
        except UnreadableMedia as e:
            failed.append(FileCaption(path, error=str(e)))


def _collate(items: list[tuple[np.ndarray, str]]) -> dict[str, Any]:
    return {"pixels": np.stack([pixels for pixels, _ in items]), "path": [p for _, p in items]}


def _drain(failed: list[FileCaption]) -> Iterator[FileCaption]:
    while failed:
        yield failed.pop(0)
