"""Tiny WebDataset shards for the data tests, generated on the fly (no binary files in the repo).

Captions of generated samples are three integers, `"<source> <shard> <item>"`, so that
`IdTokenizer` can turn a training batch's `text` back into the identity of every sample.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Normalisation of the loader tests (easy to invert by hand).
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def image_bytes(width: int = 40, height: int = 32, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A small smooth random image (colour gradient + blobs), encoded as JPEG/PNG/WEBP."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [
        rng.uniform(0, 255) + rng.uniform(-120, 120) * (xs * a + ys * (1 - a))
        for a in rng.uniform(0, 1, 3)
    ]
    pixels = np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def halves_jpeg(width: int = 64, height: int = 48) -> bytes:
    """Left half pure red, right half pure blue (tells a horizontal flip apart)."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims width x height pixels (over twice PIL's bomb limit) with almost
    no data: PIL's Image.open raises DecompressionBombError from the header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def sample(
    key: str,
    caption: str | bytes | None = "0 0 0",
    image: bytes | None = None,
    ext: str = "jpg",
    meta: dict | None = None,
) -> dict:
    """One sample as {"__key__", ext: bytes}; `caption=None` / `image=None` leave the file out,
    `image` defaults to a fresh JPEG."""
    files: dict = {"__key__": key}
    files[ext] = image_bytes(seed=zlib.crc32(key.encode()) % 1000) if image is None else image
    if caption is not None:
        files["txt"] = caption.encode() if isinstance(caption, str) else caption
    if meta is not None:
        files["json"] = json.dumps(meta).encode()
    return files


def write_shard(path: Path, samples: list[dict]) -> Path:
    """Write samples (dicts of extension -> bytes, plus "__key__") as an uncompressed tar."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for files in samples:
            for ext, data in files.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{files['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_dataset(
    folder: Path, *, n_shards: int = 2, per_shard: int = 8, source: int = 0
) -> list[Path]:
    """img2dataset-style shards: `{shard:05d}.tar`, keys `%09d`, `.jpg/.txt/.json`, plus the
    `.parquet` and `_stats.json` side files img2dataset writes next to each tar."""
    paths = []
    for s in range(n_shards):
        samples = [
            sample(
                f"{s * per_shard + i:09d}",
                f"{source} {s} {i}",
                image_bytes(seed=1000 * source + 100 * s + i),
                meta={"shard": s, "item": i},
            )
            for i in range(per_shard)
        ]
        paths.append(write_shard(folder / f"{s:05d}.tar", samples))
        (folder / f"{s:05d}.parquet").write_bytes(b"PAR1 not really parquet")
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard}))
    return paths


class IdTokenizer:
    """Test tokenizer: `"a b c"` -> row [START, a, b, c, END, 0, ...] (0 pads, like open_clip's
    tokenizer); lets a test read sample ids back from a batch."""

    context_length = 8
    start, end = 1000, 1001

    def __call__(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.start, *(int(word) for word in text.split()), self.end][
                : self.context_length
            ]
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def sample_ids(batch: dict) -> list[tuple[int, int, int]]:
    """(source, shard, item) of every sample of a training batch tokenised by IdTokenizer."""
    return [tuple(row[1:4]) for row in batch["text"].tolist()]


class CaptionRecorder:
    """Test tokenizer that remembers every caption: row k = [index of the caption + 1, 0], so
    `recorder.texts(batch)` reads a batch's captions back."""

    def __init__(self) -> None:
        self.captions: list[str] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        rows = torch.zeros(len(texts), 2, dtype=torch.long)
        for k, text in enumerate(texts):
            self.captions.append(text)
            rows[k, 0] = len(self.captions)
        return rows

    def texts(self, batch: dict) -> list[str]:
        return [self.captions[int(i) - 1] for i in batch["text"][:, 0]]


def read_split(root: Path, split: str) -> list[dict[str, bytes]]:
    """All samples of a split with plain tarfile, as {"__key__", "jpg", "txt", "json"}."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((root / split).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                samples.setdefault(key, {"__key__": key.encode()})[ext] = data
    return [samples[k] for k in sorted(samples)]


def paired_loader(root: Path, pairs_key: str, *, image_size: int, **data: object) -> tuple:
    """A train loader over `root`/train (batches of 6, no shuffling, captions recorded) and the
    pairs the shards name: {caption: its partner's caption} from each sample's json
    `pairs_key` ("twin_captions", "reversed_captions"). For loaders that put each item and its
    partner side by side (`data.twin_pairs`, `data.reversed_pairs`)."""
    from vlpt.config import DataConfig
    from vlpt.data import build_train_loader

    recorder = CaptionRecorder()
    cfg = DataConfig(train=[str(root / "train")], workers=0, shuffle_buffer=1, **data)
    loader = build_train_loader(
        cfg, tokenizer=recorder, image_size=image_size, mean=MEAN, std=STD, batch_size=6
    )
    pairs: dict[str, str] = {}
    for sample in read_split(root, "train"):
        lines = sample["txt"].decode().splitlines()
        pairs.update(zip(lines, json.loads(sample["json"])[pairs_key], strict=True))
    return loader, recorder, pairs
