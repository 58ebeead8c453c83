"""Evaluation-set converters: COCO / Flickr30k (Karpathy splits) and MSR-VTT into shards.

Fixtures are written in the exact format of the real files (key names, nesting, file names,
folder layout) with a few images drawn by PIL and tiny H.264 videos encoded by PyAV; the shards
are read back with the project's evaluation reader (images) or tarfile (videos).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from data_fixtures import MEAN, STD
from PIL import Image, ImageDraw

from vlpt.cli import main
from vlpt.config import Source
from vlpt.data import iter_eval_batches
from vlpt.data.convert import ConversionError, convert_karpathy, convert_msrvtt

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


# ---------------------------------------------------------------------------------------------
# Fixtures in the real files' formats


def draw_image(path: Path, seed: int, fmt: str = "JPEG") -> bytes:
    """A small picture of a coloured shape, saved at `path`; returns the file's bytes."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (48, 40), tuple(int(v) for v in rng.integers(0, 255, 3)))
    box = [int(v) for v in (*rng.integers(0, 16, 2), *rng.integers(28, 40, 2))]
    ImageDraw.Draw(image).ellipse(box, fill=COLOURS[seed % len(COLOURS)])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path.read_bytes()


def karpathy_entry(
    index: int, filename: str, split: str, captions: list[str], **ids: Any
) -> dict[str, Any]:
    """One entry of dataset_coco.json / dataset_flickr30k.json, with Karpathy's key names."""
    sentids = [index * 10 + i for i in range(len(captions))]
    return {
        **({"filepath": ids.pop("filepath")} if "filepath" in ids else {}),
        "sentids": sentids,
        "filename": filename,
        "imgid": index,
        "split": split,
        "sentences": [
            {
                "tokens": c.lower().replace(".", "").split(),
                "raw": c,
                "imgid": index,
                "sentid": s,
            }
            for c, s in zip(captions, sentids)
        ],
        **ids,
    }


def captions_of(name: str, n: int = 5) -> list[str]:
    return [f"{name} caption number {i} about a coloured shape" for i in range(n)]


# COCO: (folder, file, Karpathy split); images live in IMAGES/train2014 and IMAGES/val2014.
COCO_IMAGES = [
    ("val2014", "COCO_val2014_000000391895.jpg", "test"),
    ("val2014", "COCO_val2014_000000522418.jpg", "test"),
    ("val2014", "COCO_val2014_000000184613.jpg", "test"),
    ("val2014", "COCO_val2014_000000318219.jpg", "val"),
    ("train2014", "COCO_train2014_000000057870.jpg", "train"),
    ("val2014", "COCO_val2014_000000060623.jpg", "restval"),
]


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("coco")
    entries, files = [], {}
    for index, (folder, filename, split) in enumerate(COCO_IMAGES):
        files[filename] = draw_image(root / "images" / folder / filename, index)
        captions = captions_of(filename)
        captions[0] = f"A man with a red helmet on a small moped {index}.  \n"  # as raw as COCO's
        cocoid = int(filename.rsplit("_", 1)[1].split(".")[0])
        entries.append(
            karpathy_entry(index, filename, split, captions, filepath=folder, cocoid=cocoid)
        )
    annotations = root / "dataset_coco.json"
    annotations.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return {
        "annotations": annotations,
        "images": root / "images",
        "entries": entries,
        "files": files,
    }


