"""Video data: the synthetic video world (determinism, reversal, motion), sparse sampling that
seeks, clip ranges, one crop per clip, awkward and bad files, and mixed image+video batches.

Every video here is generated with PyAV in memory; frame k of an "index video" is a flat grey
of level 10 + 5k, so the frames a sampler returns tell which source frames it picked.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from data_fixtures import MEAN, STD, IdTokenizer, paired_loader, write_shard

from vlpt.config import DataConfig, Source
from vlpt.data import (
    ClipSampler,
    EvalTransform,
    SkipCounter,
    TrainTransform,
    UnusableVideo,
    build_train_loader,
    iter_eval_batches,
    segment_times,
)
from vlpt.data.synthetic import (
    ACTIONS,
    COLOUR_RGB,
    ClipSpec,
    ClipState,
    Event,
    animate,
    held_out_pairs,
    reverse_action,
    sample_clip,
    write_dataset,
    write_video_dataset,
)
from vlpt.data.synthetic.events import MOVES, start_scene
from vlpt.data.synthetic.video_captions import make_clip_captions
from vlpt.data.synthetic.video_writer import encode_mp4, render_clip_frames
from vlpt.data.synthetic.world import Background, ObjectSpec
from vlpt.data.video import plan_frames

TINY = {"n_train": 24, "n_val": 8, "n_test": 8, "size": 32, "num_frames": 8, "shard_size": 12}


@pytest.fixture(scope="module")
def video_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("video") / "one_worker"
    write_video_dataset(out, seed=5, workers=1, progress=False, **TINY)
    return out


def read_split(root: Path, split: str) -> list[dict]:
    samples: dict[str, dict] = {}
    for shard in sorted((root / split).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return [samples[k] for k in sorted(samples)]


def encode(
    frames: list[np.ndarray],
    *,
    fps: int = 8,
    fmt: str = "mp4",
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    options: dict | None = None,
    pts_ms: list[int] | None = None,
    rotation: float | None = None,
    audio: bool = False,
) -> bytes:
    """Frames (H, W, 3) uint8 -> a video file in memory; `pts_ms` gives a variable frame rate."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = pix_fmt
        stream.options = {"crf": "0", **(options or {})} if codec == "libx264" else options or {}
        if pts_ms is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        sound = container.add_stream("aac", rate=16000) if audio else None
        for k, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[k], Fraction(1, 1000)
            container.mux(stream.encode(frame))
            if sound is not None:
                chunk = av.AudioFrame.from_ndarray(
                    np.zeros((1, 2000), np.float32), format="fltp", layout="mono"
                )
                chunk.sample_rate, chunk.pts = 16000, k * 2000
                container.mux(sound.encode(chunk))
        container.mux(stream.encode())
        if sound is not None:
            container.mux(sound.encode())
    return buffer.getvalue()


def index_video(n: int, size: int = 32, **kw) -> bytes:
    """n flat grey frames, frame k of level 10 + 5k."""
    return encode([np.full((size, size, 3), 10 + 5 * k, np.uint8) for k in range(n)], **kw)


def frame_indices(clip: np.ndarray) -> list[int]:
    """Source frame of each sampled frame of an index video."""
    return [round((float(frame.mean()) - 10) / 5) for frame in clip]


def sampler(num_frames: int = 8, size: int = 16, train: bool = False, **kw) -> ClipSampler:
    transform = TrainTransform(size, **kw) if train else EvalTransform(size)
    return ClipSampler(transform, num_frames)


# ---------------------------------------------------------------------------------------------
# The synthetic video world


def test_same_seed_same_bytes_whatever_the_worker_count(video_world: Path, tmp_path: Path) -> None:
    write_video_dataset(tmp_path / "two", seed=5, workers=2, progress=False, **TINY)
    ours = {str(p.relative_to(video_world)): p.read_bytes() for p in video_world.rglob("*.*")}
    theirs = {
        str(p.relative_to(tmp_path / "two")): p.read_bytes()
        for p in (tmp_path / "two").rglob("*.*")
    }
    assert sorted(ours) == sorted(theirs) and ours == theirs
    info = json.loads((video_world / "info.json").read_text())
    assert info["counts"] == {"train": 24, "val": 8, "test": 8}
    assert json.loads((video_world / "train" / "sizes.json").read_text()) == {
        "00000.tar": 12,
        "00001.tar": 12,
    }
    assert (video_world / "train" / "nshards.txt").read_text().strip() == "2"


