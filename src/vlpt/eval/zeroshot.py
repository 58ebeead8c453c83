"""Zero-shot classification: class names + prompt templates -> text classifier -> top-1.

The generic part (`zeroshot_metrics`) works for any labelled images or clips. The synthetic
world's tasks read labels from each item's `.json`: for `shape` and `colour`, items showing
exactly one object are classified by that object's attribute; for `action` (video), clips with
exactly one event are classified by its action ("moves left", "grows", ...). Each is scored
against the world's whole vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from vlpt.config import Source
from vlpt.data.loader import DEFAULT_NUM_FRAMES
from vlpt.data.synthetic import ACTIONS, COLOURS, SHAPES
from vlpt.eval.embed import EvalEmbeddings, Tokenizer, embed_eval_set, evaluation_mode
from vlpt.models import VisionLanguageModel

TASKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # task: (vocabulary, templates); templates echo how the synthetic captions phrase things.
    "shape": (SHAPES, ("a {}.", "a photo of a {}.", "a {} shape.", "there is a {}.")),
    "colour": (COLOURS, ("something {}.", "a {} shape.", "a {} object.", "the shape is {}.")),
    "action": (ACTIONS, ("a shape {}.", "something {}.", "an object {}.", "the shape {}.")),
}


def zeroshot_metrics(
    image_emb: torch.Tensor,
    labels: torch.Tensor,
    classnames: Sequence[str],
    templates: Sequence[str],
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
) -> dict[str, float | int]:
    """Top-1 accuracy of normalised image embeddings (N, D) with class labels (N,) -> `top1`, `n`.

    Each class embedding is the normalised mean of its normalised template embeddings
    (open_clip's `build_zero_shot_classifier`).
    """
    if len(image_emb) == 0:
        return {"n": 0}
    with evaluation_mode(model, image_emb.device, "fp32"):
        weights = build_zero_shot_classifier(
            model, tokenizer, classnames, templates, device=image_emb.device
        )  # (D, C)
    predictions = (image_emb.float() @ weights.float()).argmax(dim=1)  # (N,)
    top1 = (predictions == labels.to(predictions.device)).float().mean().item()
    return {"top1": top1, "n": len(image_emb)}


def synthetic_task_labels(
    metas: Sequence[dict[str, Any]], task: str
) -> tuple[list[int], list[int], list[str]]:
    """(item indices, label per selected item, class names) for a synthetic-world task.

    Selects the items with exactly one object. Class names are the world's vocabulary, followed
    by any value the metadata holds outside it (an eval set written by another version).
    """
    if task not in TASKS:
        raise ValueError(f"zero-shot task '{task}' is unknown; choose from {', '.join(TASKS)}.")
    vocabulary = list(TASKS[task][0])
    if task == "action":
        items = [
            (i, m["actions"][0]) for i, m in enumerate(metas) if len(m.get("actions", [])) == 1
        ]
    else:
        items = [
            (i, m["objects"][0][task])
            for i, m in enumerate(metas)
            if len(m.get("objects", [])) == 1
        ]
    classnames = vocabulary + sorted({value for _, value in items} - set(vocabulary))
    index = {name: c for c, name in enumerate(classnames)}
    return [i for i, _ in items], [index[value] for _, value in items], classnames


def evaluate_zeroshot(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    sources: list[Source],
    *,
    task: str | Sequence[str] = ("shape", "colour"),
    batch_size: int = 256,
    max_items: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    embeddings: EvalEmbeddings | None = None,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> dict[str, float | int]:
    """`zeroshot_{task}_top1` and `zeroshot_{task}_n` for each synthetic-world task.

    Pass `embeddings` (from `embed_eval_set`) to reuse an embedding pass; `sources` is then not
    read. `top1` is left out of a task that no item qualifies for (`n` = 0).
    """
    tasks = [task] if isinstance(task, str) else list(task)
    for name in tasks:  # fail on a typo before the embedding pass, not after it
        synthetic_task_labels([], name)
    if embeddings is None:
        embeddings = embed_eval_set(
            model,
            tokenizer,
            sources,
            batch_size=batch_size,
            max_items=max_items,
            device=device,
            precision=precision,
            with_text=False,
            num_frames=num_frames,
        )
    metrics: dict[str, float | int] = {}
    for name in tasks:
        rows, labels, classnames = synthetic_task_labels(embeddings.meta, name)
        image_emb = embeddings.image[torch.tensor(rows, dtype=torch.long)]  # (n, D)
        result = zeroshot_metrics(
            image_emb, torch.tensor(labels), classnames, TASKS[name][1], model, tokenizer
        )
        metrics.update({f"zeroshot_{name}_{k}": v for k, v in result.items()})
    return metrics
