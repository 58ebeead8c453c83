"""Reading open_clip weight files safely (safetensors, or torch.load with weights_only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed
from safetensors.torch import load_file
from torch import nn


class WeightsError(ValueError):
    """A weights file that is missing, unreadable or does not fit the model."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch checkpoint; never unpickles arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file '{path}' does not exist.")
    sd: Any
    try:
        if path.suffix == ".safetensors":
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or hostile file: one sentence, not a stack trace
        raise WeightsError(
            f"weights file '{path}' could not be read ({type(e).__name__}: {e})."
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise WeightsError(f"weights file '{path}' holds no state dict.")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_open_clip_weights(model: nn.Module, path: str | Path) -> None:
    """Load an open_clip CLIP / CustomTextCLIP checkpoint into a VisionLanguageModel."""
    sd = convert_to_custom_text_state_dict(read_state_dict(path))
    resize_pos_embed(sd, model)  # lets a checkpoint trained at another resolution load
    if "logit_bias" not in sd:
        sd["logit_bias"] = model.state_dict()["logit_bias"]
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatch
        missing, unexpected = [str(e).splitlines()[-1].strip()], []
    if missing or unexpected:
        raise WeightsError(
            f"weights file '{path}' does not fit this model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); "
            "check that model.name matches the checkpoint's architecture."
        )
