"""Write the synthetic world as WebDataset shards in img2dataset's layout.

    OUT_DIR/info.json                  seed, counts, vocabularies, held-out pairs
    OUT_DIR/{train,val,test}/00000.tar KEY.jpg, KEY.txt (one caption a line), KEY.json
    OUT_DIR/{split}/00000_stats.json   img2dataset-style per-shard stats
    OUT_DIR/{split}/sizes.json         {"00000.tar": count, ...} (read by open_clip)
    OUT_DIR/{split}/nshards.txt        number of shards

Every image draws its randomness from (seed, split, index) alone and each shard is written by
one process with fixed tar metadata, so the output is byte-identical whatever the number of
worker processes.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from vlpt.data.synthetic import world
from vlpt.data.synthetic.captions import make_captions
from vlpt.data.synthetic.render import render_scene

JPEG_QUALITY = 90
_SPLIT_ID = {split: i for i, split in enumerate(world.SPLITS)}
_DOMAIN_STREAM = 1_000
_SHARD_FILE = re.compile(r"^(?P<shard>\d{5})(?P<ext>\.tar|_stats\.json|\.tar\.tmp)$")


@dataclass(frozen=True)
class SynthSettings:
    """What every shard needs to know besides its own range; fixes the output bytes."""

    seed: int
    size: int
    shard_size: int
    captions_per_image: int
    held_out: tuple[tuple[str, str], ...]
    domain: str = "default"
    twins: bool = False
    """Training samples also carry `twin.jpg` and json `twin_captions` (`world.twin_scene`)."""


SampleMaker = Callable[[str, int], dict[str, str | bytes]]
"""(split, index) -> one sample `{"__key__", ext: bytes, ...}`; a picklable function (e.g. a
`functools.partial` of a module-level function), since shards are written in worker processes."""


@dataclass(frozen=True)
class ShardJob:
    """One shard to write: samples [start, stop) of `split`. Picklable, for the worker pool."""

    out_dir: Path
    split: str
    start: int
    stop: int
    shard_size: int
    make_sample: SampleMaker

    @property
    def shard(self) -> int:
        return self.start // self.shard_size

    @property
    def name(self) -> str:
        return f"{self.shard:05d}.tar"


def write_dataset(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_train: int = 20000,
    n_val: int = 1000,
    n_test: int = 1000,
    size: int = 64,
    shard_size: int = 1000,
    captions_per_image: int = 5,
    workers: int | None = None,
    progress: bool = True,
    domain: str = "default",
    twins: bool = False,
) -> dict:
    """Generate the train/val/test image shards of the synthetic world under `out_dir`.

    `domain` picks a variant of the world (`world.DOMAINS`): `novel` has shapes and backgrounds
    the default world never draws, a held-out domain for fine-tuning. `twins`: each training
    sample also carries its hard-negative twin (`twin.jpg`, json `twin_captions`: the same scene
    with one object's shape changed; `data.twin_pairs` trains with both). Returns a summary:
    {"out_dir", "seed", "counts": {split: images}, "shards": {split: n}, "seconds",
    "images_per_minute"}.
    """
    counts = {"train": n_train, "val": n_val, "test": n_test}
    _check_args(seed, counts, size, shard_size, captions_per_image, workers)
    if domain not in world.DOMAINS:
        raise ValueError(f"domain '{domain}' is unknown; use one of {', '.join(world.DOMAINS)}.")
    out = Path(out_dir)
    held_out = world.held_out_pairs(seed, world.DOMAINS[domain].shapes)
    settings = SynthSettings(seed, size, shard_size, captions_per_image, held_out, domain, twins)
    make = partial(make_sample, settings)
    seconds = write_splits(out, counts, shard_size, make, workers=workers, progress=progress)
    info = dataset_info(settings, counts)
    write_text(out / "info.json", json.dumps(info, indent=1))
    return {
        "out_dir": str(out),
        "seed": seed,
        "counts": counts,
        "shards": info["shards"],
        "seconds": round(seconds, 3),
        "images_per_minute": round(60 * sum(counts.values()) / max(seconds, 1e-9)),
    }


def write_splits(
    out: Path,
    counts: dict[str, int],
    shard_size: int,
    make_sample: SampleMaker,
    *,
    workers: int | None,
    progress: bool,
    unit: str = "img",
) -> float:
    """Write `counts[split]` samples of each split as `out/split/%05d.tar` shards of `shard_size`,
    plus each split's sizes.json and nshards.txt; returns the seconds spent writing shards."""
    jobs = [
        ShardJob(out, split, start, min(start + shard_size, n), shard_size, make_sample)
        for split, n in counts.items()
        for start in range(0, n, shard_size)
    ]
    for split in counts:
        _prepare_split_dir(out / split, {j.name for j in jobs if j.split == split})
    start = time.perf_counter()
    _run_jobs(jobs, workers or os.cpu_count() or 1, progress, unit)
    seconds = time.perf_counter() - start
    for split in counts:
        sizes = {j.name: j.stop - j.start for j in jobs if j.split == split}
        write_text(out / split / "sizes.json", json.dumps(sizes, indent=1))
        write_text(out / split / "nshards.txt", str(len(sizes)))
    return seconds


def write_shard(job: ShardJob) -> int:
    """Write one shard through a temporary file, so an interrupted run leaves no truncated tar."""
    path = job.out_dir / job.split / job.name
    tmp = path.with_name(path.name + ".tmp")
    # Fixed mtime and owner: the tar bytes depend on the samples only.
    with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0) as sink:
        for index in range(job.start, job.stop):
            sink.write(job.make_sample(job.split, index))
    os.replace(tmp, path)
    n = job.stop - job.start
    stats = {
        "count": n,
        "successes": n,
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "status_dict": {"success": n},
    }
    write_text(path.with_name(f"{job.shard:05d}_stats.json"), json.dumps(stats, indent=1))
    return n


