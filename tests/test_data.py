"""Shard streaming: URL expansion, tar reading, splitting, determinism, mixing, transforms, eval."""

from __future__ import annotations

import collections
import gzip
import io
import itertools
import random
import tarfile

import numpy as np
import open_clip
import pytest
import torch
import torchvision.transforms.functional as TF
from data_fixtures import (
    IdTokenizer,
    halves_jpeg,
    image_bytes,
    sample,
    sample_ids,
    write_dataset,
    write_shard,
)
from PIL import Image
from torchvision.transforms import InterpolationMode

from vlpt.config import DataConfig, Source
from vlpt.data import (
    CaptionTokens,
    DataSourceError,
    EvalTransform,
    SkipCounter,
    SkipReason,
    TrainTransform,
    build_train_loader,
    check_source,
    expand_urls,
    iter_eval_batches,
    normalize_batch,
    read_shard,
)

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


def train_batches(cfg: DataConfig, n: int | None = None, tokenizer=None, **kw) -> list[dict]:
    kw = {"image_size": 32, "mean": MEAN, "std": STD, "batch_size": 4, **kw}
    loader = build_train_loader(cfg, tokenizer=tokenizer or IdTokenizer(), **kw)
    return list(itertools.islice(loader, n))


def eval_batches(*urls: str, **kw) -> list[dict]:
    kw = {"image_size": 32, "mean": MEAN, "std": STD, "batch_size": 5, **kw}
    return list(iter_eval_batches([Source(url=u) for u in urls], **kw))


# ---------------------------------------------------------------------------------------------
# URLs and sources


def test_folder_expands_to_sorted_tars_ignoring_img2dataset_side_files(tmp_path):
    write_dataset(tmp_path, n_shards=3)
    (tmp_path / "sizes.json").write_text("{}")
    assert expand_urls(str(tmp_path)) == [str(tmp_path / f"{i:05d}.tar") for i in range(3)]


def test_braces_and_joins_expand_in_order(tmp_path):
    write_dataset(tmp_path / "a", n_shards=3)
    write_dataset(tmp_path / "b", n_shards=2)
    a, b = tmp_path / "a", tmp_path / "b"
    urls = expand_urls(f"{a}/{{00001..00002}}.tar::{b}")
    assert urls == [f"{a}/00001.tar", f"{a}/00002.tar", f"{b}/00000.tar", f"{b}/00001.tar"]


def test_remote_urls_and_pipes_pass_through_with_braces_expanded():
    assert expand_urls("https://host/d/{0..1}.tar::pipe:aws s3 cp s3://b/{a,b}.tar -") == [
        "https://host/d/0.tar",
        "https://host/d/1.tar",
        "pipe:aws s3 cp s3://b/a.tar -",
        "pipe:aws s3 cp s3://b/b.tar -",
    ]


def test_patterns_that_match_nothing_name_the_pattern(tmp_path):
    with pytest.raises(
        DataSourceError, match=r"no file matches the shard pattern '.*/nope/\{0\.\.3\}\.tar'"
    ):
        expand_urls(f"{tmp_path}/nope/{{0..3}}.tar")
    (tmp_path / "only_parquet").mkdir()
    (tmp_path / "only_parquet" / "00000.parquet").write_bytes(b"x")
    with pytest.raises(DataSourceError, match="folder '.*only_parquet' holds no .tar shard"):
        expand_urls(str(tmp_path / "only_parquet"))


def test_partly_missing_brace_pattern_is_kept_whole(tmp_path):
    write_dataset(tmp_path, n_shards=2)
    assert len(expand_urls(f"{tmp_path}/{{00000..00003}}.tar")) == 4


def test_check_source_counts_the_first_shard(tmp_path):
    write_dataset(tmp_path, n_shards=3, per_shard=5)
    assert check_source(Source(url=str(tmp_path))) == {
        "url": str(tmp_path),
        "n_shards": 3,
        "first_shard_samples": 5,
    }


def test_check_source_names_a_source_whose_first_shard_cannot_be_read(tmp_path):
    (tmp_path / "00000.tar").write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(DataSourceError, match=f"source '{tmp_path}'.*first shard"):
        check_source(Source(url=str(tmp_path)))


