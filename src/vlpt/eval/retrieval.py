"""Image-text retrieval Recall@K with the multi-caption protocol of clip-benchmark.

Text -> image: each caption is a query with exactly one correct item.
Image -> text: each item is a query; it is a hit at K when ANY of its captions is in the top K.

Instead of sorting, a query's rank is the number of wrong candidates that score at least as high
as its best correct candidate (a hit at K iff that count < K). This is what a top-K lookup
gives, but ties count against the query: a collapsed model that embeds everything alike scores
0, not 100. Scores are computed in query chunks, so 5k items x 25k captions fit in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from vlpt.config import Source
from vlpt.data.loader import DEFAULT_NUM_FRAMES
from vlpt.eval.embed import Tokenizer, embed_eval_set
from vlpt.models import VisionLanguageModel

KS = (1, 5, 10)
_CHUNK_ELEMENTS = 1 << 24  # scores held at once: 16M fp32 = 64 MB


def _query_slices(n_queries: int, n_candidates: int) -> Iterator[slice]:
    """Consecutive query ranges whose score matrices hold about _CHUNK_ELEMENTS each."""
    step = max(1, _CHUNK_ELEMENTS // max(n_candidates, 1))
    for start in range(0, n_queries, step):
        yield slice(start, min(start + step, n_queries))


def text_to_image_ranks(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor
) -> torch.Tensor:
    """(M,) long: for each caption, how many other items score >= its own item."""
    ranks = []
    for q in _query_slices(len(text_emb), len(image_emb)):
        scores = text_emb[q] @ image_emb.T  # (C, N)
        correct = scores.gather(1, text_to_image[q, None])  # (C, 1)
        ranks.append((scores >= correct).sum(dim=1) - 1)  # minus the correct item itself
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def image_to_text_ranks(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor
) -> torch.Tensor:
    """(N,) long: for each item, how many other items' captions score >= its best caption."""
    ranks = []
    for q in _query_slices(len(image_emb), len(text_emb)):
        scores = image_emb[q] @ text_emb.T  # (C, M)
        items = torch.arange(q.start, q.stop, device=scores.device)
        own = text_to_image[None, :] == items[:, None]  # (C, M) its own captions
        # An item without captions gets best = -inf: every caption outranks it, never a hit.
        best = scores.masked_fill(~own, float("-inf")).max(dim=1, keepdim=True).values
        ranks.append(((scores >= best) & ~own).sum(dim=1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = KS,
) -> dict[str, float | int]:
    """Recall@K both ways from normalised embeddings: image (N, D), text (M, D), owner (M,).

    Returns `t2i_r{k}` and `i2t_r{k}` (fractions in [0, 1]) for each k, `n_items` and
    `n_captions`.
    """
    text_to_image = text_to_image.to(image_emb.device, torch.long)
    t2i = text_to_image_ranks(image_emb, text_emb, text_to_image)  # (M,)
    i2t = image_to_text_ranks(image_emb, text_emb, text_to_image)  # (N,)
    metrics: dict[str, float | int] = {}
    for k in ks:
        metrics[f"t2i_r{k}"] = (t2i < k).float().mean().item() if len(t2i) else 0.0
    for k in ks:
        metrics[f"i2t_r{k}"] = (i2t < k).float().mean().item() if len(i2t) else 0.0
    metrics.update(n_items=len(image_emb), n_captions=len(text_emb))
    return metrics


def evaluate_retrieval(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    sources: list[Source],
    *,
    batch_size: int = 256,
    max_items: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> dict[str, float | int]:
    """Embed the evaluation shards (images or clips of `num_frames` frames) with `model` and
    return `retrieval_metrics` on them."""
    emb = embed_eval_set(
        model,
        tokenizer,
        sources,
        batch_size=batch_size,
        max_items=max_items,
        device=device,
        precision=precision,
        num_frames=num_frames,
    )
    return retrieval_metrics(emb.image, emb.text, emb.text_to_image)
