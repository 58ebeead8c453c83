"""Video clip sampling speed: vlpt's seeking sparse decoder vs decoding every frame.

Writes two 480p H.264 videos (30 fps, a keyframe every 2 s) to a temporary folder, then times
two ways of delivering `--frames` sampled frames per clip as RGB at `--size` x `--size`:

- vlpt: `vlpt.data.ClipSampler` (seek to the keyframe before the first needed frame, decode only
  the groups of pictures that hold needed frames, convert only the kept frames at crop size);
- naive: decode every frame from the start to full-size RGB, keep the sampled ones, crop and
  resize those (what a loop over `container.decode()` + `to_ndarray()` does; it stops after the
  last sampled frame and holds only the latest frame, not the whole video).

Both use the same sampling times (TSN segments, random frame per segment) and crop boxes, one
decoding thread, and are checked to deliver the same frames. Cases:

(a) `clip_range`: a 4-second `json["clips"]` range in the middle of a 60-second video;
(b) `whole_clip`: the whole of a 10-second video.

    .venv/bin/python benchmarks/video_decode.py [--frames 8] [--size 224] [--repeats 5]

Prints one JSON line: {"bench": "video_decode", "clip_range_vlpt_frames_per_s",
"clip_range_naive_frames_per_s", "clip_range_ratio", "whole_clip_vlpt_frames_per_s",
"whole_clip_naive_frames_per_s", "whole_clip_ratio", "frames", "size", "video", "machine"}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

from vlpt.data import ClipSampler, TrainTransform, segment_times

WIDTH, HEIGHT, FPS = 854, 480, 30


def write_video(path: Path, seconds: int) -> None:
    """A 480p H.264 video with moving content, a keyframe exactly every 2 s, B-frames."""
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    base = np.stack([xs / WIDTH * 200, ys / HEIGHT * 200, (xs + ys) / (WIDTH + HEIGHT) * 255], -1)
    texture = rng.integers(0, 24, size=(HEIGHT, WIDTH, 3)).astype(np.float32)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        gop = str(2 * FPS)
        stream.options = {
            "crf": "23",
            "preset": "veryfast",
            "g": gop,
            "keyint_min": gop,
            "sc_threshold": "0",
        }
        for k in range(seconds * FPS):
            frame = base + np.roll(texture, 3 * k, axis=1)
            x, y = (7 * k) % (WIDTH - 120), (3 * k) % (HEIGHT - 120)
            frame[y : y + 120, x : x + 120] = (230, 40, 40)
            pixels = np.clip(frame, 0, 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def naive_clip(
    data: bytes, clip: tuple[float, float], frames: int, transform: TrainTransform, seed: int
) -> np.ndarray:
    """Decode every frame from the start to full-size RGB, keep the sampled ones (picked on the
    fly: only the latest frame is held), then crop and resize those."""
    rng = random.Random(seed)
    if clip[1] != float("inf"):
        rng.randrange(1)  # the same draws as ClipSampler's choice of one clip among one
    kept: list[np.ndarray] = []
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        duration = float(stream.duration * stream.time_base)
        times = segment_times(clip[0], min(clip[1], duration), frames, rng)
        previous = None
        for frame in container.decode(stream):
            rgb = frame.to_ndarray(format="rgb24")  # (H, W, 3), every frame
            while (
                len(kept) < frames and float(frame.pts * stream.time_base) > times[len(kept)] + 1e-4
            ):
                kept.append(previous if previous is not None else rgb)
            if len(kept) == frames:
                break
            previous = rgb
        kept += [previous] * (frames - len(kept))
    box = transform.box(WIDTH, HEIGHT, rng)
    size = transform.image_size
    return np.stack(
        [
            np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BICUBIC, box=box))
            for p in kept
        ]
    )


def timed(run, seed: int) -> float:
    start = time.perf_counter()
    run(seed)
    return time.perf_counter() - start


def compare(data: bytes, clip: tuple[float, float], args: argparse.Namespace) -> dict[str, float]:
    """Frames per second of both decoders on one case, and how far apart their outputs are.

    Runs alternate (one naive clip, then five vlpt clips, `--repeats` times) so that both see
    the same background load, and each rate comes from the median run: other jobs on a shared
    machine make single runs slow.
    """
    transform = TrainTransform(args.size)
    sampler = ClipSampler(transform, args.frames)
    meta = {"clips": [list(clip)]} if clip[1] != float("inf") else {}

    def vlpt(seed: int) -> np.ndarray:
        return sampler(data, meta, random.Random(seed))

    def naive(seed: int) -> np.ndarray:
        return naive_clip(data, clip, args.frames, transform, seed)

    difference = float(np.abs(vlpt(7).astype(np.float32) - naive(7)).mean())  # also a warm-up
    assert difference < 6, f"the two decoders disagree (mean abs difference {difference:.1f})"
    vlpt_seconds, naive_seconds = [], []
    for repeat in range(args.repeats):
        naive_seconds.append(timed(naive, repeat))
        vlpt_seconds += [timed(vlpt, 5 * repeat + k) for k in range(5)]
    vlpt_rate = args.frames / statistics.median(vlpt_seconds)
    naive_rate = args.frames / statistics.median(naive_seconds)
    return {
        "vlpt_frames_per_s": round(vlpt_rate, 1),
        "naive_frames_per_s": round(naive_rate, 1),
        "ratio": round(vlpt_rate / naive_rate, 2),
        "mean_abs_difference": round(difference, 2),
    }


def machine() -> str:
    """'x86_64, 2 cores, <CPU model>' (the model from /proc/cpuinfo where there is one)."""
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        model = names[0] if names else model
    return f"{platform.machine()}, {os.cpu_count()} cores, {model}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8, help="sampled frames per clip")
    parser.add_argument("--size", type=int, default=224, help="output side in pixels")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed naive clips per case (vlpt: 5x as many)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("writing test videos...", file=sys.stderr)
        long, short = Path(tmp) / "60s.mp4", Path(tmp) / "10s.mp4"
        write_video(long, 60)
        write_video(short, 10)
        cases = {
            "clip_range": compare(long.read_bytes(), (28.0, 32.0), args),
            "whole_clip": compare(short.read_bytes(), (0.0, float("inf")), args),
        }
    result: dict = {"bench": "video_decode"}
    for case, numbers in cases.items():
        result.update({f"{case}_{name}": value for name, value in numbers.items()})
    result.update(
        {
            "frames": args.frames,
            "size": args.size,
            "video": f"{WIDTH}x{HEIGHT} H.264 {FPS} fps, keyframe every 2 s; 60 s and 10 s",
            "machine": machine(),
            "threads": 1,
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
