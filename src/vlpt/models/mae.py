"""MAE-style masked image (and video) modelling: patch masks, a small pixel decoder, the loss.

    keep, mask = random_patch_mask(batch=B, n_patches=N, ratio=0.75, frames=T)  # tube for T > 1
    visible = model.encode_visible_patches(frames, keep)        # (B*T, 1 + K, W)
    pred = model.mae_decoder(visible, keep)                     # (B*T, N, p*p*3)
    loss = mae_loss(pred, patchify(frames, p), mask)            # masked patches only

As in He et al. 2022: the encoder sees only the visible patches (25%), the decoder fills the
rest with a learned mask token, adds positions, and predicts each patch's pixels normalised by
that patch's own mean and variance (their `norm_pix_loss`, the better target).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from open_clip.transformer import Transformer
from torch import nn


@dataclass(frozen=True)
class MAEConfig:
    """Architecture of an `MAEDecoder`; a registry JSON carries it as `"mae_cfg"`."""

    width: int = 128
    """Decoder width (MAE: narrower than the encoder; the decoder only serves pretraining)."""
    layers: int = 2
    """Transformer blocks of the decoder."""
    heads: int = 4
    """Attention heads."""
    visual_width: int = 192
    """Width of the encoder's tokens (the vision tower's width)."""
    image_size: int = 64
    """Image side in pixels (the vision tower's)."""
    patch_size: int = 8
    """Patch side in pixels (the vision tower's)."""

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> MAEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(
                f"mae_cfg has unknown key(s) {', '.join(unknown)}; "
                f"the known keys are {', '.join(sorted(known))}."
            )
        return cls(**cfg)

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, p*p*3), patches in row-major order, pixels (row, col, channel)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W) for a square grid; the inverse of `patchify`."""
    b, n, _ = patches.shape
    p, g = patch_size, int(round(n**0.5))
    x = patches.reshape(b, g, g, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, g * p, g * p)


def random_patch_mask(
    batch: int,
    n_patches: int,
    ratio: float,
    frames: int = 1,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which patches each image keeps: `keep` (B*T, K) long, sorted, and `mask` (B*T, N) bool
    (True = masked), K = round(N * (1 - ratio)), at least 1.

    With `frames` T > 1 the rows come in groups of T (one clip's frames, as `flatten(0, 1)`
    orders them) and every frame of a clip masks the same patches: tube masking (VideoMAE), so
    a masked patch cannot be copied from the frame next to it."""
    n_keep = max(1, round(n_patches * (1 - ratio)))
    noise = torch.rand(batch, n_patches, generator=generator).to(device)
    keep = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values  # (B, K)
    mask = torch.ones(batch, n_patches, dtype=torch.bool, device=device)
    mask.scatter_(1, keep, False)
    if frames > 1:
        keep, mask = keep.repeat_interleave(frames, 0), mask.repeat_interleave(frames, 0)
    return keep, mask


def normalised_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch (.., p*p*3) minus its mean, over its standard deviation (MAE's target)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps).sqrt()


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked patches only: pred, target (B, N, P), mask (B, N)."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # (B, N)
    weight = mask.float()
    return (per_patch * weight).sum() / weight.sum().clamp(min=1.0)


class MAEDecoder(nn.Module):
    """Visible tokens (B, 1 + K, visual_width), CLS first -> pixels of every patch (B, N, p*p*3)."""

    def __init__(self, cfg: MAEConfig | Mapping[str, Any]) -> None:
        super().__init__()
        cfg = cfg if isinstance(cfg, MAEConfig) else MAEConfig.from_dict(cfg)
        self.cfg = cfg
        self.embed = nn.Linear(cfg.visual_width, cfg.width)
        self.mask_token = nn.Parameter(torch.zeros(cfg.width))
        self.positional_embedding = nn.Parameter(torch.randn(1 + cfg.n_patches, cfg.width) * 0.02)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads)
        self.ln = nn.LayerNorm(cfg.width)
        self.pred = nn.Linear(cfg.width, cfg.patch_size**2 * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, visible: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.embed(visible)  # (B, 1 + K, Wd)
        b, _, width = x.shape
        # Every patch starts as the mask token; the visible ones are written back in place.
        full = self.mask_token.to(x.dtype).expand(b, self.cfg.n_patches, width).clone()
        full.scatter_(1, keep[..., None].expand(-1, -1, width), x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln(self.transformer(x))
        return self.pred(x[:, 1:])  # (B, N, p*p*3), CLS dropped
