"""COCO and Flickr30k with Karpathy's splits -> image shards, one sample per image.

The annotation file is `dataset_coco.json` or `dataset_flickr30k.json` (or `dataset_flickr8k.json`):

    {"images": [{"filepath": "val2014",                      (COCO only)
                 "filename": "COCO_val2014_000000391895.jpg",
                 "split": "train" | "val" | "test" | "restval",
                 "sentences": [{"raw": "A man with a red helmet ...", "tokens": [...], ...}, ...],
                 "cocoid": 391895 | "imgid": 0, "sentids": [...]}, ...],
     "dataset": "coco"}

An image is looked up at `IMAGES/filepath/filename`, then `IMAGES/filename` (so `IMAGES` may be
COCO's root holding `train2014/` and `val2014/`, or `flickr30k-images/`). The key is the file
name without its extension (`COCO_val2014_000000391895`, `1000092795`), the txt holds the `raw`
sentences (whitespace collapsed), the json the ids, file name, split and size.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from vlpt.data.convert.output import (
    ConversionError,
    ShardOutput,
    SkipItem,
    SkipTally,
    check_dir,
    check_shard_size,
    check_splits,
    clean_caption,
    finish_conversion,
    load_json,
    make_sample,
    prepare_out_dir,
    sample_key,
)

SPLITS: tuple[str, ...] = ("train", "val", "test", "restval")
"""Split names of Karpathy's files; restval (COCO val2014 images outside val/test) is its own
split unless folded into train."""
_KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # MPO: JPEG + extras
_ID_FIELDS = ("cocoid", "imgid", "sentids")


@dataclass(frozen=True)
class KarpathyImage:
    """One entry of the annotation file whose structure is usable."""

    split: str
    """The output split (restval becomes train when folded)."""
    entry: dict[str, Any]
    """The entry as in the file."""

    @property
    def filename(self) -> str:
        return self.entry["filename"]

    @property
    def filepath(self) -> str:
        filepath = self.entry.get("filepath")
        return filepath if isinstance(filepath, str) else ""


def convert_karpathy(
    annotations: str | Path,
    images: str | Path,
    out_dir: str | Path,
    *,
    splits: Sequence[str] | None = None,
    restval_into_train: bool = False,
    shard_size: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the images of a Karpathy-split file as shards under `out_dir/{split}/`.

    `splits`: the splits to write (default: every split in the file). `restval_into_train`
    writes restval images into train (the usual 113k-image COCO training set). Returns the
    summary: `{"out_dir", "name", "splits": {split: {"items", "captions", "shards", "skipped"}},
    "skipped": {reason: n}, "report", "seconds"}`. Raises `ConversionError` for an unusable
    input; images that are missing, unreadable or without captions are skipped and counted.
    """
    check_shard_size(shard_size)
    annotations, images, out = Path(annotations), Path(images), Path(out_dir)
    entries, dataset = read_annotations(annotations)
    check_dir(images, "image folder", "train2014/ and val2014/ (COCO) or the Flickr30k images")
    wanted = _wanted_splits(entries, splits, restval_into_train, annotations)
    prepare_out_dir(out)

    start = time.perf_counter()
    skips = SkipTally()
    with ShardOutput(out, shard_size) as output:
        bar = tqdm(entries, unit="img", desc="vlpt data convert karpathy", disable=not progress)
        for index, entry in enumerate(bar):
            try:
                item = parse_entry(entry, index, restval_into_train)
                if item.split in wanted:
                    output.write(item.split, image_sample(item, images, output))
            except SkipItem as skip:
                skips.add(skip.reason, skip.example, skip.split)
        written = output.close()
    info = {
        "name": f"{dataset}-karpathy" if dataset else "karpathy",
        "format": "karpathy",
        "annotations": [str(annotations)],
        "media": [str(images)],
        "shard_size": shard_size,
        "restval_into_train": restval_into_train,
    }
    return finish_conversion(out, info, written, skips, time.perf_counter() - start)


def read_annotations(path: Path) -> tuple[list[Any], str]:
    """The `images` list of a Karpathy-split file and its `dataset` name ("" if none)."""
    data = load_json(path, "annotation file")
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConversionError(
            f"{path} is not a Karpathy-split annotation file: it has no 'images' list (expected "
            "dataset_coco.json or dataset_flickr30k.json)."
        )
    dataset = data.get("dataset")
    return entries, dataset if isinstance(dataset, str) else ""


