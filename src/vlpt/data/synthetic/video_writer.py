"""Write the video world as WebDataset shards in video2dataset's layout.

    OUT_DIR/info.json                  seed, frames, fps, counts, vocabularies, held-out pairs
    OUT_DIR/{train,val,test}/00000.tar KEY.mp4 (H.264), KEY.txt (one caption a line), KEY.json
    OUT_DIR/{split}/00000_stats.json   per-shard stats
    OUT_DIR/{split}/sizes.json         {"00000.tar": count, ...}
    OUT_DIR/{split}/nshards.txt        number of shards

`vlpt data synth OUT --video` writes this under OUT/video/, next to the image splits. As for
images, every clip draws its randomness from (seed, split, index) alone, each shard is written by
one process, and x264 runs single-threaded without macroblock-tree rate control (which is not
reproducible), so the bytes do not depend on the worker count.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import av
import numpy as np
from PIL import Image

from vlpt.data.synthetic import world
from vlpt.data.synthetic.events import (
    ACTIONS,
    MOVES,
    REVERSE_ACTION,
    ClipSpec,
    ClipState,
    animate,
    sample_clip,
    start_scene,
)
from vlpt.data.synthetic.render import render_clip
from vlpt.data.synthetic.video_captions import make_clip_captions
from vlpt.data.synthetic.writer import write_splits, write_text

CRF = 16
"""x264 constant rate factor: low (near-lossless), the clips are tiny anyway (~3 KB)."""
_SPLIT_ID = {split: i for i, split in enumerate(world.SPLITS)}
# Keeps clip randomness apart from image randomness of the same (seed, split, index).
_VIDEO_STREAM = 1_000_003


@dataclass(frozen=True)
class VideoSettings:
    """Everything a clip depends on besides (split, index); fixes the output bytes."""

    seed: int
    size: int
    num_frames: int
    fps: int
    captions_per_clip: int
    held_out: tuple[tuple[str, str], ...]


def write_video_dataset(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = 20000,
    n_val: int = 1000,
    n_test: int = 1000,
    size: int = 64,
    num_frames: int = 16,
    fps: int = 8,
    shard_size: int = 1000,
    captions_per_clip: int = 5,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Generate the train/val/test clip shards of the video world under `out_dir`.

    Returns a summary: {"out_dir", "seed", "counts": {split: clips}, "shards": {split: n},
    "seconds", "clips_per_minute"}.
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    _check_args(seed, counts, size, num_frames, fps, shard_size, captions_per_clip, workers)
    out = Path(out_dir)
    held_out = world.held_out_pairs(seed)
    settings = VideoSettings(seed, size, num_frames, fps, captions_per_clip, held_out)
    make = partial(make_clip_sample, settings)
    seconds = write_splits(
        out, counts, shard_size, make, workers=workers, progress=progress, unit="clip"
    )
    info = video_dataset_info(settings, counts, shard_size)
    write_text(out / "info.json", json.dumps(info, indent=1))
    return {
        "out_dir": str(out),
        "seed": seed,
        "counts": counts,
        "shards": info["shards"],
        "seconds": round(seconds, 3),
        "clips_per_minute": round(60 * sum(counts.values()) / max(seconds, 1e-9)),
    }


def make_clip_sample(cfg: VideoSettings, split: str, index: int) -> dict[str, str | bytes]:
    """The sample for clip `index` of `split`: key, MP4, captions and metadata."""
    entropy = np.random.SeedSequence([cfg.seed, _VIDEO_STREAM, _SPLIT_ID[split], index])
    clip_rng, pixel_rng, text_rng, reversed_text_rng = (
        np.random.default_rng(s) for s in entropy.spawn(4)
    )
    clip = sample_clip(clip_rng, held_out=cfg.held_out, require_held_out=split == "test")
    frames = render_clip_frames(clip, cfg.size, cfg.num_frames, pixel_rng)
    captions = make_clip_captions(clip, cfg.captions_per_clip, text_rng)
    reversed_captions = make_clip_captions(
        clip.reversed(), cfg.captions_per_clip, reversed_text_rng
    )
    key = f"{index:09d}"
    meta = clip_metadata(clip, key, split, cfg, len(captions))
    meta["reversed_captions"] = reversed_captions
    return {
        "__key__": key,
        "mp4": encode_mp4(frames, cfg.fps),
        "txt": "\n".join(captions).encode("utf-8"),
        "json": json.dumps(meta).encode("utf-8"),
    }


def render_clip_frames(
    clip: ClipSpec, size: int, num_frames: int, rng: np.random.Generator
) -> list[Image.Image]:
    """The clip's frames; frame k shows time k / (num_frames - 1) of the events' timeline."""
    times = [k / max(num_frames - 1, 1) for k in range(num_frames)]
    return render_clip(animate(clip, start_scene(clip, rng), times), size, rng)


def encode_mp4(frames: Sequence[Image.Image], fps: int, crf: int = CRF) -> bytes:
    """H.264 (libx264, yuv420p) in an MP4 container, written in memory."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # one x264 thread per clip; workers run in parallel
        # x264's macroblock-tree rate control made ~1% of encodes differ from run to run (seen
        # with identical input on one thread); without it the bytes are reproducible.
        stream.options = {"crf": str(crf), "preset": "veryfast", "x264-params": "mbtree=0"}
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_image(image)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def clip_metadata(
    clip: ClipSpec, key: str, split: str, cfg: VideoSettings, captions_n: int
) -> dict:
    """The per-clip `.json` (without `reversed_captions`, added by the caller)."""
    states = clip.states()
    last_frame_s = (cfg.num_frames - 1) / cfg.fps
    events = []
    for event, (t0, t1), before, after in zip(clip.events, clip.windows, states, states[1:]):
        record: dict = {
            "action": event.action,
            "object": event.obj,
            "start_s": round(t0 * last_frame_s, 4),
            "end_s": round(t1 * last_frame_s, 4),
        }
        old, new = before.objects[event.obj], after.objects[event.obj]
        if event.action in MOVES:
            record.update({"from": old.position, "to": new.position})
        elif event.action in ("grows", "shrinks"):
            record.update({"from": old.size, "to": new.size})
        elif event.colours is not None:
            record.update({"from": old.colour, "to": new.colour})
        events.append(record)
    pairs = {o.pair for state in states for o in state.objects}
    return {
        "key": key,
        "width": cfg.size,
        "height": cfg.size,
        "num_frames": cfg.num_frames,
        "fps": cfg.fps,
        "duration": cfg.num_frames / cfg.fps,
        "split": split,
        "background": clip.background.kind,
        "objects": _objects(states[0]),
        "end_objects": _objects(states[-1]),
        "events": events,
        "actions": clip.actions,
        "reversed_actions": clip.reversed().actions,
        "captions_n": captions_n,
        "held_out": any(p in cfg.held_out for p in pairs),
    }


