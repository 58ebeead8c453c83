"""AdamW with open_clip's weight-decay rule, and the learning-rate schedule as a precomputed array."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlpt.config import TrainConfig


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # open_clip's rule: no decay on gains, biases, norms and the temperature / bias scalars.
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; fused kernels where the device supports them."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def lr_schedule(cfg: TrainConfig) -> list[float]:
    """Learning rate for every step: linear warmup, then cosine down to min_lr_ratio * lr."""
    lrs = []
    floor = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(cfg.max_steps - cfg.warmup_steps, 1)
    for step in range(cfg.max_steps):
        if step < cfg.warmup_steps:
            lrs.append(cfg.lr * (step + 1) / cfg.warmup_steps)
        else:
            progress = (step - cfg.warmup_steps) / decay_steps
            lrs.append(floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress)))
    return lrs


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
