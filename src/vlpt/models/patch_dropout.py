"""FLIP's patch dropout (Li et al. 2023): the image tower sees a subset of each image's patches.

`random` is FLIP's (and open_clip's) rule: a uniformly random subset per image. `grid` keeps a
regular pattern at a random phase per image: a checkerboard at ratio 0.5, one patch in every
k x k block at 1 - 1/k^2 (0.75, 0.889, ...). No block (2 x 2 for the checkerboard, k x k) loses
all its patches, so an object that spans one always keeps part of itself (random dropout takes
all of a 2 x 2 block at 50% one time in 16); with a convolutional stem, whose tokens see past
their own patch, the kept tokens also cover some of the dropped ones' pixels.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import nn

from vlpt.config.fields import grid_block

Pattern = Literal["random", "grid"]
PATTERNS: tuple[str, ...] = get_args(Pattern)


class GridError(ValueError):
    """A grid pattern that this patch grid cannot hold (the config's ratio is one a grid keeps)."""


class PatchDropout(nn.Module):
    """Drops `ratio` of the patch tokens of (B, 1 + N, D) token sequences in training, the first
    (CLS) token always kept; `grid` = (rows, cols) of the N patches, which `pattern="grid"` needs
    to divide into its blocks. The identity in eval mode. Drop-in for open_clip's PatchDropout
    (the `patch_dropout` module of its VisionTransformer), with the indices made on the tokens'
    device."""

    def __init__(
        self,
        ratio: float,
        pattern: Pattern = "random",
        grid: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not 0 < ratio < 1:
            raise ValueError(f"patch dropout ratio must be in (0, 1), got {ratio}")
        if pattern not in PATTERNS:
            raise ValueError(f"patch dropout pattern must be one of {PATTERNS}, got {pattern!r}")
        self.ratio, self.pattern = ratio, pattern
        # A plain tensor, not a buffer: the loop swaps this module in and out under DDP, whose
        # buffer list is fixed when it wraps the model.
        self._phases = torch.empty(0, 0, dtype=torch.long)
        if pattern == "grid":
            if grid is None:
                raise ValueError("the grid pattern needs the patch grid's (rows, cols)")
            self._phases = grid_phases(grid, grid_block(ratio)).to(device)
        self.n_patches = grid[0] * grid[1] if grid else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        cls, patches = x[:, :1], x[:, 1:]
        batch, n = patches.shape[:2]
        if self.pattern == "grid":
            if n != self.n_patches:
                raise ValueError(
                    f"grid patch dropout built for {self.n_patches} patches, got {n} tokens"
                )
            choice = torch.randint(len(self._phases), (batch,), device=x.device)
            if self._phases.device != x.device:  # built before the model moved
                self._phases = self._phases.to(x.device)
            keep = self._phases[choice]  # (B, K)
        else:
            n_keep = max(1, int(n * (1 - self.ratio)))
            keep = torch.rand(batch, n, device=x.device).topk(n_keep, dim=-1).indices
        kept = patches.gather(1, keep[..., None].expand(-1, -1, patches.shape[-1]))
        return torch.cat((cls, kept), dim=1)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, pattern={self.pattern}"


def grid_phases(grid: tuple[int, int], block: int) -> torch.Tensor:
    """Every phase of a grid pattern as rows of kept patch indices (row-major over `grid`):
    (2, N/2) for the checkerboard (`block` 0), (k^2, N/k^2) for one patch per k x k block."""
    rows, cols = grid
    r = torch.arange(rows)[:, None].expand(rows, cols).reshape(-1)
    c = torch.arange(cols)[None, :].expand(rows, cols).reshape(-1)
    index = torch.arange(rows * cols)
    if block == 0:
        if (rows * cols) % 2:
            raise GridError(f"a checkerboard needs an even number of patches, got {rows}x{cols}")
        phases = [index[(r + c) % 2 == p] for p in (0, 1)]  # equal halves: rows*cols is even
    else:
        if rows % block or cols % block:
            raise GridError(
                f"one patch per {block}x{block} block needs a patch grid divisible by {block}, "
                f"got {rows}x{cols}"
            )
        phases = [
            index[(r % block == a) & (c % block == b)] for a in range(block) for b in range(block)
        ]
    return torch.stack(phases)
