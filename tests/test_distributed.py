"""Two processes (gloo) with DDP train exactly like one process on the concatenated batch.

Each rank gets half of a fixed batch; the contrastive objective gathers features with their
gradient and DDP averages parameter gradients. The loss (averaged over ranks) and every
parameter gradient must equal those of a single process on the whole batch, without DDP.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from vlpt.models import build_model
from vlpt.objectives import ClipLoss, SigLipLoss

pytestmark = pytest.mark.distributed

WORLD, PER_RANK = 2, 4
CASES = {
    "clip": lambda: ClipLoss(local_loss=False),
    "clip-local": lambda: ClipLoss(local_loss=True),
    "siglip": lambda: SigLipLoss(),
}
TINY = {  # a few hundred thousand parameters: the test is about communication, not capacity
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 512, "width": 64, "heads": 2, "layers": 2},
}


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) and 0-padded token ids (N, 16) with different caption lengths."""
    g = torch.Generator().manual_seed(123)
    n = WORLD * PER_RANK
    images = torch.randn(n, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 512, (n, 16), generator=g)
    lengths = torch.randint(4, 17, (n, 1), generator=g)
    return images, tokens * (torch.arange(16) < lengths)


def _model(config_path: str, case: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(config_path)
    # CLIP's softmax ignores the bias; an unused parameter would stall DDP's gradient buckets.
    model.logit_bias.requires_grad_(case == "siglip")
    return model


def _step(model: torch.nn.Module, objective: torch.nn.Module, images, tokens):
    """One forward/backward; returns the loss and the parameter gradients."""
    losses = objective(model(images, tokens))
    loss = sum(v for k, v in losses.items() if k.startswith("loss/"))
    loss.backward()
    module = model.module if isinstance(model, DistributedDataParallel) else model
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _worker(rank: int, port: int, config_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        images, tokens = _global_batch()
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        for case, make_objective in CASES.items():
            model = DistributedDataParallel(_model(config_path, case))
            loss, grads = _step(model, make_objective(), images[rows], tokens[rows])
            torch.save({"loss": loss, "grads": grads}, Path(out_dir) / f"{case}-{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_ranks_equal_one_process_on_global_batch(tmp_path: Path) -> None:
    config_path = tmp_path / "tiny-test.json"
    config_path.write_text(json.dumps(TINY))
    mp.spawn(_worker, args=(_free_port(), str(config_path), str(tmp_path)), nprocs=WORLD)

    torch.set_num_threads(1)
    images, tokens = _global_batch()
    for case, make_objective in CASES.items():
        ref_loss, ref_grads = _step(
            _model(str(config_path), case), make_objective(), images, tokens
        )
        ranks = [torch.load(tmp_path / f"{case}-{r}.pt", weights_only=True) for r in range(WORLD)]
        # Global CLIP: every rank computes the global loss; the others: the rank mean is.
        mean_loss = torch.stack([r["loss"] for r in ranks]).mean()
        torch.testing.assert_close(mean_loss, ref_loss, rtol=1e-5, atol=0, msg=case)
        if case == "clip":
            torch.testing.assert_close(ranks[1]["loss"], ref_loss, rtol=1e-5, atol=0)
        for rank in ranks:
            assert rank["grads"].keys() == ref_grads.keys(), case
            for name, ref in ref_grads.items():
                # Gradients summed in another order differ by fp32 rounding of the largest
                # terms, so the absolute tolerance scales with the tensor's magnitude.
                torch.testing.assert_close(
                    rank["grads"][name],
                    ref,
                    rtol=1e-5,
                    atol=1e-5 * ref.abs().max().item(),
                    msg=lambda m, c=case, n=name: f"{c}: {n}: {m}",
                )
