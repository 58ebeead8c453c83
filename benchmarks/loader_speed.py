"""Training-loader throughput: vlpt's `build_train_loader` vs open_clip_train's `get_wds_dataset`.

Both read the same shards of 64 px JPEGs (the synthetic world, ~4000 images) with the same number
of dataloader workers, batch size, crop scale and tokenizer (open_clip's BPE, context 77), and
are timed over the same number of batches after a warm-up (worker start, shuffle-buffer fill).

    .venv/bin/python benchmarks/loader_speed.py [--images 4000] [--batches 40] [--no-caption-cache]

Prints one JSON line: {"bench": "loader", "vlpt_samples_per_s", "open_clip_samples_per_s",
"ratio", "workers", "batch_size", "image_size"}. `--no-caption-cache` turns off vlpt's cache of
token rows, for data whose captions never repeat (the synthetic captions do).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from argparse import Namespace
from collections.abc import Iterable
from pathlib import Path

import open_clip
import open_clip_train.data as open_clip_data
import torch
from webdataset.tariterators import tar_file_expander, url_opener

import vlpt.data.loader
from vlpt.config import DataConfig
from vlpt.data import build_train_loader
from vlpt.data.synthetic import write_dataset

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def samples_per_second(batches: Iterable, n_batches: int, warmup: int) -> float:
    """Throughput over `n_batches` batches, timed after `warmup` batches."""
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    start, n_samples = time.perf_counter(), 0
    for _ in range(n_batches):
        batch = next(iterator)
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        n_samples += len(images)
    return n_samples / (time.perf_counter() - start)


def vlpt_batches(pattern: str, args: argparse.Namespace, tokenizer) -> Iterable:
    cfg = DataConfig(train=[pattern], workers=args.workers, crop_scale=(0.9, 1.0), resampled=True)
    return build_train_loader(
        cfg,
        image_size=args.image_size,
        mean=MEAN,
        std=STD,
        tokenizer=tokenizer,
        batch_size=args.batch_size,
    )


def open_clip_batches(pattern: str, args: argparse.Namespace, tokenizer) -> Iterable:
    _patch_open_clip_for_webdataset_1()
    options = Namespace(
        train_data=pattern,
        val_data=None,
        dataset_resampled=True,
        train_num_samples=10**7,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=args.batch_size,
        workers=args.workers,
        world_size=1,
    )
    preprocess = open_clip.image_transform(
        args.image_size, is_train=True, mean=MEAN, std=STD, aug_cfg={"scale": (0.9, 1.0)}
    )
    return open_clip_data.get_wds_dataset(
        options, preprocess, is_train=True, tokenizer=tokenizer
    ).dataloader


def _patch_open_clip_for_webdataset_1() -> None:
    """open_clip_train's `tarfile_to_samples_nothrow` predates webdataset 1.0, whose tar expander
    yields an empty end-of-shard marker that open_clip's grouper cannot read (KeyError 'fname').
    Turn the marker off; samples are grouped exactly as before."""

    def tarfile_to_samples_nothrow(src, handler=open_clip_data.log_and_continue):
        streams = url_opener(src, handler=handler)
        files = tar_file_expander(streams, handler=handler, eof_value=None)
        return open_clip_data.group_by_keys_nothrow(files, handler=handler)

    open_clip_data.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--batches", type=int, default=40, help="timed batches per loader")
    parser.add_argument("--warmup", type=int, default=4, help="untimed batches first")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--no-caption-cache", action="store_true")
    args = parser.parse_args()
    if args.no_caption_cache:
        vlpt.data.loader.CAPTION_CACHE_SIZE = 0
    torch.set_num_threads(1)  # the main process only receives batches
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # BPE, context 77, offline
    with tempfile.TemporaryDirectory() as tmp:
        write_dataset(
            tmp,
            n_train=args.images,
            n_val=0,
            n_test=0,
            size=args.image_size,
            shard_size=500,
            workers=2,
            progress=False,
        )
        pattern = str(Path(tmp) / "train")
        oc_pattern = str(Path(tmp) / "train" / f"{{00000..{(args.images - 1) // 500:05d}}}.tar")
        ours = samples_per_second(vlpt_batches(pattern, args, tokenizer), args.batches, args.warmup)
        theirs = samples_per_second(
            open_clip_batches(oc_pattern, args, tokenizer), args.batches, args.warmup
        )
    print(
        json.dumps(
            {
                "bench": "loader",
                "vlpt_samples_per_s": round(ours),
                "open_clip_samples_per_s": round(theirs),
                "ratio": round(ours / theirs, 2),
                "workers": args.workers,
                "batch_size": args.batch_size,
                "image_size": args.image_size,
            }
        )
    )


if __name__ == "__main__":
    main()
