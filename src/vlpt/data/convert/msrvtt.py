"""MSR-VTT -> video shards, one sample per video: the mp4 as it is, all its captions, metadata.

Annotation files, any number of them, in any mix:
- The original release, `train_val_videodatainfo.json` and `test_videodatainfo.json`, or
  CLIP4Clip's `MSRVTT_data.json` (the same schema, all 10,000 videos):

      {"info": {...},
       "videos": [{"video_id": "video0", "split": "train" | "validate" | "test", "category": 9,
                   "url": "https://www.youtube.com/watch?v=...", "start time": 137.72,
                   "end time": 149.44, "id": 0}, ...],
       "sentences": [{"video_id": "video0", "caption": "a car is shown", "sen_id": 0}, ...]}

  gives splits `train`, `val` (from "validate") and `test`, with the 20 captions of each video.
- The 1k-A test set of JSFusion: `MSRVTT_JSFUSION_test.csv` (columns
  `key,vid_key,video_id,sentence`) or a JSON list such as Singularity's `msrvtt_test1k.json`
  (`[{"video": "video7579.mp4", "caption": "..."}, ...]`) gives split `test1k`, with the
  captions the file lists (one a video: the standard 1k-A protocol).

A video is found as `VIDEOS/<video_id>.<mp4|webm|mkv|avi|mov>` in the first of the video folders
that has it. The key is the video id; the json holds the ids, split, category, YouTube url and
clip times, and width, height, duration, fps and frame count read from the container header.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
from tqdm import tqdm

from vlpt.data.convert.output import (
    ConversionError,
    ShardOutput,
    SkipItem,
    SkipTally,
    check_dir,
    check_file,
    check_shard_size,
    check_splits,
    clean_caption,
    finish_conversion,
    load_json,
    make_sample,
    prepare_out_dir,
    sample_key,
)

TEST1K = "test1k"
SPLITS: tuple[str, ...] = ("train", "val", "test", TEST1K)
"""Output splits: the official train / validate / test, and the 1k-A test set."""
VIDEO_EXTENSIONS: tuple[str, ...] = ("mp4", "webm", "mkv", "avi", "mov")
_OFFICIAL_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}
_DETAILS = {
    "category": "category",
    "url": "url",
    "start time": "start_time",
    "end time": "end_time",
}
_CSV_COLUMNS = ("video_id", "sentence")


@dataclass
class MsrvttVideo:
    """One video of one output split and the captions the annotations give it."""

    video_id: str
    split: str
    captions: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def convert_msrvtt(
    annotations: Sequence[str | Path],
    videos: Sequence[str | Path],
    out_dir: str | Path,
    *,
    splits: Sequence[str] | None = None,
    shard_size: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the videos of MSR-VTT annotation files as shards under `out_dir/{split}/`.

    `videos`: folders holding `video0.mp4` ... (searched in order). `splits`: the splits to
    write (default: every split the annotations have). Returns the same summary as
    `convert_karpathy`. Raises `ConversionError` for an unusable input;
    videos that are missing, unreadable or without captions are skipped and counted.
    """
    check_shard_size(shard_size)
    if not annotations:
        raise ConversionError("no MSR-VTT annotation file given; pass at least one.")
    if not videos:
        raise ConversionError("no video folder given; pass the folder that holds video0.mp4 ...")
    paths, folders, out = [Path(a) for a in annotations], [Path(v) for v in videos], Path(out_dir)
    skips = SkipTally()
    items = read_annotations(paths, skips)
    for folder in folders:
        check_dir(folder, "video folder", "video0.mp4, video1.mp4 ...")
    wanted = _wanted_splits(items, splits, ", ".join(map(str, paths)))
    prepare_out_dir(out)

    start = time.perf_counter()
    todo = [item for item in items if item.split in wanted]
    with ShardOutput(out, shard_size) as output:
        for item in tqdm(todo, unit="video", desc="vlpt data convert msrvtt", disable=not progress):
            try:
                output.write(item.split, video_sample(item, folders, output))
            except SkipItem as skip:
                skips.add(skip.reason, skip.example, skip.split)
        written = output.close()
    info = {
        "name": "msrvtt",
        "format": "msrvtt",
        "annotations": [str(p) for p in paths],
        "media": [str(f) for f in folders],
        "shard_size": shard_size,
    }
    return finish_conversion(out, info, written, skips, time.perf_counter() - start)


