"""Seconds per training step of a config, for several override variants, on the same batches.

    .venv/bin/python benchmarks/step_cost.py configs/pretrain/synthetic-tiny-masked.yaml \
        --variant "model.length_groups=1" --variant "" [--steps 8]

Every variant builds the config's model and objectives (random init: the cost does not depend
on the weights), then all variants take the same real batches from `data.train` (read once,
before timing: the loader is not measured) through `train_step` (bf16 autocast, backward,
AdamW) in turns, A B A B ..., so a machine that slows down mid-run slows every variant alike.
Prints one JSON line: per variant the median seconds a step and samples/s, and each variant's
speed relative to the first (`speedup`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import statistics
import sys
import time

import torch

from vlpt.config import load_config
from vlpt.data import build_train_loader
from vlpt.models import get_tokenizer
from vlpt.objectives import ModelWithObjectives, build_objectives
from vlpt.train.build import model_from_config, set_output_vocabularies
from vlpt.train.loop import train_step
from vlpt.train.optim import build_optimizer


def build_variant(config: str, overrides: list[str]) -> tuple:
    cfg = load_config(config, [*overrides, "data.workers=0", "init="])
    torch.manual_seed(cfg.train.seed)
    model = model_from_config(cfg.model)
    tokenizer = get_tokenizer(cfg.model.name)
    objectives = build_objectives(cfg, model)
    set_output_vocabularies(model, cfg, tokenizer)
    trainer = ModelWithObjectives(model, objectives)
    optimizer = build_optimizer(model, cfg.train, torch.device("cpu"))
    return cfg, model, tokenizer, trainer, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument(
        "--variant", action="append", required=True, help="overrides, shell-quoted ('' = none)"
    )
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = [build_variant(args.config, shlex.split(v)) for v in args.variant]
    cfg, model, tokenizer = variants[0][:3]
    loader = build_train_loader(
        cfg.data,
        image_size=model.image_size,
        mean=model.image_mean,
        std=model.image_std,
        tokenizer=tokenizer,
        batch_size=cfg.train.batch_size,
    )
    batches = list(itertools.islice(iter(loader), args.steps + 1))
    times: list[list[float]] = [[] for _ in variants]
    for i, batch in enumerate(batches):
        for k, (vcfg, _, _, trainer, optimizer) in enumerate(variants):
            start = time.perf_counter()
            train_step(trainer, optimizer, [batch], vcfg, torch.device("cpu"))
            if i:  # the first step of each variant warms up
                times[k].append(time.perf_counter() - start)
        print(f"[step_cost] step {i}: {[round(t[-1], 3) for t in times if t]}", file=sys.stderr)
    medians = [statistics.median(t) for t in times]
    batch_size = cfg.train.batch_size
    result = {
        "benchmark": "step_cost",
        "config": args.config,
        "batch_size": batch_size,
        "text_length": [int(b["text"].shape[1]) for b in batches],
        "variants": [
            {
                "overrides": v,
                "step_s": round(m, 4),
                "samples_per_s": round(batch_size / m, 2),
                "speedup": round(medians[0] / m, 3),
            }
            for v, m in zip(args.variant, medians, strict=True)
        ],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