def make_sample(cfg: SynthSettings, split: str, index: int) -> dict[str, str | bytes]:
    """The sample for image `index` of `split`: key, JPEG, captions and metadata."""
    # Separate streams for layout, pixels and text: changing the caption count leaves images alone.
    # Another domain adds its own stream id, so its layouts are not the default world's.
    domain = world.DOMAINS[cfg.domain]
    stream = [cfg.seed, _SPLIT_ID[split], index]
    if cfg.domain != "default":
        stream.append(_DOMAIN_STREAM + list(world.DOMAINS).index(cfg.domain))
    entropy = np.random.SeedSequence(stream)
    # spawn(4)'s first three children are spawn(3)'s: the twin stream leaves the rest unchanged.
    scene_seq, pixel_seq, text_seq, twin_seq = entropy.spawn(4)
    spec = world.sample_scene(
        np.random.default_rng(scene_seq),
        held_out=cfg.held_out,
        require_held_out=split == "test",
        domain=domain,
    )
    jpeg, captions = _draw(spec, cfg, pixel_seq, text_seq)
    key = f"{index:09d}"
    meta = sample_metadata(spec, key, split, cfg.size, len(captions), cfg.held_out)
    sample: dict[str, str | bytes] = {
        "__key__": key,
        "jpg": jpeg,
        "txt": "\n".join(captions).encode("utf-8"),
    }
    twin = None
    if cfg.twins and split == "train":
        rng = np.random.default_rng(twin_seq)
        twin = world.twin_scene(spec, rng, held_out=cfg.held_out, shapes=domain.shapes)
    if twin is not None:
        # The same pixel and text streams: same jitter, tilt, noise and caption templates.
        sample["twin.jpg"], meta["twin_captions"] = _draw(twin, cfg, pixel_seq, text_seq)
        meta["twin_objects"] = object_records(twin)
    return sample | {"json": json.dumps(meta).encode("utf-8")}


