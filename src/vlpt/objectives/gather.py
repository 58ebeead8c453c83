"""Cross-rank all-gather that keeps the gradient, for losses whose negatives span all ranks.

Contrastive losses compare each local sample with the samples of every rank, so the features of
the other ranks must be gathered *with* their autograd history: rank r's loss depends on rank
s's features, and that gradient has to travel back to rank s. The backward of an all-gather is
therefore a sum over ranks of the incoming gradients, sliced to the local rows.

Written by hand (about 20 lines) because torch's public `torch.distributed.nn.functional.all_gather`
is deprecated in favour of `torch.distributed._functional_collectives`, a private module whose
function names change between releases; this version uses only the stable collectives
(`all_gather`, `all_reduce`) that every backend (gloo, nccl) supports.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """(B, ...) on each rank -> (world * B, ...) on every rank, rank-major, differentiable."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Every rank's loss may depend on our rows: sum the gradients of all ranks, keep our slice.
        grad = grad.contiguous().clone()  # the incoming gradient may be shared; reduce a copy
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        rank, world = dist.get_rank(), dist.get_world_size()
        return grad.chunk(world, dim=0)[rank]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (B, ...) from all ranks along dim 0 -> (world * B, ...).

    Rows of rank r sit at `[r * B, (r + 1) * B)`. Every rank must pass the same shape. Without an
    initialised process group (one process) the tensor is returned unchanged.
    """
    _, world = rank_and_world_size()
    if world == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)
