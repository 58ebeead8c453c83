"""Evaluation of a run's model on its val / test sources (retrieval + zero-shot)."""

from __future__ import annotations

from typing import Any

import torch

from vlpt.config import RunConfig
from vlpt.eval import evaluate_retrieval, evaluate_zeroshot


def evaluate_run(model, tokenizer, cfg: RunConfig, device: torch.device, splits: tuple[str, ...] = ("val",)) -> dict[str, Any]:
    """Flat dict `{split}/{metric}` for every configured split that has sources."""
    results: dict[str, Any] = {}
    for split in splits:
        sources = getattr(cfg.data, split)
        if not sources:
            continue
        common = dict(batch_size=cfg.eval.batch_size, max_items=cfg.eval.max_items, device=device, precision=cfg.train.precision)
        metrics = evaluate_retrieval(model, tokenizer, sources, **common)
        for task in cfg.eval.zeroshot:
            metrics.update(evaluate_zeroshot(model, tokenizer, sources, task=task, **common))
        results.update({f"{split}/{k}": v for k, v in metrics.items()})
    return results
