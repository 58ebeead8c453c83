"""Temporal-order accuracy: does the model know which way time runs?

For each clip of an evaluation set whose `.json` carries `reversed_captions` (the captions of
the clip played backwards, e.g. "moves right" for "moves left"):

    temporal_text_acc    score(clip, caption) > score(clip, reversed caption), over the pairs
                         (captions[i], reversed_captions[i]) of each clip
    temporal_video_acc   score(clip, caption) > score(reversed clip, caption), over every
                         caption; the reversed clip is the sampled frames in reverse order

A tie (an order-blind model gives one exactly) counts one half, so chance is 0.5 for both.
`vlpt eval temporal` also breaks both down by the clip's action (`by_action`: the action of a
one-event clip as its `.json` `actions` names it, "two events" for the rest), which shows the
kinds of motion a model has not learned to tell from their reversal.
"""

from __future__ import annotations

from typing import Any

import torch

from vlpt.config import Source
from vlpt.data.loader import DEFAULT_NUM_FRAMES
from vlpt.eval.embed import EvalEmbeddings, Tokenizer, embed_eval_set
from vlpt.models import VisionLanguageModel

TIE = 1e-4
"""Cosine similarities closer than this are a tie: an order-blind model scores a clip and its
reversal equally up to rounding (frames summed in another order, bf16)."""


def order_accuracy(right: torch.Tensor, wrong: torch.Tensor) -> float:
    """Fraction of pairs where `right` scores above `wrong`; ties (within `TIE`) count 0.5."""
    tie = (right - wrong).abs() <= TIE
    wins = ((right > wrong) & ~tie).float() + 0.5 * tie.float()
    return wins.mean().item()


def temporal_metrics(emb: EvalEmbeddings) -> dict[str, float | int]:
    """`temporal_text_acc`, `temporal_video_acc`, `temporal_n_items` (clips with reversed
    captions) and `temporal_n_pairs` from an embedding pass over clips (`embed_eval_set`)."""
    items, right, wrong_text, wrong_video = _order_scores(emb)
    return {
        "temporal_text_acc": order_accuracy(right, wrong_text),
        "temporal_video_acc": order_accuracy(right, wrong_video),
        "temporal_n_items": len(emb.reversed_rows) if emb.reversed_rows is not None else 0,
        "temporal_n_pairs": len(items),
    }


def temporal_by_action(emb: EvalEmbeddings) -> dict[str, dict[str, float | int]]:
    """Action -> {`text_acc`, `video_acc`, `n_pairs`}, over the clips of that action (one-event
    clips by their `.json` `actions`; "two events" for clips with two)."""
    items, right, wrong_text, wrong_video = _order_scores(emb)
    groups: dict[str, list[int]] = {}
    for pair, item in enumerate(items.tolist()):
        actions = emb.meta[item].get("actions", []) if item < len(emb.meta) else []
        name = actions[0] if len(actions) == 1 else ("two events" if actions else "unknown")
        groups.setdefault(name, []).append(pair)
    result: dict[str, dict[str, float | int]] = {}
    for name in sorted(groups):
        index = torch.tensor(groups[name], device=right.device)
        result[name] = {
            "text_acc": round(order_accuracy(right[index], wrong_text[index]), 4),
            "video_acc": round(order_accuracy(right[index], wrong_video[index]), 4),
            "n_pairs": len(index),
        }
    return result


def _order_scores(
    emb: EvalEmbeddings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per caption that has a reversed pair: its clip (m,), score(clip, caption), score(clip,
    reversed caption), score(reversed clip, caption)."""
    if emb.reversed_rows is None or emb.image_reversed is None or emb.text_reversed is None:
        raise ValueError(
            "no evaluation item is a clip whose json carries 'reversed_captions'; temporal order "
            "needs clips written by `vlpt data synth --video` (or metadata in that format)."
        )
    assert emb.reversed_text_rows is not None
    caption_rows = emb.reversed_text_rows  # (m,) caption rows that have a reversed pair
    items = emb.text_to_image[caption_rows]  # (m,) their clips
    text = emb.text[caption_rows]  # (m, D)
    right = (emb.image[items] * text).sum(-1)  # score(clip, caption)
    wrong_text = (emb.image[items] * emb.text_reversed).sum(-1)  # score(clip, reversed caption)
    # row of each clip in image_reversed
    slot = torch.full((len(emb.image),), -1, dtype=torch.long, device=items.device)
    slot[emb.reversed_rows] = torch.arange(len(emb.reversed_rows), device=items.device)
    wrong_video = (emb.image_reversed[slot[items]] * text).sum(-1)  # score(reversed clip, caption)
    return items, right, wrong_text, wrong_video


def evaluate_temporal(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    sources: list[Source],
    *,
    num_frames: int = DEFAULT_NUM_FRAMES,
    batch_size: int = 64,
    max_items: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> dict[str, Any]:
    """`temporal_text_acc`, `temporal_video_acc`, `n_items`, `n_pairs` and `by_action`
    (`temporal_by_action`) on the clips of `sources`."""
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
    metrics = temporal_metrics(emb)
    return {
        "temporal_text_acc": metrics["temporal_text_acc"],
        "temporal_video_acc": metrics["temporal_video_acc"],
        "n_items": metrics["temporal_n_items"],
        "n_pairs": metrics["temporal_n_pairs"],
        "by_action": temporal_by_action(emb),
    }