def test_clip_files_and_metadata(video_world: Path) -> None:
    held = set(held_out_pairs(5))
    for split in ("train", "val", "test"):
        for sample in read_split(video_world, split):
            assert set(sample) == {"mp4", "txt", "json"}
            meta = json.loads(sample["json"])
            captions = sample["txt"].decode().splitlines()
            assert len(captions) == meta["captions_n"] == 5
            assert len(meta["reversed_captions"]) == 5
            assert not set(captions) & set(meta["reversed_captions"])
            assert (meta["num_frames"], meta["fps"], meta["width"]) == (8, 8, 32)
            assert 1 <= len(meta["actions"]) <= 2 and set(meta["actions"]) <= set(ACTIONS)
            assert meta["reversed_actions"] == [reverse_action(a) for a in meta["actions"][::-1]]
            assert [e["action"] for e in meta["events"]] == meta["actions"]
            container = av.open(io.BytesIO(sample["mp4"]))
            stream = container.streams.video[0]
            assert (stream.codec_context.name, stream.codec_context.pix_fmt) == ("h264", "yuv420p")
            assert stream.frames == 8
            pairs = {(o["colour"], o["shape"]) for o in meta["objects"] + meta["end_objects"]}
            assert meta["held_out"] == bool(pairs & held)
            if split == "test":
                assert {(o["colour"], o["shape"]) for o in meta["objects"]} & held
            else:
                assert not pairs & held


def test_reversed_clip_is_the_clip_played_backwards() -> None:
    times = np.linspace(0, 1, 16)
    held = held_out_pairs(0)
    for seed in range(60):
        rng = np.random.default_rng(seed)
        clip = sample_clip(rng, held_out=held, require_held_out=seed % 3 == 0)
        back = clip.reversed()
        assert back.reversed() == clip
        assert back.actions == [reverse_action(a) for a in reversed(clip.actions)]
        assert back.start == clip.states()[-1] and back.states()[-1] == clip.start
        if len(clip.events) == 2:  # never an event followed by its own undoing
            assert clip.events[1] != clip.events[0].reversed()
        forward = animate(clip, start_scene(clip, rng), times)
        backward = animate(back, forward[-1], 1 - times)
        for a, b in zip(forward, backward):
            for s, t in zip(a.sprites, b.sprites):
                assert s.shape == t.shape and s.rgb == pytest.approx(t.rgb, abs=1)
                assert (s.x, s.y, s.scale, s.angle, s.opacity) == pytest.approx(
                    (t.x, t.y, t.scale, t.angle, t.opacity), abs=1e-9
                )
        captions = make_clip_captions(clip, 5, rng)
        assert not set(captions) & set(make_clip_captions(back, 10, rng))


def test_colour_change_and_sequence_reverse_as_specified() -> None:
    bg = Background("plain", (128, 128, 128), (128, 128, 128), 0.1, 0)
    red = ObjectSpec("circle", "red", "small", 1, 1)
    blue = ObjectSpec("square", "blue", "small", 0, 0)
    clip = ClipSpec(
        bg,
        ClipState((red, blue), (True, True)),
        (Event("moves left", 0), Event("changes colour", 1, ("blue", "green"))),
    )
    back = clip.reversed()
    assert back.events == (Event("changes colour", 1, ("green", "blue")), Event("moves right", 0))
    assert back.start.objects[0].col == 0 and back.start.objects[1].colour == "green"


def _centroid_and_area(frame: np.ndarray, rgb: tuple[int, int, int]) -> tuple[float, float, int]:
    close = np.abs(frame.astype(int) - rgb).sum(-1) < 90
    ys, xs = np.nonzero(close)
    return (float(xs.mean()) if len(xs) else -1.0, float(ys.mean()) if len(ys) else -1.0, len(xs))


@pytest.mark.parametrize("action", [*MOVES, "grows", "shrinks", "appears", "disappears"])
def test_decoded_frames_show_the_stated_event(action: str) -> None:
    bg = Background("stripes", (120, 110, 115), (135, 128, 130), 0.12, 1)
    size = "large" if action == "shrinks" else "small"
    obj = ObjectSpec("square", "red", size, 1, 1)
    visible = action != "appears"
    clip = ClipSpec(bg, ClipState((obj,), (visible,)), (Event(action, 0),))
    data = encode_mp4(render_clip_frames(clip, 64, 16, np.random.default_rng(0)), 8)
    frames = sampler(num_frames=16, size=64)(data, {})  # every frame, full size
    (x0, y0, area0), (x1, y1, area1) = (
        _centroid_and_area(f, COLOUR_RGB["red"]) for f in frames[[0, -1]]
    )
    if action in MOVES:
        dr, dc = MOVES[action]
        assert (x1 - x0) == pytest.approx(dc * 64 / 3, abs=2)
        assert (y1 - y0) == pytest.approx(dr * 64 / 3, abs=2)
    elif action == "grows":
        assert area1 > 2 * area0 > 0
    elif action == "shrinks":
        assert area0 > 2 * area1 > 0
    else:
        assert (area0 == 0) == (action == "appears") and (area1 == 0) == (action == "disappears")


