"""The model a run config describes (one place for training, planning and checkpoint loading)."""

from __future__ import annotations

from vlpt.config import ModelConfig
from vlpt.models import VisionLanguageModel, build_model


def model_from_config(cfg: ModelConfig, *, pretrained: bool = True) -> VisionLanguageModel:
    """Build `cfg`'s architecture; `pretrained=False` skips the initial weights (a checkpoint
    will overwrite them anyway)."""
    return build_model(
        cfg.name,
        patch_dropout=cfg.patch_dropout,
        pretrained=cfg.pretrained if pretrained else "",
        temporal=cfg.temporal,
        temporal_shift=cfg.temporal_shift,
    )