# ---------------------------------------------------------------------------------------------
# Reading tar files


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_formats_and_long_names_are_read(tmp_path, fmt):
    key = "deep/" * 20 + "x" * 90 if fmt != tarfile.USTAR_FORMAT else "dir/" * 30 + "abc"
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(tarfile.TarInfo("somedir"))  # a non-file member is skipped
        for ext, data in (("jpg", b"JPEG"), ("txt", "caption é".encode())):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.pax_headers = {"comment": "x" * 10}
            tar.addfile(info, io.BytesIO(data))
    skips = SkipCounter()
    assert list(read_shard(str(path), skips)) == [
        {"__key__": key, "__url__": str(path), "jpg": b"JPEG", "txt": "caption é".encode()}
    ]
    assert skips == {}


def test_gzipped_shards_and_pipes_are_read(tmp_path):
    plain = write_dataset(tmp_path, n_shards=1, per_shard=4)[0]
    zipped = tmp_path / "z.tar.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    expected = [s["__key__"] for s in read_shard(str(plain), SkipCounter())]
    for url in (str(zipped), f"pipe:cat {plain}"):
        skips = SkipCounter()
        assert [s["__key__"] for s in read_shard(url, skips)] == expected
        assert skips == {}


# ---------------------------------------------------------------------------------------------
# Training stream


def test_train_batches_have_the_documented_shapes_and_types(tmp_path):
    write_dataset(tmp_path, n_shards=2, per_shard=6)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=32)
    cfg = DataConfig(train=[str(tmp_path)], workers=0, shuffle_buffer=8)
    batches = train_batches(cfg, 3, tokenizer=tokenizer, image_size=40, batch_size=5)
    all_rows = tokenizer([f"0 {s} {i}" for s in range(2) for i in range(6)])
    for batch in batches:
        assert batch["image"].dtype == torch.float32 and batch["image"].shape == (5, 3, 40, 40)
        assert batch["image"].is_contiguous()
        text = batch["text"]  # (5, L): cut to the longest caption of the batch
        assert text.dtype == torch.long and text.shape[0] == 5 and text.shape[1] <= 32
        assert (text[:, -1] != 0).any()  # no all-padding column is kept
        padded = torch.nn.functional.pad(text, (0, 32 - text.shape[1]))
        assert all((all_rows == row).all(1).any() for row in padded)
        assert batch["skips"] == {}
        low = torch.tensor([-m / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
        high = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
        assert (batch["image"] >= low - 1e-5).all() and (batch["image"] <= high + 1e-5).all()


def test_ranks_and_workers_read_disjoint_shards_that_cover_everything(tmp_path):
    write_dataset(tmp_path, n_shards=4, per_shard=8)
    cfg = DataConfig(train=[str(tmp_path)], workers=2, shuffle_buffer=6, resampled=False)
    seen = {}
    for rank in range(2):
        batches = train_batches(cfg, rank=rank, world_size=2)
        # each of the 2 workers of this rank holds one whole shard: a batch never mixes shards
        assert all(len({shard for _, shard, _ in sample_ids(b)}) == 1 for b in batches)
        seen[rank] = [i for b in batches for i in sample_ids(b)]
        assert len({shard for _, shard, _ in seen[rank]}) == 2
    everything = {(0, s, i) for s in range(4) for i in range(8)}
    assert len(seen[0]) + len(seen[1]) == len(everything)
    assert set(seen[0]) | set(seen[1]) == everything


def test_same_arguments_give_the_same_batches(tmp_path):
    write_dataset(tmp_path, n_shards=3, per_shard=8)
    cfg = DataConfig(train=[str(tmp_path)], workers=2, shuffle_buffer=10, crop_scale=(0.3, 1.0))
    first, again = train_batches(cfg, 5, seed=7), train_batches(cfg, 5, seed=7)
    for a, b in zip(first, again):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])
    other = train_batches(cfg, 5, seed=8)
    assert [sample_ids(b) for b in other] != [sample_ids(b) for b in first]
    other_rank = train_batches(cfg, 5, seed=7, rank=1, world_size=2)
    assert [sample_ids(b) for b in other_rank] != [sample_ids(b) for b in first]