def test_sampled_clips_move_as_their_json_says(video_world: Path) -> None:
    checked = 0
    for sample in read_split(video_world, "train") + read_split(video_world, "val"):
        meta = json.loads(sample["json"])
        event = meta["events"][0]
        obj = meta["objects"][event["object"]]
        if len(meta["events"]) != 1 or event["action"] not in MOVES:
            continue
        frames = sampler(num_frames=8, size=32)(sample["mp4"], meta)
        (x0, y0, _), (x1, y1, _) = (
            _centroid_and_area(f, COLOUR_RGB[obj["colour"]]) for f in frames[[0, -1]]
        )
        dr, dc = MOVES[event["action"]]
        # Other objects of similar colour may add pixels; the sign of the motion must hold.
        assert dc == 0 or np.sign(x1 - x0) == dc, meta
        assert dr == 0 or np.sign(y1 - y0) == dr, meta
        checked += 1
    assert checked >= 2


# ---------------------------------------------------------------------------------------------
# Sparse sampling, seeking, clip ranges, crops


def test_segment_times_train_random_within_segment_eval_middle() -> None:
    assert segment_times(1.0, 3.0, 4, None) == [1.25, 1.75, 2.25, 2.75]
    rng = random.Random(0)
    draws = np.array([segment_times(1.0, 3.0, 4, rng) for _ in range(500)])  # (500, 4)
    for i in range(4):
        assert (draws[:, i] >= 1.0 + 0.5 * i).all() and (draws[:, i] < 1.5 + 0.5 * i).all()
        assert draws[:, i].std() > 0.1  # spread over the segment


@pytest.mark.parametrize("options", [{}, {"g": "4", "bf": "2"}, {"g": "3", "bf": "0"}])
def test_eval_takes_middle_frames_and_train_a_frame_of_each_segment(options: dict) -> None:
    data = index_video(16, options=options)
    assert frame_indices(sampler()(data, {})) == [1, 3, 5, 7, 9, 11, 13, 15]
    seen = set()
    for seed in range(20):
        indices = frame_indices(sampler(train=True)(data, {}, random.Random(seed)))
        assert all(k in (2 * i, 2 * i + 1) for i, k in enumerate(indices)), indices
        seen.update(indices)
    assert seen == set(range(16))


def test_plan_decodes_only_from_the_keyframe_before_each_needed_frame() -> None:
    # Two GOPs of 4 frames, no reordering; times 1.5 and 5.2 need frames 1 and 5.
    pts = list(range(8))
    keys = [True, False, False, False, True, False, False, False]
    chosen, begin = plan_frames(pts, keys, [1.5, 5.2, 5.9])
    assert chosen == [1, 5, 5] and begin == {1: 0, 5: 4}


def test_clip_ranges_are_honoured() -> None:
    data = index_video(48, fps=16, options={"g": "8"})  # 3 s
    clips = {"clips": [[1.0, 2.0], [0.0, 0.5]]}
    assert frame_indices(sampler()(data, clips)) == [17, 19, 21, 23, 25, 27, 29, 31]
    picked = set()
    for seed in range(12):
        indices = frame_indices(sampler(train=True)(data, clips, random.Random(seed)))
        assert all(16 <= k < 32 for k in indices) or all(0 <= k < 8 for k in indices), indices
        picked.add(indices[0] >= 16)
    assert picked == {True, False}  # both clips get chosen
    # A range past the end is clamped to the video; one outside it is a counted skip.
    assert frame_indices(sampler(num_frames=2)(data, {"clips": [[2.5, 9.0]]})) == [42, 46]
    for bad in ([[5.0, 6.0]], [[2.0, 1.0]], [["a", 1]], [[1.0]], "0-1"):
        with pytest.raises(UnusableVideo) as error:
            sampler()(data, {"clips": bad})
        assert error.value.reason.value == "clip_out_of_range"


