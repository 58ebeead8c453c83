"""Evaluation of a run's model on its val / test sources (retrieval + zero-shot, one embedding pass)."""

from __future__ import annotations

from typing import Any

import torch

from vlpt.config import RunConfig
from vlpt.eval import embed_eval_set, evaluate_zeroshot, retrieval_metrics


def evaluate_run(
    model, tokenizer, cfg: RunConfig, device: torch.device, splits: tuple[str, ...] = ("val",)
) -> dict[str, Any]:
    """Flat dict `{split}/{metric}` for every configured split that has sources."""
    results: dict[str, Any] = {}
    for split in splits:
        sources = getattr(cfg.data, split)
        if not sources:
            continue
        emb = embed_eval_set(
            model,
            tokenizer,
            sources,
            batch_size=cfg.eval.batch_size,
            max_items=cfg.eval.max_items,
            device=device,
            precision=cfg.train.precision,
        )
        metrics = retrieval_metrics(emb.image, emb.text, emb.text_to_image)
        if cfg.eval.zeroshot:
            metrics.update(
                evaluate_zeroshot(
                    model, tokenizer, sources, task=tuple(cfg.eval.zeroshot), embeddings=emb
                )
            )
        results.update({f"{split}/{k}": v for k, v in metrics.items()})
    return results
