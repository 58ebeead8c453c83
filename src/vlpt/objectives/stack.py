"""The model and its objectives as one module, so one `forward` runs everything.

DDP (and `torch.compile`) wrap this module: every head an objective runs (fusion encoder, MAE
decoder) is then part of the forward that DDP sees, and its gradients are reduced with the
towers'. The loop calls it with a batch and sums the `loss/*` terms it returns; it never learns
which objectives there are.
"""

from __future__ import annotations

import torch
from torch import nn

from vlpt.models import VisionLanguageModel


class ModelWithObjectives(nn.Module):
    """`forward(batch) -> {"loss/...": weighted loss, "<objective>/<metric>": value, ...}`.

    The model computes what the objectives declare in `needs` (e.g. `visual_tokens`) and
    nothing more, so a contrastive-only run costs what it did before the masked heads existed.
    Heads that no objective declares in `heads` are frozen: they get no gradient, and DDP would
    otherwise wait for one forever. Likewise, when no objective reads the contrastive
    `features` (caption-only fine-tuning), the text tower is skipped and the parameters only
    those features depend on are frozen.
    """

    def __init__(self, model: VisionLanguageModel, objectives: nn.ModuleList) -> None:
        super().__init__()
        self.model, self.objectives = model, objectives
        self.needs: frozenset[str] = frozenset().union(
            *(getattr(o, "needs", frozenset()) for o in objectives)
        )
        trained = {h for o in objectives for h in getattr(o, "heads", ())}
        for name, head in model.heads().items():
            if name not in trained:
                head.requires_grad_(False)
        if "features" not in self.needs:
            for param in model.contrastive_parameters():
                param.requires_grad_(False)
            if "fusion" in trained:  # it reads the token table (and with text states the tower)
                for param in model.fusion_text_parameters():
                    param.requires_grad_(True)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens = batch["text"] if "features" in self.needs else None
        outputs = self.model(batch["image"], tokens, needs=self.needs)
        terms: dict[str, torch.Tensor] = {}
        for objective in self.objectives:
            terms.update(objective(outputs, model=self.model, batch=batch))
        return terms
