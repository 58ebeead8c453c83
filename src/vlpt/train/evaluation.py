"""Evaluation of a run's model on its val / test sources: retrieval, zero-shot and (clips)
temporal order, from one embedding pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlpt.config import RunConfig
from vlpt.eval import embed_eval_set, evaluate_zeroshot, retrieval_metrics, temporal_metrics
from vlpt.eval.caption import evaluate_captions
from vlpt.eval.masked import embed_with_visual_tokens, evaluate_mim, mlm_metrics
from vlpt.eval.rerank import itm_hard_negative_metrics, reranked_retrieval_metrics


def evaluate_run(
    model,
    tokenizer,
    cfg: RunConfig,
    device: torch.device,
    splits: tuple[str, ...] = ("val",),
    step: int | None = None,
) -> dict[str, Any]:
    """Flat dict `{split}/{metric}` for every configured split that has sources; `step` names
    the reconstruction PNG of a run with masked image modelling."""
    results: dict[str, Any] = {}
    for split in splits:
        sources = getattr(cfg.data, split)
        if not sources:
            continue
        emb = embed_eval_set(model, tokenizer, sources, **_eval_options(cfg, device))
        metrics = retrieval_metrics(emb.image, emb.text, emb.text_to_image)
        if emb.reversed_rows is not None:  # clips that know their time-reversed captions
            metrics.update(temporal_metrics(emb))
        if cfg.eval.zeroshot:
            metrics.update(
                evaluate_zeroshot(
                    model, tokenizer, sources, task=tuple(cfg.eval.zeroshot), embeddings=emb
                )
            )
        metrics.update(_masked_head_metrics(model, tokenizer, cfg, sources, device, split, step))
        if cfg.objectives.caption.enabled:
            metrics.update(_caption_metrics(model, tokenizer, cfg, sources, device))
        results.update({f"{split}/{k}": v for k, v in metrics.items()})
    return results


def _masked_head_metrics(
    model, tokenizer, cfg: RunConfig, sources, device, split: str, step: int | None
) -> dict[str, Any]:
    """MLM accuracies, ITM hard-negative accuracy and re-ranked retrieval (`rerank/...`), MIM
    loss (and its PNG grid for val, in OUTPUT_DIR/mim/), for the heads the run trains."""
    masked = cfg.objectives
    common: dict[str, Any] = {"batch_size": cfg.eval.batch_size, "precision": cfg.train.precision}
    frames: dict[str, Any] = {"num_frames": cfg.data.num_frames}
    metrics: dict[str, Any] = {}
    if masked.mlm.enabled or masked.itm.enabled or cfg.eval.rerank_k:
        data = embed_with_visual_tokens(
            model,
            tokenizer,
            sources,
            max_items=cfg.eval.max_items,
            device=device,
            **common,
            **frames,
        )
        if masked.mlm.enabled:
            metrics.update(mlm_metrics(model, tokenizer, data, **common))
        if masked.itm.enabled:
            metrics.update(itm_hard_negative_metrics(model, tokenizer, data, **common))
        if cfg.eval.rerank_k:
            reranked = reranked_retrieval_metrics(
                model, tokenizer, data, cfg.eval.rerank_k, **common
            )
            metrics.update({f"rerank/{k}": v for k, v in reranked.items() if "_r" in k})
    if masked.mim.enabled:
        name = f"{split}_step_{step:08d}.png" if step is not None else f"{split}.png"
        png = Path(cfg.output_dir) / "mim" / name if split == "val" else None
        metrics.update(
            evaluate_mim(
                model,
                sources,
                max_items=cfg.eval.max_items,
                device=device,
                mask_ratio=masked.mim.mask_ratio,
                png_path=png,
                **common,
                **frames,
            )
        )
    return metrics


def _caption_metrics(model, tokenizer, cfg: RunConfig, sources, device) -> dict[str, Any]:
    """Greedy captions of the split scored against its references: `caption/{bleu4, cider,
    rouge_l, attr_acc}` (attribute accuracy on the synthetic world's metadata)."""
    scores = evaluate_captions(model, tokenizer, sources, **_eval_options(cfg, device))
    keys = ("bleu4", "cider", "rouge_l", "attr_acc")
    return {f"caption/{k}": scores[k] for k in keys if scores.get(k) is not None}


def _eval_options(cfg: RunConfig, device: Any) -> dict[str, Any]:
    """The keyword arguments every evaluation pass of a run shares."""
    return {
        "batch_size": cfg.eval.batch_size,
        "max_items": cfg.eval.max_items,
        "device": device,
        "precision": cfg.train.precision,
        "num_frames": cfg.data.num_frames,
    }
