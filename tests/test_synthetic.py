"""The synthetic world: determinism, splits, captions, shard format and rendering."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from data_fixtures import read_split
from PIL import Image

from vlpt.data.synthetic import (
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Background,
    Scene,
    Sprite,
    held_out_pairs,
    render_scene,
    write_dataset,
)
from vlpt.data.synthetic.captions import POSITION_NOUNS, SIZE_WORDS
from vlpt.data.synthetic.world import DOMAINS

SMALL = {"n_train": 150, "n_val": 50, "n_test": 100, "shard_size": 50, "progress": False}
RELATION_WORDS = ("left of", "right of", "above", "below")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "one_worker"
    write_dataset(out, seed=3, workers=1, **SMALL)
    return out


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text) is not None


def test_same_seed_same_bytes_whatever_the_worker_count(dataset: Path, tmp_path: Path) -> None:
    write_dataset(tmp_path / "two_workers", seed=3, workers=2, **SMALL)
    first, second = all_files(dataset), all_files(tmp_path / "two_workers")
    assert sorted(first) == sorted(second)
    assert first == second
    write_dataset(tmp_path / "other_seed", seed=4, workers=1, **SMALL)
    assert all_files(tmp_path / "other_seed")["train/00000.tar"] != first["train/00000.tar"]


def test_caption_count_does_not_change_the_images(dataset: Path, tmp_path: Path) -> None:
    small = {**SMALL, "n_train": 20, "n_val": 0, "n_test": 0}
    write_dataset(tmp_path / "two", seed=3, captions_per_image=2, workers=1, **small)
    ours = [s["jpg"] for s in read_split(dataset, "train")[:20]]
    theirs = read_split(tmp_path / "two", "train")
    assert ours == [s["jpg"] for s in theirs]
    assert all(len(s["txt"].decode().splitlines()) == 2 for s in theirs)


def test_held_out_pairs_cover_every_colour_and_leave_every_shape_seen() -> None:
    held = held_out_pairs(3)
    assert len(set(held)) == 8
    assert sorted(c for c, _ in held) == sorted(COLOURS)  # each colour held out once
    seen = {(c, s) for c in COLOURS for s in SHAPES} - set(held)
    assert {c for c, _ in seen} == set(COLOURS)
    assert {s for _, s in seen} == set(SHAPES)
    assert held == held_out_pairs(3)
    assert held != held_out_pairs(4)


def test_splits_respect_held_out_pairs(dataset: Path) -> None:
    held = {
        tuple(p.values()) for p in json.loads((dataset / "info.json").read_text())["held_out_pairs"]
    }
    assert held == set(held_out_pairs(3))
    pairs_in = {}
    for split in ("train", "val", "test"):
        metas = [json.loads(s["json"]) for s in read_split(dataset, split)]
        pairs_in[split] = [{(o["colour"], o["shape"]) for o in m["objects"]} for m in metas]
        for meta, pairs in zip(metas, pairs_in[split]):
            assert meta["held_out"] == bool(pairs & held)
    assert not any(pairs & held for pairs in pairs_in["train"] + pairs_in["val"])
    assert all(pairs & held for pairs in pairs_in["test"])
    train_pairs = set().union(*pairs_in["train"])
    assert {c for c, _ in train_pairs} == set(COLOURS)
    assert {s for _, s in train_pairs} == set(SHAPES)


def test_every_caption_describes_every_object(dataset: Path) -> None:
    for split in ("train", "test"):
        for sample in read_split(dataset, split):
            meta = json.loads(sample["json"])
            captions = sample["txt"].decode("utf-8").splitlines()
            assert len(captions) == meta["captions_n"] == 5
            assert len(set(captions)) == 5
            for caption in captions:
                for obj in meta["objects"]:
                    assert has_word(caption, obj["colour"]), (caption, obj)
                    assert has_word(caption, obj["shape"]), (caption, obj)
                    assert any(has_word(caption, w) for w in SIZE_WORDS[obj["size"]]), caption
                    where = POSITION_NOUNS[obj["position"]] + RELATION_WORDS
                    if len(meta["objects"]) > 1:
                        where += ("to the left of", "to the right of")
                    assert any(w in caption for w in where), (caption, obj)


def test_some_captions_mention_the_background(dataset: Path) -> None:
    texts = [s["txt"].decode() for s in read_split(dataset, "train")]
    assert sum("background" in t or "backdrop" in t for t in texts) > len(texts) // 4


def test_shards_read_by_webdataset(dataset: Path) -> None:
    urls = [str(p) for p in sorted((dataset / "val").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == 50
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(50)]
    for sample in samples:
        assert isinstance(sample["jpg"], Image.Image)
        assert sample["jpg"].size == (64, 64) and sample["jpg"].mode == "RGB"
        assert sample["json"]["split"] == "val"
        assert sample["txt"].count("\n") == 4


def test_layout_and_metadata_files(dataset: Path) -> None:
    info = json.loads((dataset / "info.json").read_text())
    assert info["seed"] == 3
    assert info["counts"] == {"train": 150, "val": 50, "test": 100}
    assert info["vocab"]["shapes"] == list(SHAPES)
    for split, n in info["counts"].items():
        sizes = json.loads((dataset / split / "sizes.json").read_text())
        assert sizes == {f"{i:05d}.tar": 50 for i in range(n // 50)}
        assert (dataset / split / "nshards.txt").read_text().strip() == str(n // 50)
        for shard in sizes:
            with tarfile.open(dataset / split / shard) as tar:
                names = tar.getnames()
            assert len(names) == 3 * 50
            assert all(re.fullmatch(r"\d{9}\.(jpg|txt|json)", name) for name in names)


def test_sample_json_schema(dataset: Path) -> None:
    for sample in read_split(dataset, "test"):
        meta = json.loads(sample["json"])
        assert set(meta) >= {"width", "height", "split", "background", "objects", "relations"}
        assert (meta["width"], meta["height"], meta["split"]) == (64, 64, "test")
        assert Image.open(io.BytesIO(sample["jpg"])).size == (64, 64)
        assert 1 <= len(meta["objects"]) <= 3
        cells = set()
        for obj in meta["objects"]:
            assert set(obj) == {"shape", "colour", "size", "position", "row", "col"}
            assert obj["shape"] in SHAPES and obj["colour"] in COLOURS and obj["size"] in SIZES
            assert obj["position"] == POSITIONS[3 * obj["row"] + obj["col"]]
            cells.add((obj["row"], obj["col"]))
        assert len(cells) == len(meta["objects"])  # distinct cells: no overlap
        for rel in meta["relations"]:
            a, b = meta["objects"][rel["subject"]], meta["objects"][rel["object"]]
            expected = {
                "left of": a["col"] < b["col"],
                "right of": a["col"] > b["col"],
                "above": a["row"] < b["row"],
                "below": a["row"] > b["row"],
            }
            assert expected[rel["relation"]], rel


def test_size_option(tmp_path: Path) -> None:
    write_dataset(tmp_path, n_train=3, n_val=0, n_test=0, size=96, workers=1, progress=False)
    for sample in read_split(tmp_path, "train"):
        assert Image.open(io.BytesIO(sample["jpg"])).size == (96, 96)
        assert json.loads(sample["json"])["width"] == 96


def test_rewrite_removes_stale_shards(tmp_path: Path) -> None:
    args = {"n_val": 0, "n_test": 0, "shard_size": 5, "workers": 1, "progress": False}
    write_dataset(tmp_path, n_train=15, **args)
    write_dataset(tmp_path, n_train=5, **args)
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == ["00000.tar"]


@pytest.mark.parametrize("shape", SHAPES)
def test_render_paints_each_colour_at_the_sprite_centre(shape: str) -> None:
    background = Background("plain", (128, 128, 128), (128, 128, 128), 0.1, 0)
    for colour, rgb in COLOUR_RGB.items():
        sprite = Sprite(shape, 0.5, 0.5, 0.31, 5.0, rgb)
        image = render_scene(Scene(background, (sprite,)), 64, np.random.default_rng(0))
        pixels = np.asarray(image)
        assert tuple(pixels[32, 32]) == rgb, colour
        assert tuple(pixels[2, 2]) == (128, 128, 128)  # the corner stays background


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [({"seed": -1}, "seed"), ({"size": 8}, "size"), ({"shard_size": 0}, "shard_size"),
     ({"n_train": -5}, "train"), ({"captions_per_image": 0}, "captions_per_image")],
)  # fmt: skip
def test_bad_arguments_are_named(tmp_path: Path, kwargs: dict, word: str) -> None:
    with pytest.raises(ValueError, match=word):
        write_dataset(tmp_path, progress=False, **kwargs)


def test_clip_frames_are_drawn_by_the_image_renderer() -> None:
    from vlpt.data.synthetic import render_clip

    background = Background("noise", (100, 100, 100), (150, 150, 150), 0.1, 0)
    scenes = [
        Scene(background, (Sprite("star", 0.3 + 0.1 * k, 0.5, 0.31, 10.0 * k, (220, 30, 35)),))
        for k in range(3)
    ]
    frames = render_clip(scenes, 64, np.random.default_rng(1))
    for scene, frame in zip(scenes, frames):  # same background noise in every frame
        assert frame.tobytes() == render_scene(scene, 64, np.random.default_rng(1)).tobytes()


def test_sprite_opacity_fades_and_hides() -> None:
    background = Background("plain", (128, 128, 128), (128, 128, 128), 0.1, 0)
    rng = np.random.default_rng(0)

    def centre(opacity: float) -> tuple[int, ...]:
        sprite = Sprite("circle", 0.5, 0.5, 0.31, 0.0, (250, 0, 0), opacity)
        return tuple(np.asarray(render_scene(Scene(background, (sprite,)), 64, rng))[32, 32])

    assert centre(1.0) == (250, 0, 0)
    assert centre(0.0) == (128, 128, 128)
    assert centre(0.5) == pytest.approx((189, 64, 64), abs=1)


def test_synth_command_writes_video_next_to_images(tmp_path: Path) -> None:
    from vlpt.cli import main

    args = ["data", "synth", str(tmp_path), "--images", "4", "--val", "2", "--test", "2"]
    video = ["--video", "--video-clips", "4", "--video-val", "2", "--video-test", "2"]
    assert main([*args, *video, "--frames", "6", "--fps", "4", "--workers", "1", "--quiet"]) == 0
    info = json.loads((tmp_path / "video" / "info.json").read_text())
    assert (info["num_frames"], info["fps"], info["counts"]["val"]) == (6, 4, 2)
    for split in ("train", "val", "test"):
        assert (tmp_path / split / "00000.tar").exists()
        assert (tmp_path / "video" / split / "00000.tar").exists()
    with tarfile.open(tmp_path / "video" / "train" / "00000.tar") as tar:
        assert sorted(tar.getnames())[:3] == ["000000000.json", "000000000.mp4", "000000000.txt"]


def _text_digest(shard: Path) -> str:
    """sha256 of a shard's member names, captions and metadata (JPEG bytes depend on libjpeg)."""
    digest = hashlib.sha256()
    with tarfile.open(shard) as tar:
        for member in tar.getmembers():
            if not member.name.endswith(".jpg"):
                digest.update(member.name.encode())
                digest.update(tar.extractfile(member).read())
    return digest.hexdigest()


