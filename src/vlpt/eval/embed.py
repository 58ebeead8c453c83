"""Embed an evaluation set once: every image or clip, and every caption of every item.

Retrieval, zero-shot classification and temporal order all start from these embeddings, so the
model runs over the shards a single time however many metrics are computed from them. Clips
whose metadata carry `reversed_captions` (the synthetic video world) are also embedded played
backwards, with those captions, for the temporal-order metrics.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vlpt.config import Source
from vlpt.data.loader import DEFAULT_NUM_FRAMES, iter_eval_batches
from vlpt.models import VisionLanguageModel

Tokenizer = Callable[[list[str]], torch.Tensor]


@dataclass
class EvalEmbeddings:
    """Normalised embeddings of an evaluation set, on the device they were computed on (fp32)."""

    image: torch.Tensor  # (N, D)
    text: torch.Tensor  # (M, D), the captions of all items, item by item
    text_to_image: torch.Tensor  # (M,) long: the item each caption describes
    keys: list[str] = field(default_factory=list)  # (N) sample keys
    meta: list[dict[str, Any]] = field(default_factory=list)  # (N) parsed `.json` metadata
    skips: dict[str, int] = field(default_factory=dict)  # bad samples skipped, per reason
    # Temporal order (clips with `reversed_captions` only; empty otherwise):
    reversed_rows: torch.Tensor | None = None  # (R,) long: the items that have them
    image_reversed: torch.Tensor | None = None  # (R, D): those clips, frames in reverse order
    text_reversed: torch.Tensor | None = None  # (M_R, D): reversed caption paired with each
    reversed_text_rows: torch.Tensor | None = None  # (M_R,) long: caption row it pairs with


@contextlib.contextmanager
def evaluation_mode(
    model: VisionLanguageModel, device: str | torch.device, precision: str
) -> Iterator[None]:
    """eval() + no_grad + bf16 autocast when asked; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    autocast = torch.autocast(
        torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"
    )
    try:
        with torch.no_grad(), autocast:
            yield
    finally:
        model.train(was_training)


def encode_captions(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    captions: Sequence[str],
    device: str | torch.device,
    batch_size: int = 256,
) -> torch.Tensor:
    """Captions (M >= 1) -> (M, D) fp32 embeddings, tokenised and encoded in batches."""
    chunks = [
        model.encode_text(tokenizer(list(captions[i : i + batch_size])).to(device)).float()
        for i in range(0, len(captions), batch_size)
    ]
    return torch.cat(chunks)


def model_eval_batches(
    model: VisionLanguageModel,
    sources: Sequence[Source],
    batch_size: int,
    max_items: int = 0,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> Iterator[dict[str, Any]]:
    """`iter_eval_batches` preprocessed for `model` (its image size, mean and std)."""
    return iter_eval_batches(
        list(sources),
        image_size=model.image_size,
        mean=model.image_mean,
        std=model.image_std,
        batch_size=batch_size,
        max_items=max_items,
        num_frames=num_frames,
    )


def embed_eval_set(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    sources: list[Source],
    *,
    batch_size: int = 256,
    max_items: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    with_text: bool = True,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> EvalEmbeddings:
    """Run `model` over `vlpt.data.iter_eval_batches(sources)`; `with_text=False` skips captions.

    `model` is the bare `VisionLanguageModel` (not a DDP wrapper); `max_items=0` means all items;
    clips are sampled at `num_frames` frames.
    """
    images: list[torch.Tensor] = []  # (B, D) per batch
    texts: list[torch.Tensor] = []  # (captions in batch, D) per batch
    owners: list[int] = []
    keys: list[str] = []
    metas: list[dict[str, Any]] = []
    skips: Counter[str] = Counter()
    reversed_parts: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("rows", "image", "text", "owner")
    }
    batches = model_eval_batches(model, sources, batch_size, max_items, num_frames)
    with evaluation_mode(model, device, precision):
        for batch in batches:
            first = len(keys)  # index of this batch's first item
            first_caption = len(owners)
            pixels = batch["image"].to(device)
            images.append(model.encode_image(pixels).float())  # (B, D)
            captions = [c for item in batch["captions"] for c in item]
            if with_text and captions:
                texts.append(encode_captions(model, tokenizer, captions, device, batch_size))
                owners += [first + i for i, item in enumerate(batch["captions"]) for _ in item]
                if pixels.ndim == 5:
                    where = (first, first_caption)
                    _embed_reversed(model, tokenizer, pixels, batch, where, device, reversed_parts)
            keys += batch["key"]
            metas += batch["meta"]
            skips.update(batch.get("skips", {}))
    dim = images[0].shape[1] if images else 0
    if reversed_parts["rows"]:
        reversed_fields = {
            "reversed_rows": torch.cat(reversed_parts["rows"]),
            "image_reversed": torch.cat(reversed_parts["image"]),
            "text_reversed": torch.cat(reversed_parts["text"]),
            "reversed_text_rows": torch.cat(reversed_parts["owner"]),
        }
    else:
        reversed_fields = {}
    return EvalEmbeddings(
        **reversed_fields,  # type: ignore[arg-type]
        image=torch.cat(images) if images else torch.empty(0, dim, device=device),
        text=torch.cat(texts) if texts else torch.empty(0, dim, device=device),
        text_to_image=torch.tensor(owners, dtype=torch.long, device=device),
        keys=keys,
        meta=metas,
        skips=dict(skips),
    )


def _embed_reversed(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    clips: torch.Tensor,
    batch: dict[str, Any],
    where: tuple[int, int],
    device: str | torch.device,
    parts: dict[str, list[torch.Tensor]],
) -> None:
    """Embed the batch's clips that carry `reversed_captions` backwards, and those captions:
    caption k of an item pairs with reversed caption k (cycling when there are fewer)."""
    rows: list[int] = []
    reversed_captions: list[str] = []
    caption_rows: list[int] = []
    first, caption_row = where  # rows of the batch's first item and first caption
    for i, (captions, meta) in enumerate(zip(batch["captions"], batch["meta"])):
        flipped = meta.get("reversed_captions") or []
        if flipped:
            rows.append(i)
            reversed_captions += [flipped[k % len(flipped)] for k in range(len(captions))]
            caption_rows += range(caption_row, caption_row + len(captions))
        caption_row += len(captions)
    if not rows:
        return
    index = torch.tensor(rows, device=clips.device)
    parts["rows"].append(torch.tensor(rows, dtype=torch.long, device=device) + first)
    parts["image"].append(model.encode_image(clips[index].flip(1)).float())
    parts["text"].append(encode_captions(model, tokenizer, reversed_captions, device))
    parts["owner"].append(torch.tensor(caption_rows, dtype=torch.long, device=device))
