"""Distribution and compilation applied to a model from outside (the model code knows neither)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlpt.config import RunConfig
from vlpt.train.distributed import DistInfo


def wrap_model(model: nn.Module, cfg: RunConfig, dist_info: DistInfo) -> nn.Module:
    """torch.compile (optional), then DDP when there are several ranks.

    The unwrapped `model` stays the one that is checkpointed and evaluated.
    """
    wrapped: nn.Module = model
    if cfg.train.compile:
        wrapped = torch.compile(wrapped)  # type: ignore[assignment]
    if dist_info.distributed:
        device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
        wrapped = DistributedDataParallel(wrapped, device_ids=device_ids)
    return wrapped