def parse_entry(entry: Any, index: int, restval_into_train: bool) -> KarpathyImage:
    """The entry at `index` if it names a file and a known split; raises `SkipItem` if not."""
    if not isinstance(entry, dict) or not isinstance(entry.get("filename"), str):
        raise SkipItem("malformed_entry", f"entry {index}")
    split = entry.get("split")
    if split not in SPLITS:
        raise SkipItem("unknown_split", f"entry {index} split {split!r}")
    if split == "restval" and restval_into_train:
        split = "train"
    return KarpathyImage(split, entry)


def image_sample(item: KarpathyImage, root: Path, output: ShardOutput) -> dict[str, Any]:
    """The shard sample of `item`; raises `SkipItem` when it has no caption, its image is
    missing or unreadable, or its key was already written."""
    captions = entry_captions(item.entry)
    if not captions:
        raise SkipItem("no_captions", item.filename, item.split)
    key = sample_key(Path(item.filename).stem)
    if output.has(item.split, key):
        raise SkipItem("duplicate_key", item.filename, item.split)
    path = find_image(item, root)
    try:
        data = path.read_bytes()
    except OSError:
        raise SkipItem("unreadable_file", str(path), item.split) from None
    ext, media, width, height = image_media(data, str(path), item.split)
    meta = {
        "key": key,
        "filename": item.filename,
        **({"filepath": item.filepath} if item.filepath else {}),
        "split": item.entry["split"],
        **{name: item.entry[name] for name in _ID_FIELDS if name in item.entry},
        "width": width,
        "height": height,
        "captions_n": len(captions),
    }
    return make_sample(key, ext, media, captions, meta)


def entry_captions(entry: dict[str, Any]) -> list[str]:
    """The entry's sentences in file order: `raw`, or the joined `tokens` when raw is empty."""
    sentences = entry.get("sentences")
    captions = []
    for sentence in sentences if isinstance(sentences, list) else []:
        if not isinstance(sentence, dict):
            continue
        caption = clean_caption(sentence.get("raw") or "")
        tokens = sentence.get("tokens")
        if not caption and isinstance(tokens, list):
            caption = clean_caption(" ".join(map(str, tokens)))
        if caption:
            captions.append(caption)
    return captions


def find_image(item: KarpathyImage, root: Path) -> Path:
    """`root/filepath/filename`, else `root/filename`; raises `SkipItem` when neither exists."""
    candidates = [root / item.filepath / item.filename, root / item.filename]
    for path in candidates[: 2 if item.filepath else 1]:
        if path.is_file():
            return path
    raise SkipItem("missing_image", str(candidates[0]), item.split)


def image_media(data: bytes, name: str, split: str) -> tuple[str, bytes, int, int]:
    """(extension, bytes, width, height) of an image file read from the header only.

    JPEG, PNG and WebP bytes are kept as they are; another format PIL reads (GIF, BMP, TIFF...)
    is re-encoded to PNG (lossless), since shard readers expect jpg/png/webp. Raises `SkipItem`
    for an empty file or one that is not an image.
    """
    if not data:
        raise SkipItem("empty_file", name, split)
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if image.format in _KEEP_FORMATS:
            return _KEEP_FORMATS[image.format], data, width, height
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "PNG")
    except Exception:  # PIL raises many types for garbage input; all mean "not an image"
        raise SkipItem("undecodable_image", name, split) from None
    return "png", buffer.getvalue(), width, height


def _wanted_splits(
    entries: list[Any], requested: Sequence[str] | None, restval_into_train: bool, path: Path
) -> list[str]:
    """The output splits to write: `requested`, checked against the file, or all it has."""
    in_file = {e.get("split") for e in entries if isinstance(e, dict)}
    if restval_into_train and "restval" in in_file:
        in_file.add("train")
    present = [s for s in SPLITS if s in in_file and not (s == "restval" and restval_into_train)]
    if not present:
        raise ConversionError(
            f"{path} has no image in a train, val, test or restval split; pass a Karpathy-split "
            "file (dataset_coco.json or dataset_flickr30k.json)."
        )
    if not requested:
        return present
    for split in requested:
        if split not in SPLITS:
            raise ConversionError(f"unknown split '{split}'; choose from {', '.join(SPLITS)}.")
        if split == "restval" and restval_into_train:
            raise ConversionError(
                "restval is written into train when folding it in; ask for split 'train'."
            )
    check_splits(list(requested), present, str(path))
    return list(requested)
