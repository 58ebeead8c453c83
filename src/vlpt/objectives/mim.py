"""Masked image modelling (MAE, He et al. 2022; VideoMAE's tube masking for clips).

75% of the patches of every frame are hidden, the vision tower encodes the visible quarter
(4x cheaper than a full pass), and the model's MAE decoder predicts the pixels of every patch,
each normalised by its own mean and variance. The loss counts the masked patches only.
"""

from __future__ import annotations

import torch
from torch import nn

from vlpt.models.mae import mae_loss, normalised_patches, patchify, random_patch_mask


def masked_reconstruction(
    model, images: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """Mask, encode, decode: images (B, 3, H, W) or clips (B, T, 3, H, W) -> a dict of `frames`
    (B*T, 3, H, W), `pred` (B*T, N, p*p*3), `mask` (B*T, N) bool, `target` (B*T, N, p*p*3)
    normalised pixels. Every frame of a clip hides the same patches."""
    n_frames = images.shape[1] if images.ndim == 5 else 1
    frames = images.flatten(0, 1) if images.ndim == 5 else images
    decoder = model.mae_decoder
    keep, mask = random_patch_mask(
        len(images), decoder.cfg.n_patches, ratio, n_frames, generator, images.device
    )
    pred = decoder(model.encode_visible_patches(frames, keep), keep)
    target = normalised_patches(patchify(frames.float(), decoder.cfg.patch_size))
    return {"frames": frames, "pred": pred, "mask": mask, "target": target}


class MaskedImageModeling(nn.Module):
    """`loss/mim`: mean squared error of the normalised pixels of the masked patches."""

    needs: frozenset[str] = frozenset()
    heads = ("mae_decoder",)

    def __init__(self, weight: float = 1.0, mask_ratio: float = 0.75) -> None:
        super().__init__()
        self.weight, self.mask_ratio = weight, mask_ratio

    def forward(self, outputs: dict, model=None, batch: dict | None = None) -> dict:
        assert model is not None and batch is not None
        out = masked_reconstruction(model, batch["image"], self.mask_ratio)
        loss = mae_loss(out["pred"], out["target"], out["mask"])
        return {"loss/mim": self.weight * loss, "mim/loss": loss.detach()}
