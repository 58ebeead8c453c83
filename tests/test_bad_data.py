"""Bad input is skipped and counted per reason, never raised; a source with nothing usable is an
error that names it, also for an infinite resampled stream (which must raise, not hang)."""

from __future__ import annotations

import io
import itertools
import tarfile
from pathlib import Path

import pytest
from data_fixtures import (
    MEAN,
    STD,
    IdTokenizer,
    bomb_png,
    image_bytes,
    sample,
    sample_ids,
    write_dataset,
    write_shard,
)
from PIL import Image

import vlpt.data.loader
from vlpt.config import DataConfig, Source
from vlpt.data import DataSourceError, SkipCounter, build_train_loader, iter_eval_batches

GOOD = [sample(f"good{i}", f"0 0 {i}") for i in range(3)]


def eval_items(*urls: str, **kw) -> tuple[list[str], SkipCounter]:
    """Keys of all evaluation items, and the skips summed over batches."""
    kw = {"image_size": 16, "mean": MEAN, "std": STD, "batch_size": 2, **kw}
    keys, skips = [], SkipCounter()
    for batch in iter_eval_batches([Source(url=u) for u in urls], **kw):
        keys += batch["key"]
        skips.update(batch["skips"])
    return keys, skips


def train_batches(cfg: DataConfig, n: int, **kw) -> list[dict]:
    kw = {
        "image_size": 16,
        "mean": MEAN,
        "std": STD,
        "batch_size": 4,
        "tokenizer": IdTokenizer(),
        **kw,
    }
    return list(itertools.islice(build_train_loader(cfg, **kw), n))


