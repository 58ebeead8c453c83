"""Batches of image-text and video-text pairs for training (`build_train_loader`) and evaluation
(`iter_eval_batches`).

The training stream of one rank is a torch DataLoader over `TrainStream`; each dataloader worker
runs its own webdataset pipeline, built inside the worker so it knows its worker id:

    samples      resampled: shards of each source drawn with replacement, sources mixed by
                 weight; otherwise this rank+worker's share of one pass over all shards
    shuffle      cfg.shuffle_buffer samples, images and videos still compressed
    decode       image: random-resized crop -> uint8 (S, S, 3); video: cfg.num_frames sampled
                 frames, one crop box -> uint8 (T, S, S, 3); one caption line picked at random
    batched      one pending batch per modality, emitted when full (batches never mix images and
                 videos); normalise the whole batch at once, tokenise (cached), attach skip counts

Every random choice (shards, mixing, shuffle, crops, captions) comes from a `random.Random` seeded
with (cfg.seed, seed, rank, worker), and the DataLoader visits workers round-robin, so the same
arguments give the same batches.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from itertools import islice
from typing import Any, TypeVar

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vlpt.config import DataConfig, Source
from vlpt.data.pairs import Pixels, with_reversed_pair, with_twin
from vlpt.data.samples import Sample, SkipCounter, VideoSample, decode_pixels, parse_sample
from vlpt.data.shards import (
    DataSourceError,
    expand_urls,
    mix_by_weight,
    read_shard,
    resampled,
    shards_for_worker,
)
from vlpt.data.transforms import CropResize, EvalTransform, TrainTransform, normalize_pixels
from vlpt.data.video import ClipSampler, decode_clip

Tokenizer = Callable[[list[str]], torch.Tensor]

DEFAULT_MAX_IMAGE_PIXELS: int = DataConfig.model_fields["max_image_pixels"].default
DEFAULT_NUM_FRAMES: int = DataConfig.model_fields["num_frames"].default

CAPTION_CACHE_SIZE = 16384
"""Distinct captions whose token rows each worker keeps (see `CaptionTokens`)."""

MAX_UNDECODABLE_BEFORE_FIRST_IMAGE = 1000
"""A source whose first this-many images or videos (in one worker) all fail to decode is reported
as yielding nothing, rather than spinning forever on files with valid headers but corrupt data."""


def build_train_loader(
    cfg: DataConfig,
    *,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    tokenizer: Tokenizer,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> Iterable[dict[str, Any]]:
    """The training batches of one rank: `{"image": float32 (B, 3, S, S) normalised,
    "text": long (B, L), "skips": {reason: n}}`. `text` is cut to the longest caption of the
    batch (L <= the tokenizer's context length, padded with 0); `skips` counts what the producing
    worker skipped since its previous batch.

    Video samples (`mp4|webm|mkv|avi|mov`) give batches whose "image" is float32
    (B, T, 3, S, S), T = `cfg.num_frames`; a batch holds images only or videos only (one pending
    batch per modality in each worker, emitted when full).

    Infinite when `cfg.resampled` (shards drawn with replacement, sources mixed by
    `Source.weight`); otherwise one pass over all shards, split across ranks and workers, with
    each worker's last partial batch dropped. `rank`/`world_size` are given explicitly; no
    torch.distributed needed. Raises `DataSourceError` (naming the source) when a local pattern
    matches no file, and while iterating when a source yields no usable sample at all.
    """
    if not cfg.train:
        raise DataSourceError(
            "no training source is configured; set data.train to a shard pattern."
        )
    stream = TrainStream(
        cfg,
        [expand_urls(source.url) for source in cfg.train],
        image_size=image_size,
        mean=mean,
        std=std,
        tokenizer=tokenizer,
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
    )
    dataloader = DataLoader(
        stream,
        batch_size=None,  # batches are made in the workers
        num_workers=cfg.workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
    return TrainLoader(dataloader, cfg.train, resampled=cfg.resampled, batch_size=batch_size)


class TrainLoader:
    """Iterates the DataLoader, turning worker failures into one-sentence `DataSourceError`s."""

    def __init__(
        self, dataloader: DataLoader, sources: Sequence[Source], *, resampled: bool, batch_size: int
    ) -> None:
        self.dataloader = dataloader
        self.sources = list(sources)
        self.resampled = resampled
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n_batches = 0
        try:
            for batch in self.dataloader:
                n_batches += 1
                yield batch
        except DataSourceError as e:
            # Drop the traceback: its frames hold the DataLoader iterator in a reference cycle,
            # and workers shut down by a later garbage collection stall for 5 s.
            e.__traceback__ = None
            raise DataSourceError(_original_message(e)) from None
        if n_batches == 0:
            names = ", ".join(f"'{s.url}'" for s in self.sources)
            raise DataSourceError(
                f"the training sources {names} gave no full batch of "
                f"{self.batch_size} samples; check the skip counts and paths."
            )


def _original_message(error: DataSourceError) -> str:
    """A DataLoader re-raises a worker's exception with the worker's traceback as its message;
    keep only the original sentence."""
    last_line = str(error).strip().splitlines()[-1]
    _, found, message = last_line.partition("DataSourceError: ")
    return message if found else str(error)


class TrainStream(IterableDataset):
    """Batches of one rank; the pipeline is built in each worker (`__iter__`), seeded by worker."""

    def __init__(
        self,
        cfg: DataConfig,
        shard_urls: list[list[str]],
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        tokenizer: Tokenizer,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.shard_urls = shard_urls
        self.transform = TrainTransform(image_size, scale=cfg.crop_scale)
        self.mean, self.std = tuple(mean), tuple(std)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = _worker_position()
        key = f"{self.cfg.seed}/{self.seed}/{self.rank}/{worker}"
        skips = SkipCounter()
        buffer = self.cfg.shuffle_buffer
        shuffle = wds.shuffle(bufsize=buffer, initial=max(1, buffer // 4), rng=_rng(key, "shuffle"))
        clips = ClipSampler(
            self.transform, self.cfg.num_frames, max_pixels=self.cfg.max_image_pixels
        )
        decode = partial(
            _decode_train,
            transform=self.transform,
            clips=clips,
            rng=_rng(key, "crop"),
            skips=skips,
            sources=self.cfg.train,
            reversed_pairs=self.cfg.reversed_pairs,
            twin_pairs=self.cfg.twin_pairs,
            max_pixels=self.cfg.max_image_pixels,
        )
        tokens = CaptionTokens(self.tokenizer, CAPTION_CACHE_SIZE)
        collate = partial(_collate_train, tokens=tokens, mean=self.mean, std=self.std, skips=skips)
        pipeline = wds.DataPipeline(
            partial(self._samples, key, worker, num_workers, skips),
            shuffle if buffer > 1 else None,
            decode,
            partial(
                batched_by_modality, batch_size=self.batch_size, collate=collate, partial=False
            ),
        )
        return iter(pipeline)

    def _samples(
        self, key: str, worker: int, num_workers: int, skips: SkipCounter
    ) -> Iterator[Sample | VideoSample]:
        sources = self.cfg.train
        if self.cfg.resampled:
            streams = [
                resampled(
                    source,
                    urls,
                    _rng(key, f"shards/{i}"),
                    partial(self._read, source=i, skips=skips),
                )
                for i, (source, urls) in enumerate(zip(sources, self.shard_urls))
            ]
            return mix_by_weight(streams, [s.weight for s in sources], _rng(key, "mix"))
        every_shard = [(i, url) for i, urls in enumerate(self.shard_urls) for url in urls]
        mine = shards_for_worker(
            every_shard,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            seed=f"{self.cfg.seed}/{self.seed}/shard-order",  # the same on every rank
        )
        return (sample for i, url in mine for sample in self._read(url, source=i, skips=skips))

    def _read(self, url: str, *, source: int, skips: SkipCounter) -> Iterator[Sample | VideoSample]:
        for raw in read_shard(url, skips):
            sample = parse_sample(
                raw, max_image_pixels=self.cfg.max_image_pixels, skips=skips, source=source
            )
            if sample is not None:
                yield sample


def _decode_train(
    samples: Iterator[Sample | VideoSample],
    *,
    transform: CropResize,
    clips: ClipSampler,
    rng: random.Random,
    skips: SkipCounter,
    sources: Sequence[Source],
    reversed_pairs: bool = False,
    twin_pairs: bool = False,
    max_pixels: int = 64_000_000,
) -> Iterator[tuple[Pixels, str]]:
    decoded = [0] * len(sources)
    failed = [0] * len(sources)
    for sample in samples:
        crop_state = rng.getstate() if twin_pairs else ()  # a twin replays its image's crop
        if isinstance(sample, Sample):
            pixels = decode_pixels(sample, transform, rng, skips)
        else:
            pixels = decode_clip(sample, clips, rng, skips)
        if pixels is None:
            failed[sample.source] += 1
            if (
                not decoded[sample.source]
                and failed[sample.source] >= MAX_UNDECODABLE_BEFORE_FIRST_IMAGE
            ):
                kind = "images" if isinstance(sample, Sample) else "videos"
                raise DataSourceError(
                    f"source '{sources[sample.source].url}' yields no usable sample: its first "
                    f"{failed[sample.source]} {kind} could not be decoded."
                )
            continue
        decoded[sample.source] += 1
        if reversed_pairs and isinstance(sample, VideoSample):
            yield from with_reversed_pair(pixels, sample, rng)
        elif twin_pairs and isinstance(sample, Sample) and sample.twin is not None:
            yield from with_twin(pixels, sample, transform, crop_state, max_pixels, skips, rng)
        else:
            yield pixels, rng.choice(sample.captions)


T = TypeVar("T")


def batched_by_modality(
    items: Iterable[tuple[Pixels, T]],
    *,
    batch_size: int,
    collate: Callable[[list[tuple[Pixels, T]]], dict[str, Any]],
    partial: bool,
) -> Iterator[dict[str, Any]]:
    """Batches of `batch_size` items that are all images or all video clips.

    One pending batch per modality (told apart by the pixels' rank: 3 for an image, 4 for a
    clip); whichever fills first is emitted, so mixed sources keep their mixing ratio over time
    and no item waits for a batch of the other kind. As in webdataset's `batched`, a full batch
    is emitted when the next item arrives (so it carries the skips counted while reading up to
    that item) or at the end. With `partial`, unfilled batches are emitted at the end
    (evaluation); otherwise they are dropped.
    """
    pending: dict[int, list[tuple[Pixels, T]]] = {}
    full: list[int] = []  # modalities whose pending batch is full, in the order they filled
    for item in items:
        while full:
            yield collate(pending.pop(full.pop(0)))
        batch = pending.setdefault(item[0].ndim, [])
        batch.append(item)
        if len(batch) == batch_size:
            full.append(item[0].ndim)
    for batch in pending.values():
        if len(batch) == batch_size or (partial and batch):
            yield collate(batch)


def _collate_train(
    items: list[tuple[Pixels, str]],
    *,
    tokens: CaptionTokens,
    mean: Sequence[float],
    std: Sequence[float],
    skips: SkipCounter,
) -> dict[str, Any]:
    return {
        "image": normalize_pixels(np.stack([pixels for pixels, _ in items]), mean, std),
        "text": tokens([caption for _, caption in items]),  # (B, L) long
        "skips": skips.take(),
    }


class CaptionTokens:
    """`tokenizer` behind an LRU cache of the token rows of distinct captions.

    open_clip's BPE tokenizer is pure Python, and captions repeat (templates, paraphrases,
    class prompts), so the rows of recently seen captions are kept.
    """

    def __init__(self, tokenizer: Tokenizer, max_size: int = CAPTION_CACHE_SIZE) -> None:
        self.tokenizer = tokenizer
        self.max_size = max_size
        self.rows: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """list of B captions -> LongTensor (B, L), L the longest caption of the batch."""
        found: dict[str, torch.Tensor] = {}
        for caption in captions:
            row = self.rows.get(caption)
            if row is not None:
                self.rows.move_to_end(caption)
                found[caption] = row
        missing = [c for c in dict.fromkeys(captions) if c not in found]
        if missing:
            for caption, row in zip(missing, self.tokenizer(missing)):
                row = row[: _unpadded_length(row)]
                found[caption] = self.rows[caption] = row.clone()  # clone: don't pin the batch
            while len(self.rows) > self.max_size:
                self.rows.popitem(last=False)
        # Pad to the longest caption of this batch only: the text tower's cost grows with L.
        return torch.nn.utils.rnn.pad_sequence([found[c] for c in captions], batch_first=True)


def _unpadded_length(row: torch.Tensor) -> int:
    """Length of a token row without its trailing padding (pad id 0), at least 1."""
    nonzero = row.nonzero()
    return int(nonzero[-1]) + 1 if len(nonzero) else 1


# ---------------------------------------------------------------------------------------------
# Evaluation


def iter_eval_batches(
    sources: Sequence[Source],
    *,
    image_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int,
    max_items: int = 0,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> Iterator[dict[str, Any]]:
    """Evaluation batches in shard order, in this process: `{"image": float32 (B, 3, S, S),
    "captions": list of all caption lines per item, "key": list[str], "meta": list[dict]
    (parsed json or {}), "skips": {reason: n}}`. Resize + center crop, no shuffling; at most
    `max_items` items (0 = all). A source that yields no usable item raises `DataSourceError`.

    Video items give batches of "image" float32 (B, T, 3, S, S), T = `num_frames`: the middle
    frame of each of T equal segments of the video (or of its first `json["clips"]` range). A
    batch holds images only or videos only; with mixed sources, items of the kind that fills a
    batch first come out first."""
    skips = SkipCounter()
    transform = EvalTransform(image_size)
    clips = ClipSampler(transform, num_frames, max_pixels=max_image_pixels)
    items = _eval_items(sources, transform, clips, max_image_pixels, skips)
    if max_items:
        items = islice(items, max_items)
    collate = partial(_collate_eval, mean=mean, std=std, skips=skips)
    yield from batched_by_modality(items, batch_size=batch_size, collate=collate, partial=True)


def _eval_items(
    sources: Sequence[Source],
    transform: CropResize,
    clips: ClipSampler,
    max_image_pixels: int,
    skips: SkipCounter,
) -> Iterator[tuple[Pixels, Sample | VideoSample]]:
    for source in sources:
        n_items = 0
        for url in expand_urls(source.url):
            for raw in read_shard(url, skips):
                sample = parse_sample(raw, max_image_pixels=max_image_pixels, skips=skips)
                if sample is None:
                    continue
                if isinstance(sample, Sample):
                    pixels = decode_pixels(sample, transform, None, skips)
                else:
                    pixels = decode_clip(sample, clips, None, skips)
                if pixels is not None:
                    n_items += 1
                    yield pixels, sample
        if n_items == 0:
            raise DataSourceError(
                f"evaluation source '{source.url}' yields no usable sample; check the path "
                "and the skip counts."
            )


def _collate_eval(
    items: list[tuple[Pixels, Sample | VideoSample]],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    skips: SkipCounter,
) -> dict[str, Any]:
    return {
        "image": normalize_pixels(np.stack([pixels for pixels, _ in items]), mean, std),
        "captions": [sample.captions for _, sample in items],
        "key": [sample.key for _, sample in items],
        "meta": [sample.meta() for _, sample in items],
        "skips": skips.take(),
    }


def _worker_position() -> tuple[int, int]:
    """(worker id, number of workers) of the current dataloader worker; (0, 1) in-process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _rng(key: str, purpose: str) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, so they are stable across processes.
    return random.Random(f"{key}/{purpose}")
