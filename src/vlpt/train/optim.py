"""AdamW with open_clip's weight-decay rule, and the learning-rate schedule as a precomputed array."""

from __future__ import annotations

import math

import torch
from torch import nn

from vlpt.config import ConfigError, TrainConfig


def _no_decay(name: str, p: nn.Parameter) -> bool:
    # open_clip's rule: no decay on gains, biases, norms and the temperature / bias scalars.
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device, layer_decay: float = 1.0
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; fused kernels where the device supports them.

    One pair of groups (weight decay, none) per learning-rate scale; each group's `lr_scale`
    multiplies the scheduled rate (`set_lr`). A parameter's scale is its layer-decay scale times
    its `cfg.lr_scale` multiplier; with neither that is one pair, as in pretraining."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    depths = tower_depths(model)
    prefixed = prefix_lr_scales([n for n, _ in named], cfg.lr_scale)
    scales = {n: layer_lr_scale(n, depths, layer_decay) * prefixed[n] for n, _ in named}
    groups = []
    for scale in sorted(set(scales.values()), reverse=True):
        at_scale = [(n, p) for n, p in named if scales[n] == scale]
        decayed = [p for n, p in at_scale if not _no_decay(n, p)]
        groups.append({"params": decayed, "weight_decay": cfg.weight_decay, "lr_scale": scale})
        plain = [p for n, p in at_scale if _no_decay(n, p)]
        groups.append({"params": plain, "weight_decay": 0.0, "lr_scale": scale})
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def prefix_lr_scales(names: list[str], scales: dict[str, float]) -> dict[str, float]:
    """Each parameter name's multiplier from `scales` (`train.lr_scale`): the value of the
    longest prefix that is whole dotted components of the name, 1.0 if none is. A prefix that
    matches no name is a ConfigError (a typo would otherwise train at the base rate silently)."""
    found = dict.fromkeys(names, 1.0)
    for prefix in sorted(scales, key=len):  # longer prefixes overwrite shorter ones
        matched = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not matched:
            tops = sorted({n.split(".")[0] for n in names})
            raise ConfigError(
                f"train.lr_scale: {prefix!r} names no trainable parameter (top-level: {tops})"
            )
        for n in matched:
            found[n] = scales[prefix]
    return found


# Parameters of a tower that sit below its first residual block (BEiT's layer 0).
_EMBEDDINGS = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "token_embedding")


def tower_depths(model: nn.Module) -> dict[str, int]:
    """Residual blocks per tower: `{"visual": n, "text": m}` for the towers `model` has."""
    depths: dict[str, int] = {}
    for name, _ in model.named_parameters():
        tower, _, rest = name.partition(".")
        if tower in ("visual", "text") and rest.startswith("transformer.resblocks."):
            depths[tower] = max(depths.get(tower, 0), int(rest.split(".")[2]) + 1)
    return depths


def layer_lr_scale(name: str, depths: dict[str, int], decay: float) -> float:
    """Layer-wise LR decay (BEiT): a tower of L blocks has layer ids 0 (embeddings), 1..L (the
    blocks) and L + 1 (final norm, projection); id i trains at `decay ** (L + 1 - i)`. Every
    parameter outside the towers (heads, temperature, temporal module) trains at scale 1."""
    tower, _, rest = name.partition(".")
    if decay == 1.0 or tower not in depths:
        return 1.0
    layers = depths[tower]
    if rest.startswith("transformer.resblocks."):
        layer_id = int(rest.split(".")[2]) + 1
    elif rest.split(".")[0] in _EMBEDDINGS:
        layer_id = 0
    else:
        layer_id = layers + 1
    return decay ** (layers + 1 - layer_id)


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
    """The scheduled rate, times each group's `lr_scale` (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
