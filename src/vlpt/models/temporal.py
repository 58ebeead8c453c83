"""The temporal module: per-frame embeddings of a clip -> one clip embedding.

Frames go through the shared image tower one by one; this module is all the model knows about
time. `mean` pools the frames (order-blind: a clip and its time-reversed copy get the same
embedding, the baseline). `transformer` adds a learned temporal position embedding, runs a
small Transformer over the frames and mean-pools its output plus the residual frames (CLIP4Clip's
"seqTransf"), so the embedding can encode what happens first and which way things move.

An image is a one-frame clip: with `transformer` it goes through the same module at time 0, so
images and videos share one embedding space and train together.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
from open_clip.transformer import Transformer
from torch import nn

TemporalKind = Literal["mean", "transformer"]
TEMPORAL_KINDS: tuple[str, ...] = ("mean", "transformer")


@dataclass(frozen=True)
class TemporalConfig:
    kind: TemporalKind = "transformer"
    layers: int = 2
    heads: int = 4
    max_frames: int = 32

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TemporalConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown temporal_cfg keys {unknown}; known: {sorted(known)}")
        cfg = cls(**values)
        if cfg.kind not in TEMPORAL_KINDS:
            raise ValueError(f"temporal_cfg kind must be one of {TEMPORAL_KINDS}, got {cfg.kind!r}")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TemporalModule(nn.Module):
    """(B, T, D) frame embeddings -> (B, D) clip embedding (not normalised)."""

    def __init__(self, dim: int, cfg: TemporalConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.position: nn.Parameter | None = None
        self.transformer: Transformer | None = None
        if cfg.kind == "transformer":
            # Temporal positions as large as the frame embeddings they are added to (per-dim
            # std ~1 for a trained tower), as CLIP4Clip's nn.Embedding. At std 0.01 they were
            # drowned by the content and the module was all but permutation-invariant.
            self.position = nn.Parameter(torch.randn(cfg.max_frames, dim))
            self.transformer = Transformer(dim, cfg.layers, cfg.heads, batch_first=True)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if self.transformer is None or self.position is None:
            return frames.float().mean(dim=1)  # fp32: a clip and its reversal tie to rounding
        n_frames = frames.shape[1]
        if n_frames > self.cfg.max_frames:
            raise ValueError(
                f"a clip of {n_frames} frames is longer than the temporal module's "
                f"max_frames={self.cfg.max_frames}"
            )
        position = self.position[:n_frames].to(frames.dtype)
        # The positions steer attention; taken out again, they add no constant offset.
        x = self.transformer(frames + position) - position
        return (x + frames).mean(dim=1)
