"""`vlpt pretrain CONFIG --dry-run`: what a run would do, checked without training."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from vlpt.config import RunConfig
from vlpt.data import check_source
from vlpt.train.build import model_from_config


def flops_per_sample(model: torch.nn.Module, image_size: int, context_length: int) -> float:
    """Training FLOPs per image-text pair: forward FLOPs counted by torch (in train mode, so
    patch dropout counts), x3 for the backward."""
    model.train()
    images = torch.zeros(2, 3, image_size, image_size)
    tokens = torch.ones(
        2, context_length, dtype=torch.long
    )  # full-length captions: the upper bound
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(images, tokens)
    return 3 * counter.get_total_flops() / 2


def make_plan(cfg: RunConfig, world_size: int = 0) -> dict[str, Any]:
    """Resolve the run: sources opened, model built, sizes and budget computed."""
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    sources = []
    for split in ("train", "val", "test"):
        for source in getattr(cfg.data, split):
            sources.append({"split": split, "weight": source.weight, **check_source(source)})
    model = model_from_config(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    gflops = flops_per_sample(model, model.image_size, model.context_length) / 1e9
    global_batch = cfg.train.batch_size * cfg.train.accum_steps * world_size
    return {
        "model": cfg.model.name,
        "parameters_M": round(n_params / 1e6, 2),
        "gflops_per_sample": round(gflops, 3),
        "image_size": model.image_size,
        "world_size": world_size,
        "global_batch": global_batch,
        "steps": cfg.train.max_steps,
        "samples": cfg.train.max_steps * global_batch,
        "total_pflops": round(cfg.train.max_steps * global_batch * gflops / 1e6, 2),
        "precision": cfg.train.precision,
        "sources": sources,
        "output_dir": cfg.output_dir,
    }


def print_plan(cfg: RunConfig, world_size: int = 0) -> None:
    plan = make_plan(cfg, world_size)
    print(
        f"model      {plan['model']}: {plan['parameters_M']}M parameters, {plan['image_size']} px, "
        f"~{plan['gflops_per_sample']} GFLOP per training sample ({plan['precision']})"
    )
    print(
        f"schedule   {plan['steps']} steps x global batch {plan['global_batch']} "
        f"({plan['world_size']} rank(s)) = {plan['samples']:,} samples, ~{plan['total_pflops']} PFLOP"
    )
    if cfg.train.max_minutes > 0:
        fit = (
            "max_steps lowered to what fits, measured after the first 25 steps and at checkpoints"
            if cfg.train.fit_to_time
            else "stops the run; the schedule stays built for max_steps (fit_to_time=false)"
        )
        print(f"time       {cfg.train.max_minutes:g} minutes of training: {fit}")
    for s in plan["sources"]:
        print(
            f"source     {s['split']:5} weight {s['weight']:<5g} {s['n_shards']} shard(s), first shard "
            f"{s['first_shard_samples']} samples: {s['url']}"
        )
    print(json.dumps(plan))