def _objects(state: ClipState) -> list[dict]:
    return [
        {
            "shape": o.shape,
            "colour": o.colour,
            "size": o.size,
            "position": o.position,
            "row": o.row,
            "col": o.col,
            "visible": visible,
        }
        for o, visible in zip(state.objects, state.visible)
    ]


def video_dataset_info(settings: VideoSettings, counts: dict[str, int], shard_size: int) -> dict:
    """Contents of `OUT_DIR/info.json` of the video splits."""
    return {
        "name": "vlpt-synthetic-video",
        "seed": settings.seed,
        "frame_size": settings.size,
        "num_frames": settings.num_frames,
        "fps": settings.fps,
        "codec": "h264",
        "shard_size": shard_size,
        "captions_per_clip": settings.captions_per_clip,
        "counts": counts,
        "shards": {split: -(-n // shard_size) for split, n in counts.items()},
        "vocab": {
            "shapes": list(world.SHAPES),
            "colours": list(world.COLOURS),
            "sizes": list(world.SIZES),
            "positions": list(world.POSITIONS),
            "backgrounds": list(world.BACKGROUNDS),
            "actions": list(ACTIONS),
        },
        "reverse_action": REVERSE_ACTION,
        "held_out_pairs": [{"colour": c, "shape": s} for c, s in settings.held_out],
    }


def _check_args(
    seed: int,
    counts: dict[str, int],
    size: int,
    num_frames: int,
    fps: int,
    shard_size: int,
    captions_per_clip: int,
    workers: int | None,
) -> None:
    """Reject arguments a user can get wrong with one sentence that names the argument."""
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}.")
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"the number of {split} clips must be >= 0, got {n}.")
    if size < 16 or size % 2:
        raise ValueError(
            f"video frame size must be an even number >= 16 (H.264 4:2:0), got {size}."
        )
    if num_frames < 2:
        raise ValueError(f"num_frames must be at least 2 (a clip shows motion), got {num_frames}.")
    if fps < 1:
        raise ValueError(f"fps must be at least 1, got {fps}.")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}.")
    if captions_per_clip < 1:
        raise ValueError(f"captions_per_clip must be at least 1, got {captions_per_clip}.")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1 (or None for all cores), got {workers}.")
