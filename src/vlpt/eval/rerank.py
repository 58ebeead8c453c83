"""Retrieval re-ranked by the image-text matching head (ALBEF/BLIP's two-stage retrieval).

The contrastive embeddings rank all candidates cheaply; the ITM head, which reads caption and
image together through the fusion encoder, re-scores only each query's top k (new score = ITM
match logit + contrastive similarity, BLIP's rule). Items beyond the top k keep their
contrastive order below the re-scored ones, so the metrics (same keys as `retrieval_metrics`)
stay comparable.

    data = embed_with_visual_tokens(model, tokenizer, sources)
    metrics = reranked_retrieval_metrics(model, tokenizer, data, k=16)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vlpt.config import ConfigError, Source
from vlpt.data.loader import DEFAULT_NUM_FRAMES
from vlpt.eval.embed import Tokenizer, evaluation_mode
from vlpt.eval.masked import VisualEvalSet, embed_with_visual_tokens
from vlpt.eval.retrieval import KS
from vlpt.models import VisionLanguageModel


def itm_scores(
    model: VisionLanguageModel,
    visual_tokens: torch.Tensor,
    tokens: torch.Tensor,
    items: torch.Tensor,
    captions: torch.Tensor,
    batch_size: int = 256,
) -> torch.Tensor:
    """Match logit (match - no match) of the pairs (items[p], captions[p]) -> (P,), from
    visual tokens (N, T, W) and caption tokens (M, L); pairs gathered batch by batch."""
    scores = []
    for start in range(0, len(items), batch_size):
        rows = slice(start, start + batch_size)
        fused = model.fuse(tokens[captions[rows]], visual_tokens[items[rows]])
        logits = model.itm_logits(fused).float()
        scores.append(logits[:, 1] - logits[:, 0])
    return torch.cat(scores) if scores else torch.zeros(0, device=tokens.device)


def rerank_top_k(
    scores: torch.Tensor, k: int, rescore: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `scores` (Q, C) with their top k re-scored `rescore + score` and lifted above
    every other candidate, where `rescore(queries (P,), candidates (P,)) -> (P,)` scores the
    pairs. As in BLIP, the contrastive score is kept in the sum: it breaks the ITM head's ties,
    and an untrained head cannot make the ranking worse than a constant shift -> (new scores,
    top k). Computed in fp32 whatever `scores` is: a large offset in bf16 (8-bit mantissa,
    spacing 64 at 1e4) made every re-scored candidate tie."""
    scores = scores.float()
    top = scores.topk(min(k, scores.shape[1]), dim=1)  # (Q, k)
    queries = torch.arange(len(scores), device=scores.device)[:, None].expand_as(top.indices)
    new = rescore(queries.reshape(-1), top.indices.reshape(-1)).view_as(top.indices).float()
    rescored = new + top.values
    # Each row's lowest re-scored candidate lands just above the row's best score.
    lift = scores.max(dim=1, keepdim=True).values - rescored.min(dim=1, keepdim=True).values + 1
    return scores.scatter(1, top.indices, rescored + lift), top.indices


@torch.no_grad()
def reranked_retrieval_metrics(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    data: VisualEvalSet,
    k: int,
    *,
    batch_size: int = 256,
    precision: str = "fp32",
) -> dict[str, float | int]:
    """Recall@1/5/10 both ways after re-ranking each query's contrastive top k with ITM."""
    device = data.image.device
    tokens = tokenizer(data.captions).to(device)  # (M, L)
    owner = data.text_to_image

    def pairs(captions: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return itm_scores(model, data.visual_tokens, tokens, items, captions, batch_size)

    similarity = data.text.float() @ data.image.float().T  # (M, N), fp32 outside autocast
    with evaluation_mode(model, device, precision):
        t2i, _ = rerank_top_k(similarity, k, lambda q, c: pairs(q, c))  # (M, N)
        i2t, _ = rerank_top_k(similarity.T, k, lambda q, c: pairs(c, q))  # (N, M)
    # Ranks as in `retrieval`: wrong candidates scoring >= the best correct one (ties count).
    t2i_rank = (t2i >= t2i.gather(1, owner[:, None])).sum(1) - 1
    own = owner[None, :] == torch.arange(len(data.image), device=device)[:, None]  # (N, M)
    best = i2t.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values
    i2t_rank = ((i2t >= best) & ~own).sum(1)
    metrics: dict[str, float | int] = {}
    metrics.update({f"t2i_r{n}": (t2i_rank < n).float().mean().item() for n in KS})
    metrics.update({f"i2t_r{n}": (i2t_rank < n).float().mean().item() for n in KS})
    metrics.update(n_items=len(data.image), n_captions=len(data.text))
    return metrics


@torch.no_grad()
def itm_hard_negative_metrics(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    data: VisualEvalSet,
    *,
    batch_size: int = 256,
    precision: str = "fp32",
) -> dict[str, float]:
    """ITM over every caption with its own image (a match) and with the most similar other
    image by contrastive score (a hard negative, not a match): `itm_acc`, the accuracy over
    both (the head's decision, match logit > no-match logit), split into `itm_acc_match` (own
    images accepted) and `itm_acc_negative` (hardest negatives rejected), and `itm_pair_acc`,
    how often the own image outscores the hardest negative (the order re-ranking uses; no
    threshold)."""
    device = data.image.device
    tokens = tokenizer(data.captions).to(device)
    owner = data.text_to_image
    scores = (data.text @ data.image.T).scatter(1, owner[:, None], float("-inf"))
    hardest = scores.argmax(dim=1)
    with evaluation_mode(model, device, precision):
        every = torch.arange(len(tokens), device=device)
        positive = itm_scores(model, data.visual_tokens, tokens, owner, every, batch_size)
        negative = itm_scores(model, data.visual_tokens, tokens, hardest, every, batch_size)
    accepted, rejected = (positive > 0).float(), (negative <= 0).float()
    return {
        "itm_acc": torch.cat([accepted, rejected]).mean().item(),
        "itm_acc_match": accepted.mean().item(),
        "itm_acc_negative": rejected.mean().item(),
        "itm_pair_acc": (positive > negative).float().mean().item(),
    }


def evaluate_retrieval_reranked(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    sources: list[Source],
    *,
    rerank_k: int,
    batch_size: int = 256,
    max_items: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> dict[str, float | int]:
    """`vlpt eval retrieval --rerank-k K`: embed the shards, re-rank each query's top K."""
    if model.fusion is None:
        raise ConfigError(
            "--rerank-k needs an image-text matching head, and this checkpoint's model has no "
            "fusion encoder; train a model with one (e.g. model.name=tiny-masked) or drop --rerank-k."
        )
    data = embed_with_visual_tokens(
        model,
        tokenizer,
        sources,
        batch_size=batch_size,
        max_items=max_items,
        device=device,
        precision=precision,
        num_frames=num_frames,
    )
    return reranked_retrieval_metrics(
        model, tokenizer, data, rerank_k, batch_size=batch_size, precision=precision
    )