def _draw(
    spec: world.SceneSpec,
    cfg: SynthSettings,
    pixel_seq: np.random.SeedSequence,
    text_seq: np.random.SeedSequence,
) -> tuple[bytes, list[str]]:
    """A scene's JPEG bytes and captions, each from a fresh generator of its stream."""
    pixel_rng = np.random.default_rng(pixel_seq)
    image = render_scene(spec.to_scene(pixel_rng), cfg.size, pixel_rng)
    jpeg = io.BytesIO()
    # 4:4:4 chroma: the default 4:2:0 smears the colour of a 12 px object into its background.
    image.save(jpeg, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    captions = make_captions(spec, cfg.captions_per_image, np.random.default_rng(text_seq))
    return jpeg.getvalue(), captions


def object_records(spec: world.SceneSpec) -> list[dict]:
    """The json record of each object of a scene."""
    return [
        {
            "shape": o.shape,
            "colour": o.colour,
            "size": o.size,
            "position": o.position,
            "row": o.row,
            "col": o.col,
        }
        for o in spec.objects
    ]


def sample_metadata(
    spec: world.SceneSpec,
    key: str,
    split: str,
    size: int,
    captions_n: int,
    held_out: tuple[tuple[str, str], ...],
) -> dict:
    """The per-sample `.json`; evaluation reads `objects[*].shape|colour|size|position`."""
    objects = object_records(spec)
    return {
        "key": key,
        "width": size,
        "height": size,
        "split": split,
        "background": spec.background.kind,
        "objects": objects,
        "relations": spec.relations(),
        "captions_n": captions_n,
        "held_out": any(o.pair in held_out for o in spec.objects),
    }


def dataset_info(settings: SynthSettings, counts: dict[str, int]) -> dict:
    """Contents of `OUT_DIR/info.json`: everything needed to regenerate or interpret the data."""
    domain = world.DOMAINS[settings.domain]
    # The default world's info.json predates domains and stays byte-identical: no "domain" key.
    named: dict[str, str | bool] = {}
    if settings.domain != "default":
        named["domain"] = settings.domain
    if settings.twins:
        named["twins"] = True
    return {
        "name": "vlpt-synthetic",
        **named,
        "seed": settings.seed,
        "image_size": settings.size,
        "shard_size": settings.shard_size,
        "captions_per_image": settings.captions_per_image,
        "counts": counts,
        "shards": {split: -(-n // settings.shard_size) for split, n in counts.items()},
        "vocab": {
            "shapes": list(domain.shapes),
            "colours": list(world.COLOURS),
            "sizes": list(world.SIZES),
            "positions": list(world.POSITIONS),
            "backgrounds": list(domain.backgrounds),
            "relations": list(world.RELATIONS),
        },
        "held_out_pairs": [{"colour": c, "shape": s} for c, s in settings.held_out],
    }


def _run_jobs(jobs: list[ShardJob], workers: int, progress: bool, unit: str) -> None:
    """Write all shards, in a process pool when more than one worker is useful."""
    total = sum(job.stop - job.start for job in jobs)
    with tqdm(total=total, unit=unit, desc="vlpt data synth", disable=not progress) as bar:
        if min(workers, len(jobs)) <= 1:
            for job in jobs:
                bar.update(write_shard(job))
            return
        # spawn, not fork: the caller may hold threads (torch, tqdm) that fork would copy mid-lock.
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for n in pool.imap_unordered(write_shard, jobs):
                bar.update(n)


def _prepare_split_dir(split_dir: Path, keep: set[str]) -> None:
    """Create `split_dir`; delete leftovers of an interrupted run and shards of an earlier,
    larger run that this one will not overwrite (a loader globbing the folder would read them)."""
    split_dir.mkdir(parents=True, exist_ok=True)
    for path in split_dir.iterdir():
        match = _SHARD_FILE.match(path.name)
        if match and (match["ext"] == ".tar.tmp" or f"{match['shard']}.tar" not in keep):
            path.unlink()


def write_text(path: Path, text: str) -> None:
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")


def _check_args(
    seed: int,
    counts: dict[str, int],
    size: int,
    shard_size: int,
    captions_per_image: int,
    workers: int | None,
) -> None:
    """Reject arguments a user can get wrong with one sentence that names the argument."""
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}.")
    for split, n in counts.items():
        if n < 0:
            raise ValueError(f"the number of {split} images must be >= 0, got {n}.")
    if size < 16:
        raise ValueError(f"image size must be at least 16 pixels, got {size}.")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}.")
    if captions_per_image < 1:
        raise ValueError(f"captions_per_image must be at least 1, got {captions_per_image}.")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1 (or None for all cores), got {workers}.")