def test_sources_are_mixed_by_weight(tmp_path):
    write_dataset(tmp_path / "a", n_shards=2, per_shard=8, source=0)
    write_dataset(tmp_path / "b", n_shards=2, per_shard=8, source=1)
    sources = [
        {"url": str(tmp_path / "a"), "weight": 3.0},
        {"url": str(tmp_path / "b"), "weight": 1.0},
    ]
    cfg = DataConfig(train=sources, workers=0, shuffle_buffer=20)
    batches = train_batches(cfg, 100, batch_size=8, image_size=16)
    counts = collections.Counter(src for b in batches for src, _, _ in sample_ids(b))
    assert abs(counts[0] / 800 - 0.75) < 0.06  # binomial sd 0.015


def test_one_caption_line_is_picked_at_random(tmp_path):
    write_shard(tmp_path / "00000.tar", [sample("a", "5 1 1\n\n  5 2 2  \n"), sample("b", "6 0 0")])
    cfg = DataConfig(train=[str(tmp_path)], workers=0, shuffle_buffer=0)
    ids = collections.Counter(i for b in train_batches(cfg, 10) for i in sample_ids(b))
    assert set(ids) == {(5, 1, 1), (5, 2, 2), (6, 0, 0)}
    assert ids[(6, 0, 0)] == 20  # resampled, one shard of two samples: each sample half the time


def test_training_images_are_never_flipped(tmp_path):
    write_shard(tmp_path / "00000.tar", [sample(f"{i}", "0 0 0", halves_jpeg()) for i in range(4)])
    cfg = DataConfig(train=[str(tmp_path)], workers=0, shuffle_buffer=0, crop_scale=(0.9, 1.0))
    for batch in train_batches(cfg, 10, batch_size=8):
        mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
        pixels = batch["image"] * std + mean  # (B, 3, 32, 32) in [0, 1]
        left, right = pixels[..., :4].mean((2, 3)), pixels[..., -4:].mean((2, 3))  # (B, 3)
        assert (left[:, 0] > 0.8).all() and (left[:, 2] < 0.2).all()
        assert (right[:, 2] > 0.8).all() and (right[:, 0] < 0.2).all()


def test_worker_skip_counts_reach_the_training_process(tmp_path):
    good = [sample(f"{i:03d}", "0 0 0") for i in range(6)]
    bad = [sample("x1", None), sample("x2", b"\xff\xfe"), sample("x3", "0 0 0", b"not an image")]
    write_shard(tmp_path / "00000.tar", good[:3] + bad + good[3:])
    cfg = DataConfig(train=[str(tmp_path)], workers=1, shuffle_buffer=4)
    total = SkipCounter()
    for batch in train_batches(cfg, 12):
        total.update(batch["skips"])
    assert set(total) == {"missing_caption", "bad_utf8", "undecodable_image"}
    assert total["missing_caption"] >= 4  # the shard is read again and again (resampled)


# ---------------------------------------------------------------------------------------------
# Evaluation stream


def test_eval_batches_keep_shard_order_all_captions_and_metadata(tmp_path):
    write_dataset(tmp_path / "a", n_shards=2, per_shard=4)  # img2dataset layout, loaded unchanged
    write_shard(
        tmp_path / "b" / "00000.tar",
        [sample("k1", "first\n\nsecond  \n third"), sample("k2", "only", meta=None)],
    )
    batches = eval_batches(str(tmp_path / "a"), str(tmp_path / "b"))
    assert [len(b["key"]) for b in batches] == [5, 5]
    keys = [k for b in batches for k in b["key"]]
    assert keys == [f"{i:09d}" for i in range(8)] + ["k1", "k2"]
    captions = [c for b in batches for c in b["captions"]]
    assert captions[:2] == [["0 0 0"], ["0 0 1"]] and captions[8:] == [
        ["first", "second", "third"],
        ["only"],
    ]
    metas = [m for b in batches for m in b["meta"]]
    assert metas[5] == {"shard": 1, "item": 1} and metas[9] == {}
    assert batches[0]["image"].shape == (5, 3, 32, 32) and batches[0]["skips"] == {}


def test_eval_max_items_stops_early(tmp_path):
    write_dataset(tmp_path, n_shards=3, per_shard=4)
    batches = eval_batches(str(tmp_path), max_items=7)
    assert [b["key"] for b in batches] == [
        [f"{i:09d}" for i in range(5)],
        ["000000005", "000000006"],
    ]


# ---------------------------------------------------------------------------------------------
# Transforms