@pytest.fixture(scope="module")
def flickr(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """dataset_flickr30k.json (no filepath) with one good image per split and every kind of
    per-item problem in the test split."""
    root = tmp_path_factory.mktemp("flickr30k")
    images = root / "flickr30k-images"
    good = ["1000092795.jpg", "10002456.jpg", "1000268201.jpg"]
    for i, name in enumerate(good):
        draw_image(images / name, 10 + i)
    draw_image(images / "1000344755.jpg", 20, fmt="PNG")  # a PNG named .jpg: kept, as png
    draw_image(images / "1000366164.jpg", 21, fmt="GIF")  # GIF: re-encoded as PNG
    (images / "1000523639.jpg").write_bytes(b"this is not an image")  # undecodable_image
    (images / "1000919630.jpg").write_bytes(b"")  # empty_file
    draw_image(images / "10010052.jpg", 22)  # its entry has no sentences: no_captions
    entries = [
        karpathy_entry(0, good[0], "train", captions_of(good[0])),
        karpathy_entry(1, good[1], "val", captions_of(good[1])),
        karpathy_entry(2, good[2], "test", captions_of(good[2])),
        karpathy_entry(3, "1000344755.jpg", "test", captions_of("png")),
        karpathy_entry(4, "1000366164.jpg", "test", captions_of("gif")),
        karpathy_entry(5, "1000523639.jpg", "test", captions_of("garbage")),
        karpathy_entry(6, "1000919630.jpg", "test", captions_of("empty")),
        karpathy_entry(7, "10010052.jpg", "test", []),
        karpathy_entry(8, "1001465944.jpg", "test", captions_of("missing")),  # missing_image
        {"imgid": 9, "split": "test", "sentences": []},  # no filename: malformed_entry
        karpathy_entry(10, "1001545525.jpg", "dev", captions_of("dev")),  # unknown_split
    ]
    annotations = root / "dataset_flickr30k.json"
    annotations.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return {"annotations": annotations, "images": images, "root": root}


def encode_mp4(path: Path, seed: int, frames: int = 6, size: int = 32, fps: int = 10) -> bytes:
    """A tiny H.264 mp4 (a square moving over a plain background); returns the file's bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            pixels = np.full((size, size, 3), 40 * (seed % 6), np.uint8)
            pixels[8:16, 2 + 4 * t : 10 + 4 * t] = (255, 255, 0)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path.read_bytes()


def msrvtt_video(index: int, split: str) -> dict[str, Any]:
    """One entry of `videos` in train_val_videodatainfo.json, with the real key names."""
    return {
        "category": index % 20,
        "url": f"https://www.youtube.com/watch?v=clip{index}",
        "video_id": f"video{index}",
        "start time": 10.0 + index,
        "end time": 20.5 + index,
        "split": split,
        "id": index,
    }


MSRVTT_CAPTIONS = {
    "video0": ["a car is shown", "a red car drives on a road", "someone shows a car"],
    "video1": ["a man is cooking", "a chef cooks food in a kitchen"],
    "video2": ["a cartoon plays", "animated characters talk"],
    "video4": ["a dog runs in a park"],
    "video5": ["people dance on a stage", "a group is dancing", "dancers perform"],
}


@pytest.fixture(scope="module")
def msrvtt(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """train_val + test videodatainfo, the JSFusion 1k-A csv, and a folder of videoN.mp4:
    video3 has no caption, video4 no file, video6 a file that is not a video."""
    root = tmp_path_factory.mktemp("msrvtt")
    videos = root / "videos" / "all"
    files = {f"video{i}": encode_mp4(videos / f"video{i}.mp4", i) for i in (0, 1, 2, 3, 5)}
    (videos / "video6.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing else")
    sentences = [
        {"caption": caption, "video_id": video, "sen_id": 0}
        for i in range(3)  # interleaved like the real file: captions of a video are scattered
        for video, captions in MSRVTT_CAPTIONS.items()
        if i < len(captions) and video != "video5"
        for caption in [captions[i]]
    ]
    for n, sentence in enumerate(sentences):
        sentence["sen_id"] = n
    info = {"contributor": "Microsoft MSM group", "year": "2016", "version": "1.0"}
    train_val = {
        "info": info,
        "videos": [
            msrvtt_video(0, "train"),
            msrvtt_video(1, "train"),
            msrvtt_video(2, "validate"),
            msrvtt_video(3, "train"),
            msrvtt_video(4, "train"),
        ],
        "sentences": sentences,
    }
    test = {
        "info": info,
        "videos": [msrvtt_video(5, "test"), msrvtt_video(6, "test")],
        "sentences": [
            {"caption": c, "video_id": "video5", "sen_id": 100 + i}
            for i, c in enumerate(MSRVTT_CAPTIONS["video5"])
        ]
        + [{"caption": "garbage", "video_id": "video6", "sen_id": 200}],
    }
    annotations = root / "annotations"
    annotations.mkdir()
    (annotations / "train_val_videodatainfo.json").write_text(json.dumps(train_val))
    (annotations / "test_videodatainfo.json").write_text(json.dumps(test))
    (annotations / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\n"
        "ret0,msr5,video5,a woman sings on stage\n"
        "ret1,msr0,video0,a car drives past\n"
    )
    return {"annotations": annotations, "videos": videos, "files": files, "root": root}


def read_tar(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def read_split(split_dir: Path) -> dict[str, bytes]:
    """All members of all shards of a split folder, checked against sizes.json / nshards.txt."""
    sizes = json.loads((split_dir / "sizes.json").read_text())
    assert int((split_dir / "nshards.txt").read_text()) == len(sizes)
    assert sorted(sizes) == sorted(p.name for p in split_dir.glob("*.tar"))
    members: dict[str, bytes] = {}
    for name, count in sizes.items():
        shard = read_tar(split_dir / name)
        assert len({m.split(".")[0] for m in shard}) == count
        members.update(shard)
    return members


def eval_read(split_dir: Path) -> dict[str, Any]:
    """Keys, captions and metadata as `vlpt eval retrieval` reads them."""
    out: dict[str, Any] = {"key": [], "captions": [], "meta": [], "skips": {}, "shape": []}
    batches = iter_eval_batches(
        [Source(url=str(split_dir))], image_size=32, mean=MEAN, std=STD, batch_size=4
    )
    for batch in batches:
        for name in ("key", "captions", "meta"):
            out[name] += batch[name]
        out["skips"].update(batch["skips"])
        out["shape"].append(tuple(batch["image"].shape))
    return out


# ---------------------------------------------------------------------------------------------
# COCO / Flickr30k


def test_coco_all_splits_read_back_with_the_eval_reader(coco, tmp_path):
    out = tmp_path / "coco"
    summary = convert_karpathy(
        coco["annotations"], coco["images"], out, shard_size=2, progress=False
    )

    assert summary["skipped"] == {}
    assert {s: v["items"] for s, v in summary["splits"].items()} == {
        "train": 1,
        "val": 1,
        "test": 3,
        "restval": 1,
    }
    assert summary["splits"]["test"] == {"items": 3, "captions": 15, "shards": 2, "skipped": {}}
    assert json.loads((out / "test" / "sizes.json").read_text()) == {"00000.tar": 2, "00001.tar": 1}

    read = eval_read(out / "test")
    tests = [e for e in coco["entries"] if e["split"] == "test"]
    assert read["key"] == [e["filename"].removesuffix(".jpg") for e in tests]
    assert read["captions"] == [[" ".join(s["raw"].split()) for s in e["sentences"]] for e in tests]
    assert read["captions"][0][0] == "A man with a red helmet on a small moped 0."
    assert read["skips"] == {}
    assert read["shape"] == [(3, 3, 32, 32)]
    meta = read["meta"][0]
    assert meta["cocoid"] == 391895 and meta["filepath"] == "val2014"
    assert meta["filename"] == "COCO_val2014_000000391895.jpg"
    assert (meta["width"], meta["height"], meta["captions_n"]) == (48, 40, 5)
    assert meta["sentids"] == tests[0]["sentids"]

    # The JPEG bytes are the original file's, and the txt is one caption a line.
    members = read_split(out / "test")
    for entry in tests:
        key = entry["filename"].removesuffix(".jpg")
        assert members[f"{key}.jpg"] == coco["files"][entry["filename"]]
        assert members[f"{key}.txt"].decode().split("\n") == [
            " ".join(s["raw"].split()) for s in entry["sentences"]
        ]
        assert set(members) >= {f"{key}.json"}

    info = json.loads((out / "info.json").read_text())
    assert info["name"] == "coco-karpathy" and info["splits"]["restval"]["items"] == 1
    assert info["annotations"] == [str(coco["annotations"])]


def test_coco_restval_into_train_and_one_split(coco, tmp_path):
    out = tmp_path / "coco"
    summary = convert_karpathy(
        coco["annotations"],
        coco["images"],
        out,
        splits=["train"],
        restval_into_train=True,
        progress=False,
    )
    assert list(summary["splits"]) == ["train"]
    assert sorted(p.name for p in out.iterdir()) == ["info.json", "train"]
    keys = sorted(m.split(".")[0] for m in read_split(out / "train"))
    assert keys == ["COCO_train2014_000000057870"] * 3 + ["COCO_val2014_000000060623"] * 3
    meta = json.loads(read_split(out / "train")["COCO_val2014_000000060623.json"])
    assert meta["split"] == "restval"

    # A second run adds its split to info.json, and a shorter re-run removes stale shards.
    convert_karpathy(
        coco["annotations"], coco["images"], out, splits=["test"], shard_size=1, progress=False
    )
    assert len(list((out / "test").glob("*.tar"))) == 3
    convert_karpathy(
        coco["annotations"], coco["images"], out, splits=["test"], shard_size=2, progress=False
    )
    assert sorted(p.name for p in (out / "test").glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert set(json.loads((out / "info.json").read_text())["splits"]) == {"train", "test"}


def test_flickr_skips_and_counts_bad_items(flickr, tmp_path, capsys):
    out = tmp_path / "flickr"
    code = main(
        [
            "data", "convert", "karpathy", str(out),
            "--annotations", str(flickr["annotations"]),
            "--images", str(flickr["images"]),
            "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert summary["name"] == "flickr30k-karpathy"
    assert summary["skipped"] == {
        "empty_file": 1,
        "malformed_entry": 1,
        "missing_image": 1,
        "no_captions": 1,
        "undecodable_image": 1,
        "unknown_split": 1,
    }
    assert summary["splits"]["test"]["skipped"]["missing_image"] == 1
    assert {s: v["items"] for s, v in summary["splits"].items()} == {
        "train": 1,
        "val": 1,
        "test": 3,
    }
    assert captured.err.startswith("vlpt: skipped 6: empty_file=1 (first: ")
    assert str(flickr["images"] / "1001465944.jpg") in captured.err

    members = read_split(out / "test")
    assert members["1000344755.png"] == (flickr["images"] / "1000344755.jpg").read_bytes()
    assert Image.open(io.BytesIO(members["1000366164.png"])).format == "PNG"
    read = eval_read(out / "test")
    assert read["key"] == ["1000268201", "1000344755", "1000366164"]
    assert read["captions"][1] == captions_of("png")
    assert read["skips"] == {}


# ---------------------------------------------------------------------------------------------
# MSR-VTT


def test_msrvtt_official_splits_and_1k_a(msrvtt, tmp_path):
    out = tmp_path / "msrvtt"
    ann = msrvtt["annotations"]
    summary = convert_msrvtt(
        [
            ann / "train_val_videodatainfo.json",
            ann / "test_videodatainfo.json",
            ann / "MSRVTT_JSFUSION_test.csv",
        ],
        [msrvtt["videos"]],
        out,
        shard_size=1,
        progress=False,
    )
    assert summary["skipped"] == {"missing_video": 1, "no_captions": 1, "undecodable_video": 1}
    assert {s: v["items"] for s, v in summary["splits"].items()} == {
        "train": 2,
        "val": 1,
        "test": 1,
        "test1k": 2,
    }
    expected = {
        "train": {"video0": MSRVTT_CAPTIONS["video0"], "video1": MSRVTT_CAPTIONS["video1"]},
        "val": {"video2": MSRVTT_CAPTIONS["video2"]},
        "test": {"video5": MSRVTT_CAPTIONS["video5"]},
        "test1k": {"video5": ["a woman sings on stage"], "video0": ["a car drives past"]},
    }
    for split, videos in expected.items():
        members = read_split(out / split)
        assert sorted(members) == sorted(
            f"{v}.{ext}" for v in videos for ext in ("json", "mp4", "txt")
        )
        assert [p.name for p in sorted((out / split).glob("*.tar"))][0] == "00000.tar"
        for video, captions in videos.items():
            assert members[f"{video}.mp4"] == msrvtt["files"][video]
            assert members[f"{video}.txt"].decode().split("\n") == captions
            meta = json.loads(members[f"{video}.json"])
            assert meta["key"] == meta["video_id"] == video
            assert (meta["width"], meta["height"], meta["fps"], meta["frames"]) == (32, 32, 10, 6)
            assert meta["duration"] == pytest.approx(0.6, abs=0.15)
            assert meta["category"] == int(video[5:]) % 20
    meta = json.loads(read_split(out / "test1k")["video0.json"])
    assert meta["split"] == "test1k" and meta["msrvtt_split"] == "train"
    assert meta["start_time"] == 10.0 and meta["url"].endswith("clip0")
    assert json.loads(read_split(out / "val")["video2.json"])["split"] == "validate"


def test_msrvtt_1k_a_json_and_split_choice(msrvtt, tmp_path, capsys):
    test1k = msrvtt["root"] / "msrvtt_test1k.json"
    test1k.write_text(
        json.dumps(
            [
                {"video": "video5.mp4", "caption": "a woman sings on stage"},
                {"video": "video1.mp4", "caption": ["a chef cooks", "someone makes food"]},
            ]
        )
    )
    out = tmp_path / "msrvtt"
    code = main(
        [
            "data", "convert", "msrvtt", str(out),
            "--annotations", str(test1k),
            "--annotations", str(msrvtt["annotations"] / "train_val_videodatainfo.json"),
            "--videos", str(tmp_path),
            "--videos", str(msrvtt["videos"]),
            "--split", "test1k",
            "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert list(summary["splits"]) == ["test1k"] and summary["skipped"] == {}
    members = read_split(out / "test1k")
    assert members["video1.txt"] == b"a chef cooks\nsomeone makes food"
    assert json.loads(members["video1.json"])["category"] == 1


# ---------------------------------------------------------------------------------------------
# File-level mistakes: one sentence, exit code 2, no traceback


def _karpathy(ann: str | Path, images: str | Path, out: Path, *extra: str) -> list[str]:
    return [
        "data",
        "convert",
        "karpathy",
        str(out),
        "--annotations",
        str(ann),
        "--images",
        str(images),
        "--quiet",
        *extra,
    ]


def _msrvtt(ann: str | Path, videos: str | Path, out: Path, *extra: str) -> list[str]:
    return [
        "data",
        "convert",
        "msrvtt",
        str(out),
        "--annotations",
        str(ann),
        "--videos",
        str(videos),
        "--quiet",
        *extra,
    ]


BAD_INPUTS = {
    "missing annotations": (
        lambda d: _karpathy(d["tmp"] / "dataset_coco.json", d["coco"]["images"], d["out"]),
        "dataset_coco.json does not exist",
    ),
    "not json": (
        lambda d: _karpathy(d["write"]("bad.json", "{'images': ["), d["coco"]["images"], d["out"]),
        "is not valid JSON",
    ),
    "msr-vtt file given to karpathy": (
        lambda d: _karpathy(
            d["msrvtt"]["annotations"] / "train_val_videodatainfo.json",
            d["coco"]["images"],
            d["out"],
        ),
        "is not a Karpathy-split annotation file",
    ),
    "karpathy file given to msrvtt": (
        lambda d: _msrvtt(d["coco"]["annotations"], d["msrvtt"]["videos"], d["out"]),
        "is not an MSR-VTT annotation file",
    ),
    "entries without split": (
        lambda d: _karpathy(
            d["write"]("x.json", json.dumps({"images": [{"filename": "a.jpg"}]})),
            d["coco"]["images"],
            d["out"],
        ),
        "has no image in a train, val, test or restval split",
    ),
    "missing image folder": (
        lambda d: _karpathy(d["coco"]["annotations"], d["tmp"] / "nowhere", d["out"]),
        "image folder",
    ),
    "no image found": (
        lambda d: _karpathy(d["coco"]["annotations"], d["tmp"], d["out"]),
        "no item could be converted",
    ),
    "split not in file": (
        lambda d: _karpathy(
            d["flickr_no_test"], d["flickr"]["images"], d["out"], "--split", "test"
        ),
        "has no item in split 'test'",
    ),
    "csv without the columns": (
        lambda d: _msrvtt(
            d["write"]("t.csv", "id,text\n1,hello\n"), d["msrvtt"]["videos"], d["out"]
        ),
        "has no 'video_id' and 'sentence' columns",
    ),
    "videodatainfo without sentences": (
        lambda d: _msrvtt(
            d["write"]("v.json", json.dumps({"videos": [msrvtt_video(0, "train")]})),
            d["msrvtt"]["videos"],
            d["out"],
        ),
        "has a 'videos' list but no 'sentences' list",
    ),
    "missing video folder": (
        lambda d: _msrvtt(
            d["msrvtt"]["annotations"] / "MSRVTT_JSFUSION_test.csv", d["tmp"] / "videos", d["out"]
        ),
        "video folder",
    ),
    "zero shard size": (
        lambda d: _karpathy(
            d["coco"]["annotations"], d["coco"]["images"], d["out"], "--shard-size", "0"
        ),
        "shard size must be at least 1",
    ),
    "output is a file": (
        lambda d: _karpathy(
            d["coco"]["annotations"], d["coco"]["images"], d["coco"]["annotations"]
        ),
        "cannot create the output folder",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_file_level_mistakes_are_one_sentence(case, coco, flickr, msrvtt, tmp_path, capsys):
    def write(name: str, text: str) -> Path:
        (tmp_path / name).write_text(text)
        return tmp_path / name

    flickr_no_test = json.loads(flickr["annotations"].read_text())
    flickr_no_test["images"] = [e for e in flickr_no_test["images"] if e.get("split") != "test"]
    context = {
        "tmp": tmp_path,
        "out": tmp_path / "out",
        "coco": coco,
        "flickr": flickr,
        "msrvtt": msrvtt,
        "write": write,
        "flickr_no_test": write("flickr_no_test.json", json.dumps(flickr_no_test)),
    }
    argv, message = BAD_INPUTS[case]
    assert main(argv(context)) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlpt: error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_api_raises_conversion_error(coco, tmp_path):
    with pytest.raises(ConversionError, match="unknown split 'dev'"):
        convert_karpathy(coco["annotations"], coco["images"], tmp_path, splits=["dev"])
    with pytest.raises(ConversionError, match="restval is written into train"):
        convert_karpathy(
            coco["annotations"],
            coco["images"],
            tmp_path,
            splits=["restval"],
            restval_into_train=True,
        )