def read_annotations(paths: Sequence[Path], skips: SkipTally) -> list[MsrvttVideo]:
    """The videos of all annotation files, in file order; a video listed twice in the same
    split is kept once (counted as `duplicate_video`). 1k-A videos get the category, url and
    clip times of the official files when those are given too."""
    items: dict[tuple[str, str], MsrvttVideo] = {}
    for path in paths:
        for item in read_annotation_file(path, skips):
            if (item.split, item.video_id) in items:
                skips.add("duplicate_video", f"{item.video_id} in {path.name}", item.split)
            else:
                items[item.split, item.video_id] = item
    official = {v.video_id: v.meta for v in items.values() if v.split != TEST1K}
    for item in items.values():
        if item.split == TEST1K and item.video_id in official:
            details = official[item.video_id]
            item.meta.update({k: details[k] for k in _DETAILS.values() if k in details})
            item.meta["msrvtt_split"] = details["split"]
    return list(items.values())


def read_annotation_file(path: Path, skips: SkipTally) -> list[MsrvttVideo]:
    """The videos of one annotation file, whichever of the supported formats it is."""
    if path.suffix.lower() == ".csv":
        return read_test1k_csv(path, skips)
    data = load_json(path, "annotation file")
    if isinstance(data, dict) and isinstance(data.get("videos"), list):
        if not isinstance(data.get("sentences"), list):
            raise ConversionError(
                f"{path} has a 'videos' list but no 'sentences' list; pass the MSR-VTT file "
                "with captions (train_val_videodatainfo.json, test_videodatainfo.json)."
            )
        return read_videodatainfo(data, path, skips)
    if isinstance(data, list) and any(isinstance(r, dict) and "caption" in r for r in data):
        return read_test1k_json(data, path, skips)
    raise ConversionError(
        f"{path} is not an MSR-VTT annotation file: expected a 'videos' + 'sentences' object "
        "(train_val_videodatainfo.json) or a list of {'video', 'caption'} records (1k-A test)."
    )


def read_videodatainfo(data: dict[str, Any], path: Path, skips: SkipTally) -> list[MsrvttVideo]:
    """Videos of the official schema, with the captions `sentences` gives each."""
    captions: dict[str, list[str]] = {}
    for sentence in data["sentences"]:
        if isinstance(sentence, dict) and isinstance(sentence.get("video_id"), str):
            caption = clean_caption(sentence.get("caption") or "")
            if caption:
                captions.setdefault(sentence["video_id"], []).append(caption)
    videos = []
    for index, video in enumerate(data["videos"]):
        if not isinstance(video, dict) or not isinstance(video.get("video_id"), str):
            skips.add("malformed_entry", f"{path.name} video {index}")
            continue
        split = _OFFICIAL_SPLITS.get(str(video.get("split")))
        if split is None:
            skips.add("unknown_split", f"{video['video_id']} split {video.get('split')!r}")
            continue
        meta = {"video_id": video["video_id"], "split": video["split"]}
        meta.update({new: video[old] for old, new in _DETAILS.items() if old in video})
        if "id" in video:
            meta["id"] = video["id"]
        videos.append(
            MsrvttVideo(video["video_id"], split, captions.get(video["video_id"], []), meta)
        )
    return videos


def read_test1k_csv(path: Path, skips: SkipTally) -> list[MsrvttVideo]:
    """Videos of a JSFusion 1k-A csv (`key,vid_key,video_id,sentence`), captions grouped."""
    check_file(path, "annotation file")
    try:
        with open(path, newline="", encoding="utf-8") as stream:
            reader = csv.DictReader(stream)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error):
        raise ConversionError(
            f"{path} is not a UTF-8 csv file; pass MSRVTT_JSFUSION_test.csv."
        ) from None
    if not all(column in columns for column in _CSV_COLUMNS):
        raise ConversionError(
            f"{path} has no 'video_id' and 'sentence' columns (it has: {', '.join(columns) or 'none'}); "
            "pass MSRVTT_JSFUSION_test.csv (key,vid_key,video_id,sentence)."
        )
    records = [(row.get("video_id"), row.get("sentence")) for row in rows]
    return _group_test1k(records, path, skips)


