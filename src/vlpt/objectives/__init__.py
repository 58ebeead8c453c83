"""Training objectives: each an `nn.Module` mapping the model's outputs to named losses/metrics.

`forward(outputs) -> dict`: keys starting with `loss/` are weighted losses the loop sums; all
other keys are detached metrics for logging. Cross-rank communication lives inside each
objective, so the loop knows no objective by name.
"""

from __future__ import annotations

from torch import nn

from vlpt.config import RunConfig
from vlpt.objectives.contrastive import ClipLoss, SigLipLoss
from vlpt.objectives.gather import all_gather_with_grad, rank_and_world_size


def build_objectives(cfg: RunConfig) -> nn.ModuleList:
    """The objectives a run trains with, from `cfg.loss` (name clip|siglip, weight, local_loss)."""
    loss = cfg.loss
    if loss.name == "clip":
        contrastive: nn.Module = ClipLoss(weight=loss.weight, local_loss=loss.local_loss)
    elif loss.name == "siglip":
        contrastive = SigLipLoss(weight=loss.weight)
    else:  # unreachable through RunConfig validation; kept for configs built by hand
        raise ValueError(f"loss.name '{loss.name}' is unknown; use 'clip' or 'siglip'.")
    return nn.ModuleList([contrastive])


__all__ = [
    "ClipLoss",
    "SigLipLoss",
    "all_gather_with_grad",
    "build_objectives",
    "rank_and_world_size",
]