def test_default_world_is_pinned(tmp_path: Path) -> None:
    # Domains (and any later option) must not move the default world's random streams.
    write_dataset(tmp_path, seed=3, n_train=0, n_val=0, n_test=20, shard_size=20, progress=False)
    assert _text_digest(tmp_path / "test/00000.tar") == (
        "697eea7cfa1dfe0049ff6d990784125903e28de9965ea50136d67a9f5328da70"
    )


def test_novel_domain_is_deterministic_and_draws_only_its_own_shapes(tmp_path: Path) -> None:
    novel = DOMAINS["novel"]
    assert not set(novel.shapes) & set(SHAPES) and not set(novel.backgrounds) & set(BACKGROUNDS)
    small = {"n_train": 40, "n_val": 20, "n_test": 20, "shard_size": 20, "progress": False}
    write_dataset(tmp_path / "a", domain="novel", workers=1, **small)
    write_dataset(tmp_path / "b", domain="novel", workers=2, **small)
    assert all_files(tmp_path / "a") == all_files(tmp_path / "b")
    info = json.loads((tmp_path / "a/info.json").read_text())
    assert info["domain"] == "novel" and info["vocab"]["shapes"] == list(novel.shapes)
    for split in ("train", "test"):
        for sample in read_split(tmp_path / "a", split):
            meta, captions = json.loads(sample["json"]), sample["txt"].decode()
            assert meta["background"] in novel.backgrounds
            for obj in meta["objects"]:
                assert obj["shape"] in novel.shapes
                assert all(has_word(c, obj["shape"]) for c in captions.splitlines())
    with pytest.raises(ValueError, match="domain 'nope' is unknown"):
        write_dataset(tmp_path / "c", domain="nope", **small)
