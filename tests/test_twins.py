"""Hard-negative twins: `vlpt data synth --twins` writes them, `data.twin_pairs` batches them."""

from __future__ import annotations

import io
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import (
    MEAN,
    STD,
    image_bytes,
    paired_loader,
    read_split,
    write_shard,
)
from data_fixtures import sample as raw_sample
from PIL import Image

from vlpt.config import ConfigError, DataConfig, load_config
from vlpt.data import build_train_loader
from vlpt.data.synthetic import held_out_pairs, write_dataset
from vlpt.data.synthetic.world import ObjectSpec, SceneSpec, sample_background, twin_scene


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("twins")
    write_dataset(
        out, seed=3, n_train=60, n_val=10, n_test=10, shard_size=30, twins=True, progress=False
    )
    return out


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_a_twin_is_its_scene_with_one_shape_changed(twins: Path) -> None:
    held_out = set(held_out_pairs(3))
    for sample in read_split(twins, "train"):
        meta = json.loads(sample["json"])
        objects, twin_objects = meta["objects"], meta["twin_objects"]
        changed = [(a, b) for a, b in zip(objects, twin_objects) if a != b]
        assert len(twin_objects) == len(objects) and len(changed) == 1
        old, new = changed[0]
        assert {**old, "shape": new["shape"]} == new and new["shape"] != old["shape"]
        pair = (new["colour"], new["shape"])
        assert pair not in held_out and pair not in {(o["colour"], o["shape"]) for o in objects}
        # Captions: the same templates, one word apart, the old shape for the new.
        captions = sample["txt"].decode().splitlines()
        assert len(meta["twin_captions"]) == len(captions)
        for caption, twin in zip(captions, meta["twin_captions"]):
            words = list(zip(re.findall(r"\w+", caption), re.findall(r"\w+", twin)))
            assert len(words) == len(re.findall(r"\w+", caption)) == len(re.findall(r"\w+", twin))
            assert [(a, b) for a, b in words if a != b] == [(old["shape"], new["shape"])]
        # Pixels: the same render but for the one object, well under a ninth of the image.
        diff = np.abs(_pixels(sample["jpg"]) - _pixels(sample["twin.jpg"])).max(axis=2) > 40
        assert 0 < diff.mean() < 1 / 9
        rows, cols = np.nonzero(diff)  # centred on the changed object's cell
        assert int(rows.mean() * 3 // diff.shape[0]) == old["row"]
        assert int(cols.mean() * 3 // diff.shape[1]) == old["col"]
    for split in ("val", "test"):  # evaluation splits stay as they were
        assert all("twin.jpg" not in s for s in read_split(twins, split))
    assert json.loads((twins / "info.json").read_text())["twins"] is True


def test_a_scene_whose_shapes_cannot_change_has_no_twin() -> None:
    shapes = ("a", "b", "c", "d")
    objects = tuple(ObjectSpec(shape, "red", "small", 0, col) for col, shape in enumerate("abc"))
    spec = SceneSpec(sample_background(np.random.default_rng(0)), objects)
    rng = np.random.default_rng(0)
    assert twin_scene(spec, rng, held_out=(("red", "d"),), shapes=shapes) is None
    twin = twin_scene(spec, rng, held_out=(), shapes=shapes)
    assert twin is not None and {o.shape for o in twin.objects} & {"d"}


def test_twin_pairs_put_each_image_and_its_twin_in_one_batch(twins: Path) -> None:
    # random crops: the twin must get its image's crop
    loader, caption_ids, pairs = paired_loader(
        twins, "twin_captions", image_size=32, crop_scale=(0.5, 0.6), twin_pairs=True
    )
    for batch in itertools.islice(loader, 4):
        images, texts = batch["image"], caption_ids.texts(batch)
        assert images.shape == (6, 3, 32, 32)
        for k in range(0, 6, 2):
            assert pairs[texts[k]] == texts[k + 1]
            # Same crop: most pixels agree (only the changed object differs).
            same = (images[k] - images[k + 1]).abs().amax(dim=0) < 0.2
            assert same.float().mean() > 0.7


def test_twin_pairs_leave_samples_without_a_good_twin_alone_and_need_an_even_batch(
    tmp_path: Path,
) -> None:
    twin_meta = {"twin_captions": ["its twin"]}
    shard = [
        raw_sample("a", "plain image"),  # no twin
        raw_sample("b", "garbage twin", meta=twin_meta) | {"twin.jpg": b"not an image"},
        raw_sample("c", "twin without captions") | {"twin.jpg": image_bytes(seed=3)},
        raw_sample("d", "good", meta=twin_meta) | {"twin.jpg": image_bytes(seed=4)},
    ]
    write_shard(tmp_path / "00000.tar", shard)
    cfg = DataConfig(
        train=[str(tmp_path)], workers=0, shuffle_buffer=1, resampled=False, twin_pairs=True
    )
    captions: list[str] = []

    def remember(texts: list[str]) -> torch.Tensor:
        captions.extend(texts)
        return torch.zeros(len(texts), 2, dtype=torch.long)

    batches = list(
        build_train_loader(cfg, tokenizer=remember, image_size=16, mean=MEAN, std=STD, batch_size=5)
    )
    assert captions == ["plain image", "garbage twin", "twin without captions", "good", "its twin"]
    assert sum(b["skips"].get("undecodable_image", 0) for b in batches) == 1
    with pytest.raises(ConfigError, match="twin_pairs.*even"):
        load_config(None, ["data.twin_pairs=true", "train.batch_size=15"])