@pytest.mark.parametrize("size", [(48, 48), (64, 48), (40, 90), (97, 61)])
def test_eval_transform_matches_open_clip(size):
    data = image_bytes(*size, seed=3, fmt="PNG")
    reference = open_clip.image_transform(48, is_train=False, mean=MEAN, std=STD)(
        Image.open(io.BytesIO(data))
    )
    ours = normalize_batch(EvalTransform(48)(Image.open(io.BytesIO(data)))[None], MEAN, STD)[0]
    assert (ours - reference).abs().mean() < 1e-3


def test_train_crop_matches_torchvision_resized_crop():
    data = image_bytes(90, 70, seed=5, fmt="PNG")
    transform = TrainTransform(32, scale=(0.3, 0.6))
    left, top, right, bottom = transform.box(90, 70, random.Random(1))
    reference = TF.resized_crop(
        Image.open(io.BytesIO(data)),
        top,
        left,
        bottom - top,
        right - left,
        [32, 32],
        InterpolationMode.BICUBIC,
    )
    ours = transform(Image.open(io.BytesIO(data)), random.Random(1))
    assert np.abs(ours.astype(int) - np.asarray(reference).astype(int)).mean() < 1.5


def test_train_crop_boxes_follow_scale_and_ratio():
    transform = TrainTransform(32, scale=(0.4, 0.8))
    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = transform.box(120, 80, rng)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 120 and 0 <= top < bottom <= 80
        assert 0.4 - 0.02 <= w * h / (120 * 80) <= 0.8 + 0.02
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05


def test_large_jpegs_are_decoded_at_a_reduced_scale():
    rgb = np.asarray(
        Image.open(io.BytesIO(image_bytes(800, 600, seed=2, fmt="PNG"))).convert("RGB")
    )
    jpeg = io.BytesIO()
    Image.fromarray(rgb).save(jpeg, format="JPEG", quality=95)
    image = Image.open(io.BytesIO(jpeg.getvalue()))
    drafted = EvalTransform(64)(image)
    assert image.size == (100, 75)  # the decoder ran at 1/8 scale: box side 600 / 8 = 75 >= 64
    full = EvalTransform(64)(Image.fromarray(rgb))
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 3


def test_normalize_batch_matches_torchvision():
    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 6, 3), dtype=np.uint8)
    reference = torch.stack([TF.normalize(TF.to_tensor(p), MEAN, STD) for p in pixels])
    assert torch.allclose(normalize_batch(pixels, MEAN, STD), reference, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Small parts


def test_caption_tokens_cache_matches_the_tokenizer_and_evicts():
    calls = []

    def tokenizer(texts):
        calls.append(list(texts))
        return IdTokenizer()(texts)

    tokens = CaptionTokens(tokenizer, max_size=3)
    captions = ["1 1", "2 0", "1 1", "3 3 3"]  # rows [START, ..., END, 0, ...]; a 0 inside stays
    assert torch.equal(tokens(captions), IdTokenizer()(captions)[:, :5])
    assert calls == [["1 1", "2 0", "3 3 3"]]
    assert torch.equal(tokens(["4 4", "1 1"]), IdTokenizer()(["4 4", "1 1"])[:, :4])
    assert calls[-1] == ["4 4"] and set(tokens.rows) == {"3 3 3", "4 4", "1 1"}  # "2 0" evicted


def test_skip_counter_reports_one_line_and_resets_on_take():
    skips = SkipCounter()
    assert skips.report() == "skipped 0"
    skips.add(SkipReason.BAD_UTF8)
    skips.add(SkipReason.UNDECODABLE_IMAGE, 2)
    assert skips.report() == "skipped 3: bad_utf8=1 undecodable_image=2"
    assert skips.take() == {"bad_utf8": 1, "undecodable_image": 2} and skips == {}


def test_image_formats_and_modes_decode_to_rgb():
    grey = io.BytesIO()
    Image.new("L", (30, 20), 128).save(grey, format="JPEG")
    rgba = io.BytesIO()
    Image.new("RGBA", (30, 20), (10, 200, 30, 128)).save(rgba, format="PNG")
    palette = io.BytesIO()
    Image.new("P", (30, 20), 3).save(palette, format="PNG")
    for data in (grey.getvalue(), rgba.getvalue(), palette.getvalue(), image_bytes(fmt="WEBP")):
        out = TrainTransform(16)(Image.open(io.BytesIO(data)), random.Random(0))
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