def test_variable_frame_rate_shows_the_frame_on_screen_at_each_time() -> None:
    pts_ms = [0, 100, 150, 400, 700, 720, 900, 1300]  # last frame shown until ~1.4 s
    data = index_video(len(pts_ms), pts_ms=pts_ms)
    duration = av.open(io.BytesIO(data)).streams.video[0]
    duration = float(duration.duration * duration.time_base)
    expected = [
        max(k for k, p in enumerate(pts_ms) if p / 1000 <= t)
        for t in segment_times(0.0, duration, 8, None)
    ]
    assert frame_indices(sampler()(data, {})) == expected


def test_short_and_one_frame_videos_repeat_frames() -> None:
    assert frame_indices(sampler()(index_video(3), {})) == [0, 0, 0, 1, 1, 2, 2, 2]
    one = sampler()(index_video(1), {})
    assert one.shape == (8, 16, 16, 3) and frame_indices(one) == [0] * 8


def test_every_frame_of_a_clip_gets_the_same_crop() -> None:
    ys, xs = np.mgrid[0:48, 0:64]
    still = np.stack([xs * 4, ys * 5, (xs + ys) * 2], -1).astype(np.uint8)
    data = encode([still] * 12)
    crops = [
        sampler(train=True, size=16, scale=(0.1, 0.2))(data, {}, random.Random(s)) for s in range(4)
    ]
    for clip in crops:
        assert np.abs(clip.astype(int) - clip[0]).max() <= 2  # all frames alike
    assert len({clip[0].tobytes() for clip in crops}) == 4  # boxes differ between clips
    full = sampler(size=16)(data, {})[0]
    assert np.abs(crops[0][0].astype(int) - full).mean() > 10  # a real crop, not the whole frame


def test_rotation_odd_sizes_audio_and_other_containers() -> None:
    marked = np.zeros((64, 64, 3), np.uint8)
    marked[:16, :16] = (255, 0, 0)  # top left, as coded
    clip = sampler(size=32)(encode([marked] * 4, rotation=90), {})
    red = clip[0, :, :, 0] > 128
    assert red[24:, :8].all() and not red[:16].any()  # counter-clockwise: now bottom left
    odd = encode([np.full((47, 63, 3), 200, np.uint8)] * 4, pix_fmt="yuv444p")
    assert sampler()(odd, {}).shape == (8, 16, 16, 3)
    plain = index_video(8)
    assert frame_indices(sampler()(index_video(8, audio=True), {})) == frame_indices(
        sampler()(plain, {})
    )
    webm = index_video(8, fmt="webm", codec="libvpx-vp9", options={"lossless": "1"})
    assert frame_indices(sampler()(webm, {})) == [0, 1, 2, 3, 4, 5, 6, 7]


# ---------------------------------------------------------------------------------------------
# Bad files


