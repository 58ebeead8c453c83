"""Two processes (gloo): ITM's hard negatives come from the global batch, and DDP over
`ModelWithObjectives` trains exactly like one process on the concatenated batch.

Negatives are drawn at random in training; here both sides take the hardest one (argmax), so
the two runs must agree: same negatives (picked across ranks), same loss, same gradients.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT
from torch.nn.parallel import DistributedDataParallel

import vlpt.objectives.itm as itm
from vlpt.models import build_model
from vlpt.objectives import ClipLoss, ImageTextMatching, ModelWithObjectives

pytestmark = pytest.mark.distributed

WORLD, PER_RANK = 2, 3
MICRO_MASKED = str(ROOT / "tests/fixtures/micro-masked.json")


def _hardest(similarity, positive, exclude=None, generator=None):
    banned = torch.zeros_like(similarity, dtype=torch.bool)
    banned[torch.arange(len(positive)), positive] = True
    return similarity.masked_fill(banned, float("-inf")).argmax(dim=1)


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    n = WORLD * PER_RANK
    images = torch.randn(n, 3, 32, 32, generator=g)
    lengths = torch.tensor([5, 9, 6, 12, 4, 7])  # rank 1's captions are longer than rank 0's
    tokens = torch.zeros(n, 14, dtype=torch.long)
    for i, length in enumerate(lengths):
        tokens[i, 0], tokens[i, length - 1] = 49406, 49407
        tokens[i, 1 : length - 1] = torch.randint(1, 49406, (int(length) - 2,), generator=g)
    return images, tokens


def _trainer() -> ModelWithObjectives:
    torch.manual_seed(0)
    model = build_model(MICRO_MASKED)
    model.logit_bias.requires_grad_(False)
    return ModelWithObjectives(model, torch.nn.ModuleList([ClipLoss(), ImageTextMatching()]))


def _step(trainer: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor):
    # Each rank cuts its captions to its own longest, as the tokenizer does.
    tokens = tokens[:, : int((tokens > 0).sum(1).max())]
    terms = trainer({"image": images, "text": tokens})
    loss = sum(v for k, v in terms.items() if k.startswith("loss/"))
    loss.backward()
    module = trainer.module if isinstance(trainer, DistributedDataParallel) else trainer
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return terms["loss/itm"].detach(), grads


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    itm.sample_hard_negatives = _hardest  # type: ignore[assignment]
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        images, tokens = _global_batch()
        rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        trainer = DistributedDataParallel(_trainer())
        loss, grads = _step(trainer, images[rows], tokens[rows])
        torch.save({"loss": loss, "grads": grads}, Path(out_dir) / f"itm-{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_itm_under_ddp_equals_one_process_on_the_global_batch(tmp_path, monkeypatch):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    torch.set_num_threads(1)
    monkeypatch.setattr(itm, "sample_hard_negatives", _hardest)
    ref_loss, ref_grads = _step(_trainer(), *_global_batch())
    ranks = [torch.load(tmp_path / f"itm-{r}.pt", weights_only=True) for r in range(WORLD)]
    mean_loss = torch.stack([r["loss"] for r in ranks]).mean()
    torch.testing.assert_close(mean_loss, ref_loss, rtol=1e-4, atol=1e-6)
    for rank in ranks:
        assert rank["grads"].keys() == ref_grads.keys()
        for name, ref in ref_grads.items():
            torch.testing.assert_close(
                rank["grads"][name], ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), msg=name
            )