def read_test1k_json(data: list[Any], path: Path, skips: SkipTally) -> list[MsrvttVideo]:
    """Videos of a 1k-A JSON list: records `{"video": "video7579.mp4" | "video_id": "video7579",
    "caption": str | [str, ...]}`, captions grouped."""
    records: list[tuple[Any, Any]] = []
    for record in data:
        if not isinstance(record, dict):
            records.append((None, None))
            continue
        video = record.get("video_id") or record.get("video")
        video_id = Path(video).stem if isinstance(video, str) else None
        caption = record.get("caption")
        for text in caption if isinstance(caption, list) else [caption]:
            records.append((video_id, text))
    return _group_test1k(records, path, skips)


def _group_test1k(
    records: list[tuple[Any, Any]], path: Path, skips: SkipTally
) -> list[MsrvttVideo]:
    videos: dict[str, MsrvttVideo] = {}
    for index, (video_id, text) in enumerate(records):
        if not isinstance(video_id, str) or not video_id.strip():
            skips.add("malformed_entry", f"{path.name} record {index}", TEST1K)
            continue
        video_id = video_id.strip()
        if video_id not in videos:
            meta = {"video_id": video_id, "split": TEST1K}
            videos[video_id] = MsrvttVideo(video_id, TEST1K, [], meta)
        caption = clean_caption(text or "")
        if caption:
            videos[video_id].captions.append(caption)
    return list(videos.values())


def video_sample(item: MsrvttVideo, folders: Sequence[Path], output: ShardOutput) -> dict[str, Any]:
    """The shard sample of `item`; raises `SkipItem` when it has no caption or its video is
    missing, empty or not a video."""
    if not item.captions:
        raise SkipItem("no_captions", item.video_id, item.split)
    key = sample_key(item.video_id)
    if output.has(item.split, key):
        raise SkipItem("duplicate_key", item.video_id, item.split)
    path = find_video(item, folders)
    try:
        data = path.read_bytes()
    except OSError:
        raise SkipItem("unreadable_file", str(path), item.split) from None
    if not data:
        raise SkipItem("empty_file", str(path), item.split)
    header = probe_video(data, str(path), item.split)
    meta = {
        "key": key,
        **item.meta,
        "filename": path.name,
        **header,
        "captions_n": len(item.captions),
    }
    return make_sample(key, path.suffix[1:].lower(), data, item.captions, meta)


def find_video(item: MsrvttVideo, folders: Sequence[Path]) -> Path:
    """`FOLDER/<video_id>.<ext>` in the first folder that has it; raises `SkipItem` if none."""
    for folder in folders:
        for ext in VIDEO_EXTENSIONS:
            path = folder / f"{item.video_id}.{ext}"
            if path.is_file():
                return path
    raise SkipItem("missing_video", str(folders[0] / f"{item.video_id}.mp4"), item.split)


def probe_video(data: bytes, name: str, split: str) -> dict[str, Any]:
    """Width, height, duration (s), fps and frames from the container header, without decoding
    a frame; raises `SkipItem` when PyAV cannot open it or it has no video stream."""
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            if container.duration:
                duration = container.duration / av.time_base
            elif stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = None
            rate = stream.average_rate
            return {
                "width": stream.width,
                "height": stream.height,
                "duration": None if duration is None else round(duration, 3),
                "fps": None if not rate else round(float(rate), 3),
                "frames": stream.frames or None,
            }
    except (av.error.FFmpegError, IndexError, OSError):
        raise SkipItem("undecodable_video", name, split) from None


def _wanted_splits(
    items: list[MsrvttVideo], requested: Sequence[str] | None, source: str
) -> list[str]:
    """The output splits to write: `requested`, checked against the annotations, or all."""
    present = [s for s in SPLITS if any(item.split == s for item in items)]
    if not present:
        raise ConversionError(f"{source} lists no usable video; pass MSR-VTT annotation files.")
    if not requested:
        return present
    for split in requested:
        if split not in SPLITS:
            raise ConversionError(f"unknown split '{split}'; choose from {', '.join(SPLITS)}.")
    check_splits(list(requested), present, source)
    return list(requested)