def bad_videos(tmp_path: Path) -> dict[str, bytes]:
    """One file per bad case, named by the reason it must be counted under."""
    good = index_video(16)
    path = tmp_path / "faststart.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        for k in range(16):
            frame = np.full((32, 32, 3), 10 + 5 * k, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    faststart = path.read_bytes()
    audio_only = io.BytesIO()
    with av.open(audio_only, "w", format="mp4") as container:
        sound = container.add_stream("aac", rate=16000)
        for k in range(4):
            chunk = av.AudioFrame.from_ndarray(
                np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
            )
            chunk.sample_rate, chunk.pts = 16000, k * 1024
            container.mux(sound.encode(chunk))
        container.mux(sound.encode())
    return {
        "empty_file": b"",
        "truncated_video": good[: len(good) // 2],  # moov (at the end) lost
        "truncated_video/faststart": faststart[: len(faststart) * 2 // 3],  # frames lost
        "no_video_stream": audio_only.getvalue(),
        "unsupported_codec": good.replace(b"avc1", b"zzzz"),  # a codec FFmpeg cannot decode
        "undecodable_video": random.Random(0).randbytes(3000),
    }


def test_each_bad_video_is_a_counted_skip(tmp_path: Path) -> None:
    for name, data in bad_videos(tmp_path).items():
        with pytest.raises(UnusableVideo) as error:
            sampler()(data, {})
        assert error.value.reason.value == name.split("/")[0], name


def _bad_shard(tmp_path: Path) -> Path:
    samples = [
        {"__key__": f"bad{i}", "mp4": data, "txt": b"0 0 9"}
        for i, data in enumerate(bad_videos(tmp_path).values())
    ]
    samples.append(
        {
            "__key__": "range",
            "mp4": index_video(4),
            "txt": b"0 0 8",
            "json": json.dumps({"clips": [[7.0, 9.0]]}).encode(),
        }
    )
    samples += [
        {"__key__": f"good{i}", "mp4": index_video(4 + i), "txt": f"0 0 {i}".encode()}
        for i in range(3)
    ]
    samples.append(
        {"__key__": "one", "webm": index_video(1, fmt="webm", codec="libvpx-vp9"), "txt": b"0 0 3"}
    )
    return write_shard(tmp_path / "shard" / "00000.tar", samples)


EXPECTED_SKIPS = {
    "empty_file": 1,
    "truncated_video": 2,
    "no_video_stream": 1,
    "unsupported_codec": 1,
    "undecodable_video": 1,
    "clip_out_of_range": 1,
}


def test_bad_videos_are_counted_in_eval_and_training_workers(tmp_path: Path) -> None:
    shard = _bad_shard(tmp_path)
    keys, skips = [], SkipCounter()
    for batch in iter_eval_batches(
        [Source(url=str(shard))], image_size=16, mean=MEAN, std=STD, batch_size=2, num_frames=4
    ):
        keys += batch["key"]
        skips.update(batch["skips"])
        assert batch["image"].shape[1:] == (4, 3, 16, 16)
    assert keys == ["good0", "good1", "good2", "one"] and dict(skips) == EXPECTED_SKIPS
    # In a dataloader worker process: counted, passed on with the batches, no hang.
    cfg = DataConfig(train=[str(shard)], workers=1, shuffle_buffer=0, num_frames=4)
    loader = build_train_loader(
        cfg, image_size=16, mean=MEAN, std=STD, tokenizer=IdTokenizer(), batch_size=2
    )
    totals = SkipCounter()
    for batch in itertools.islice(loader, 8):
        totals.update(batch["skips"])
        assert batch["image"].shape == (2, 4, 3, 16, 16)
    assert set(totals) == set(EXPECTED_SKIPS)


# ---------------------------------------------------------------------------------------------
# Loader


def test_mixed_image_and_video_sources_give_homogeneous_batches(
    video_world: Path, tmp_path: Path
) -> None:
    write_dataset(tmp_path, n_train=40, n_val=0, n_test=0, size=32, workers=1, progress=False)
    cfg = DataConfig(
        train=[str(tmp_path / "train"), str(video_world / "train")],
        workers=0,
        shuffle_buffer=20,
        num_frames=4,
    )
    kw = {"image_size": 24, "mean": MEAN, "std": STD, "batch_size": 4}
    loader = build_train_loader(cfg, tokenizer=_lengths, **kw)
    batches = list(itertools.islice(loader, 12))
    shapes = {tuple(b["image"].shape) for b in batches}
    assert shapes == {(4, 3, 24, 24), (4, 4, 3, 24, 24)}
    for batch in batches:
        assert batch["image"].dtype.is_floating_point and batch["text"].shape[0] == 4
    again = list(itertools.islice(build_train_loader(cfg, tokenizer=_lengths, **kw), 12))
    assert all((a["image"] == b["image"]).all() for a, b in zip(batches, again))


def _lengths(texts: list[str]) -> torch.Tensor:
    """Token stand-in: each caption's word count, then zeros."""
    rows = torch.zeros(len(texts), 4, dtype=torch.long)
    rows[:, 0] = torch.tensor([len(t.split()) for t in texts])
    return rows


def test_video_eval_batches_carry_metadata_for_temporal_evaluation(video_world: Path) -> None:
    batches = list(
        iter_eval_batches(
            [Source(url=str(video_world / "val"))],
            image_size=32,
            mean=MEAN,
            std=STD,
            batch_size=5,
            num_frames=8,
        )
    )
    assert [tuple(b["image"].shape) for b in batches] == [(5, 8, 3, 32, 32), (3, 8, 3, 32, 32)]
    meta = batches[0]["meta"][0]
    assert meta["reversed_captions"] and meta["actions"] and len(batches[0]["captions"][0]) == 5
    assert batches[0]["key"][0] == "000000000"


def test_reversed_pairs_put_each_clip_and_its_reversal_in_one_batch(video_world: Path) -> None:
    loader, caption_ids, pairs = paired_loader(
        video_world, "reversed_captions", image_size=24, num_frames=4, reversed_pairs=True
    )
    for batch in itertools.islice(loader, 4):
        clips, texts = batch["image"], caption_ids.texts(batch)
        assert clips.shape == (6, 4, 3, 24, 24)
        for k in range(0, 6, 2):  # item k + 1 is item k played backwards, with its caption
            torch.testing.assert_close(clips[k + 1], clips[k].flip(0))
            assert pairs[texts[k]] == texts[k + 1]
