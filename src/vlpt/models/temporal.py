"""The temporal module: per-frame embeddings of a clip -> one clip embedding.

Frames go through the shared image tower one by one; this module is all the model knows about
time. `mean` pools the frames (order-blind: a clip and its time-reversed copy get the same
embedding, the baseline). `transformer` adds a learned temporal position embedding, runs a
small Transformer over the frames and mean-pools its output plus the residual frames (CLIP4Clip's
"seqTransf"), so the embedding can encode what happens first and which way things move.

An image is a one-frame clip: with `transformer` it goes through the same module at time 0, so
images and videos share one embedding space and train together.

`shift` (a fraction of the channels, `transformer` only) adds the temporal shift of TSM (Lin et
al. 2019) inside the image tower: in every block the attention branch reads `shift / 2` of the
channels from the previous frame and as many from the next, at the same token (a "residual
shift": the block's identity path is untouched). A patch then sees what was at its place a
frame earlier and later, so motion and its direction are local patterns the tower can learn
from the first step, where a Transformer over per-frame embeddings must find them in the small
differences between whole-frame summaries. The shift adds no parameters; at the first and last
frame the missing neighbour is the frame itself, so a still clip (and an image, a one-frame
clip) gives exactly the features of the image tower without it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
    shift: float = 0.0
    """Fraction of channels shifted between neighbouring frames in the image tower (TSM);
    0 = none. `transformer` only: the mean-pooling baseline stays order-blind."""

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TemporalConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown temporal_cfg keys {unknown}; known: {sorted(known)}")
        cfg = cls(**values)
        if cfg.kind not in TEMPORAL_KINDS:
            raise ValueError(f"temporal_cfg kind must be one of {TEMPORAL_KINDS}, got {cfg.kind!r}")
        if not 0.0 <= cfg.shift < 1.0:
            raise ValueError(f"temporal_cfg shift must be in [0, 1), got {cfg.shift}")
        if cfg.shift and cfg.kind != "transformer":
            raise ValueError(
                "temporal_cfg shift needs kind 'transformer': mean pooling is the order-blind "
                "baseline, and a shifted tower would see the order of frames"
            )
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


def shift_frames(x: torch.Tensor, frames: int, fold: int) -> torch.Tensor:
    """(B * T, N, W) tokens of T-frame clips -> the same with channels [0, fold) taken from the
    previous frame and [fold, 2 * fold) from the next (the frame itself at either end)."""
    x = x.unflatten(0, (-1, frames))  # (B, T, N, W)
    past = torch.cat([x[:, :1, :, :fold], x[:, :-1, :, :fold]], dim=1)
    future = torch.cat([x[:, 1:, :, fold : 2 * fold], x[:, -1:, :, fold : 2 * fold]], dim=1)
    return torch.cat([past, future, x[..., 2 * fold :]], dim=-1).flatten(0, 1)


class TemporalShift:
    """TSM's residual shift in an open_clip tower, as forward hooks on each block's `ln_1` (the
    attention branch's input), so the tower's parameters and state-dict names are unchanged.

    The tower sees frames as a batch of images; `frames(T)` tells the hooks how that batch
    groups into clips for the duration of one pass (outside it, and for T = 1, they do nothing).
    """

    def __init__(self, blocks: Sequence[nn.Module], fraction: float, width: int) -> None:
        self.fold = max(1, int(width * fraction) // 2)
        self._frames = 1
        norms = [block.get_submodule("ln_1") for block in blocks]  # each block's attention input
        self._handles = [norm.register_forward_hook(self._hook) for norm in norms]

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if self._frames == 1:
            return output
        return shift_frames(output, self._frames, self.fold)

    @contextmanager
    def frames(self, n_frames: int) -> Iterator[None]:
        previous, self._frames = self._frames, n_frames
        try:
            yield
        finally:
            self._frames = previous