def truncated_jpeg() -> bytes:
    """A JPEG whose header is intact but whose scan data is cut: it fails only when decoded."""
    data = image_bytes(96, 96, seed=9)
    data = data[: len(data) * 3 // 4]
    image = Image.open(io.BytesIO(data))
    with pytest.raises(OSError):
        image.load()
    return data


BAD_SAMPLES = {
    "not_an_image": ("undecodable_image", sample("bad", "0 0 9", b"<html>404 not found</html>")),
    "truncated_jpeg": ("undecodable_image", sample("bad", "0 0 9", truncated_jpeg())),
    "zero_byte_image": ("empty_file", sample("bad", "0 0 9", b"")),
    "zero_byte_caption": ("empty_file", sample("bad", b"")),
    "decompression_bomb": ("image_too_large", sample("bad", "0 0 9", bomb_png(), ext="png")),
    "missing_caption": ("missing_caption", sample("bad", None)),
    "blank_caption": ("empty_caption", sample("bad", b"  \n\t\n")),
    "invalid_utf8": ("bad_utf8", sample("bad", b"a caption \xff\xfe")),
    "no_media_file": ("missing_image", sample("bad", "0 0 9", b"GIF89a", ext="gif")),
}


@pytest.mark.parametrize("case", BAD_SAMPLES)
def test_each_bad_sample_is_skipped_and_counted(tmp_path, case):
    reason, bad = BAD_SAMPLES[case]
    write_shard(tmp_path / "00000.tar", [GOOD[0], bad, *GOOD[1:]])
    keys, skips = eval_items(str(tmp_path))
    assert keys == ["good0", "good1", "good2"]
    assert skips == {reason: 1}


def test_images_over_max_image_pixels_are_skipped_from_the_header(tmp_path):
    write_shard(tmp_path / "00000.tar", [sample("big", "1 1 1", image_bytes(90, 80)), *GOOD])
    keys, skips = eval_items(str(tmp_path), max_image_pixels=64 * 64)
    assert keys == ["good0", "good1", "good2"] and skips == {"image_too_large": 1}
    cfg = DataConfig(train=[str(tmp_path)], workers=0, shuffle_buffer=0, max_image_pixels=64 * 64)
    batches = train_batches(cfg, 6)
    assert {i for b in batches for i in sample_ids(b)} == {(0, 0, 0), (0, 0, 1), (0, 0, 2)}
    assert sum(b["skips"].get("image_too_large", 0) for b in batches) >= 4


def _member_offsets(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


@pytest.mark.parametrize("where", ["inside_a_file", "between_files", "inside_a_header"])
def test_truncated_tar_keeps_the_samples_before_the_cut(tmp_path, where):
    shard = write_shard(tmp_path / "00000.tar", [sample(f"{i}", f"0 0 {i}") for i in range(6)])
    members = _member_offsets(shard)  # 0.jpg 0.txt 1.jpg 1.txt ...
    fourth_jpg = members[8]
    cut = {
        "inside_a_file": fourth_jpg.offset_data + fourth_jpg.size // 2,
        "between_files": fourth_jpg.offset,
        "inside_a_header": fourth_jpg.offset + 100,
    }[where]
    shard.write_bytes(shard.read_bytes()[:cut])
    keys, skips = eval_items(str(shard))
    assert keys == ["0", "1", "2", "3"]
    assert skips == {"truncated_tar": 1}


def test_truncated_gzipped_tar_is_counted(tmp_path):
    import gzip

    shard = write_shard(tmp_path / "plain.tar", [sample(f"{i}", f"0 0 {i}") for i in range(6)])
    zipped = gzip.compress(shard.read_bytes())
    (tmp_path / "cut.tar.gz").write_bytes(zipped[: len(zipped) * 2 // 3])
    keys, skips = eval_items(str(tmp_path / "cut.tar.gz"))
    assert 0 < len(keys) < 6 and skips == {"truncated_tar": 1}


def test_empty_shards_are_counted(tmp_path):
    write_dataset(tmp_path, n_shards=1, per_shard=3)
    with tarfile.open(tmp_path / "00001.tar", "w"):
        pass  # a valid tar with no member
    (tmp_path / "00002.tar").write_bytes(b"")  # a zero-byte file
    keys, skips = eval_items(str(tmp_path))
    assert len(keys) == 3 and skips == {"empty_shard": 2}


def test_unreadable_shards_are_counted_when_others_work(tmp_path):
    write_dataset(tmp_path, n_shards=2, per_shard=3)
    (tmp_path / "00002.tar").write_bytes(b"\x89PNG not a tar at all" * 40)
    pattern = (
        f"{tmp_path}/{{00000..00003}}.tar::pipe:cat {tmp_path}/missing.tar"  # 00003 missing too
    )
    keys, skips = eval_items(pattern)
    assert len(keys) == 6 and skips == {"unreadable_shard": 3}
    cfg = DataConfig(train=[pattern], workers=0, shuffle_buffer=4)
    batches = train_batches(cfg, 20)
    assert sum(b["skips"].get("unreadable_shard", 0) for b in batches) > 0
    assert len({i for b in batches for i in sample_ids(b)}) == 6


def test_training_never_stops_on_bad_samples(tmp_path):
    bad = [bad for _, bad in BAD_SAMPLES.values()]
    write_shard(tmp_path / "00000.tar", [s | {"__key__": f"{i}"} for i, s in enumerate(bad + GOOD)])
    write_shard(tmp_path / "00001.tar", GOOD[:1] + bad[:2])
    with open(tmp_path / "00002.tar", "wb") as f:
        f.write(b"\0" * 100)  # not a tar
    for workers in (0, 1):
        cfg = DataConfig(train=[str(tmp_path)], workers=workers, shuffle_buffer=10)
        batches = train_batches(cfg, 40)
        assert len(batches) == 40 and all(len(b["image"]) == 4 for b in batches)
        seen = SkipCounter()
        for b in batches:
            seen.update(b["skips"])
        expected = {reason for reason, _ in BAD_SAMPLES.values()} | {"unreadable_shard"}
        assert set(seen) == expected


# ---------------------------------------------------------------------------------------------
# Sources that yield nothing at all


@pytest.fixture
def dead_source(tmp_path) -> Path:
    """Two shards that open, but hold nothing usable: one empty, one of captionless samples."""
    folder = tmp_path / "dead"
    with tarfile.open(folder.mkdir() or folder / "00000.tar", "w"):
        pass
    write_shard(folder / "00001.tar", [sample(f"{i}", None) for i in range(3)])
    return folder


@pytest.mark.parametrize("workers", [0, 1])
def test_resampled_stream_raises_for_a_source_that_yields_nothing(tmp_path, dead_source, workers):
    write_dataset(tmp_path / "alive", n_shards=1, per_shard=4)
    sources = [str(tmp_path / "alive"), str(dead_source)]
    cfg = DataConfig(train=sources, workers=workers, shuffle_buffer=4)
    with pytest.raises(DataSourceError) as error:
        train_batches(cfg, 10_000)
    message = str(error.value)
    assert (
        message.startswith(f"source '{dead_source}' yields no usable sample")
        and "\n" not in message
    )


def test_all_shards_missing_raises_naming_the_source(tmp_path):
    write_dataset(tmp_path / "d", n_shards=1)
    (tmp_path / "d" / "00000.tar").write_bytes(b"junk" * 300)
    with pytest.raises(DataSourceError, match=f"source '{tmp_path / 'd'}' yields no usable sample"):
        train_batches(DataConfig(train=[str(tmp_path / "d")], workers=0), 5)
    with pytest.raises(DataSourceError, match="no file matches the shard pattern"):
        train_batches(DataConfig(train=[f"{tmp_path}/none/{{0..9}}.tar"], workers=0), 5)


def test_source_of_undecodable_images_raises_instead_of_spinning(tmp_path, monkeypatch):
    monkeypatch.setattr(vlpt.data.loader, "MAX_UNDECODABLE_BEFORE_FIRST_IMAGE", 5)
    write_shard(
        tmp_path / "00000.tar", [sample(f"{i}", "0 0 0", truncated_jpeg()) for i in range(3)]
    )
    cfg = DataConfig(train=[str(tmp_path)], workers=0, shuffle_buffer=0)
    with pytest.raises(DataSourceError, match="its first 5 images could not be decoded"):
        train_batches(cfg, 100)


def test_eval_and_single_pass_raise_for_a_source_that_yields_nothing(tmp_path, dead_source):
    write_dataset(tmp_path / "alive", n_shards=1, per_shard=3)
    with pytest.raises(
        DataSourceError, match=f"evaluation source '{dead_source}' yields no usable sample"
    ):
        eval_items(str(tmp_path / "alive"), str(dead_source))
    cfg = DataConfig(train=[str(dead_source)], workers=1, resampled=False)
    with pytest.raises(
        DataSourceError, match=f"training sources '{dead_source}' gave no full batch"
    ):
        train_batches(cfg, 5)
