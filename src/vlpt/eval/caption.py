"""Caption evaluation: generate one caption per item of an evaluation set, score it against all
of the item's reference captions.

    metrics = evaluate_captions(model, tokenizer, [Source(url="data/synthetic/val")], num_beams=3)
    # {"bleu4", "cider", "rouge_l", "attr_acc", "n_items", "n_attr_items", "skips"}

Images and clips (`num_frames` frames) are captioned in batches by `vlpt.models.caption_images`;
`caption_scores` gives BLEU-4, CIDEr-D and ROUGE-L over the whole set, and items of the
synthetic world (images whose `.json` lists `objects`, clips that also list `events`) get an
attribute accuracy each, averaged into `attr_acc` (None when no item has that metadata).

Items without a usable reference (no `.txt`, or only blank lines) are skipped while reading the
shards and counted in `skips` (`missing_caption`, `empty_caption`), like every other bad sample,
so one bad item never stops an evaluation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from vlpt.config import ConfigError, Source
from vlpt.data.loader import DEFAULT_NUM_FRAMES
from vlpt.eval.caption_metrics import attribute_accuracy, caption_scores
from vlpt.eval.clip_attributes import clip_attribute_accuracy
from vlpt.eval.embed import evaluation_mode, model_eval_batches
from vlpt.models import GenerationConfig, Tokenizer, VisionLanguageModel, caption_images


def captioning_config(
    model: VisionLanguageModel, config: GenerationConfig | None = None, **options: Any
) -> GenerationConfig:
    """Check that `model` can caption and that the generation options are valid, before any
    data is read; either problem is a `ConfigError` in one sentence."""
    try:
        model.caption_decoder()
        return replace(config or GenerationConfig(), **options)
    except ValueError as e:  # no decoder, or an option out of range
        raise ConfigError(str(e)) from None


@dataclass
class GeneratedCaptions:
    """One generated caption per evaluated item, with its references and metadata."""

    predictions: dict[str, str] = field(default_factory=dict)
    """Item name (its sample key) -> generated caption."""
    references: dict[str, list[str]] = field(default_factory=dict)
    """Item name -> every caption line of its `.txt`."""
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Item name -> its parsed `.json` (`{}` when it has none)."""
    skips: Counter[str] = field(default_factory=Counter)
    """Bad samples skipped while reading, per reason."""

    def add(self, key: str, caption: str, references: list[str], meta: dict[str, Any]) -> None:
        name = key if key not in self.predictions else f"{key}#{len(self.predictions)}"
        self.predictions[name], self.references[name], self.meta[name] = caption, references, meta


def generate_eval_captions(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    sources: Sequence[Source],
    *,
    config: GenerationConfig,
    batch_size: int = 64,
    max_items: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> GeneratedCaptions:
    """Caption every item of `sources` (at most `max_items`, 0 = all), a batch at a time."""
    generated = GeneratedCaptions()
    batches = model_eval_batches(model, sources, batch_size, max_items, num_frames)
    with evaluation_mode(model, device, precision):
        for batch in batches:
            pixels = batch["image"].to(device)  # (B, 3, S, S) or (B, T, 3, S, S)
            texts = caption_images(model, tokenizer, pixels, config=config)
            for key, text, refs, meta in zip(batch["key"], texts, batch["captions"], batch["meta"]):
                generated.add(key, text, refs, meta)
            generated.skips.update(batch.get("skips", {}))
    return generated


def synthetic_attribute_accuracy(prediction: str, meta: Mapping[str, Any]) -> float | None:
    """The synthetic world's attribute accuracy of one caption: clip events when the metadata
    has `events`, scene objects when it has `objects`; None for other items."""
    if meta.get("events"):
        return clip_attribute_accuracy(prediction, meta)
    if meta.get("objects"):
        return attribute_accuracy(prediction, meta)
    return None


def score_captions(generated: GeneratedCaptions) -> dict[str, Any]:
    """`caption_scores` of the generated captions, plus `attr_acc`, `n_attr_items`, `skips`."""
    if not generated.predictions:
        raise ValueError("no item was captioned; the evaluation set yielded nothing usable.")
    scores: dict[str, Any] = caption_scores(generated.predictions, generated.references)
    accuracies = [
        acc
        for name, text in generated.predictions.items()
        if (acc := synthetic_attribute_accuracy(text, generated.meta[name])) is not None
    ]
    scores["attr_acc"] = sum(accuracies) / len(accuracies) if accuracies else None
    scores["n_attr_items"] = len(accuracies)
    scores["skips"] = dict(generated.skips)
    return scores


def evaluate_captions(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    sources: Sequence[Source],
    *,
    batch_size: int = 64,
    max_items: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    num_frames: int = DEFAULT_NUM_FRAMES,
    config: GenerationConfig | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Caption the evaluation shards with `model` and score the captions.

    `options` are `GenerationConfig` fields (`num_beams`, `max_new_tokens`, `do_sample`, ...;
    default greedy). Returns `bleu4`, `cider` (CIDEr-D), `rouge_l`, `n_items`, `attr_acc`
    (None without synthetic metadata), `n_attr_items` and `skips` ({reason: count}). A model
    without a caption decoder is a `ConfigError`, raised before any data is read.
    """
    generation = captioning_config(model, config, **options)
    generated = generate_eval_captions(
        model,
        tokenizer,
        sources,
        config=generation,
        batch_size=batch_size,
        max_items=max_items,
        device=device,
        precision=precision,
        num_frames=num_frames,
    )
    return score_captions(generated)
