"""Evaluation of the masked heads: MLM accuracy (with the real and a shuffled image) and the MAE
reconstruction loss, with a PNG grid of reconstructions.

    data = embed_with_visual_tokens(model, tokenizer, sources, max_items=1000)
    metrics = mlm_metrics(model, tokenizer, data)          # mlm_acc, mlm_attr_acc, ...
    metrics |= evaluate_mim(model, sources, png_path="runs/x/mim/val_step_00000100.png")

MLM, two protocols on every caption of every item:
- `mlm_acc`: BERT masking as in training (15%, 80/10/10, a fixed seed), accuracy over the
  selected tokens (`n_tokens` of them).
- `mlm_attr_acc`: each attribute word of the caption (colours, shapes, and the direction and
  position words left/right/up/down/top/bottom) masked on its own, the rest of the caption
  intact (the cloze probe: which colour is *the circle at the top left*?); accuracy over those
  tokens (`n_attr_tokens`). `mlm_attr_acc_shuffled` is the same with each caption paired with
  the next item's image (the set rolled by one): a model that reads the image drops to its
  text-only guess there, and the gap is what the image contributes.
- `mlm_attr_all_acc` (and `_shuffled`): every attribute word masked at once, so no attribute
  can be inferred from another through the text. A harder protocol with a ceiling below 1: the
  captions name objects in random order, and once colours, shapes and positions are all
  masked, the skeleton ("a small [M] [M] at the [M] and a small [M] [M] at the [M] [M]") often
  does not say which object comes first.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlpt.config import ConfigError, Source
from vlpt.data.loader import DEFAULT_NUM_FRAMES
from vlpt.data.synthetic.world import COLOURS, SHAPES
from vlpt.eval.embed import Tokenizer, encode_captions, evaluation_mode, model_eval_batches
from vlpt.models import VisionLanguageModel
from vlpt.models.mae import mae_loss, patchify, unpatchify
from vlpt.objectives.mim import masked_reconstruction
from vlpt.objectives.mlm import IGNORE, mask_tokens, replacement_pool

DIRECTION_WORDS = ("left", "right", "up", "down", "top", "bottom")
ATTRIBUTE_WORDS = (*COLOURS, *SHAPES, *DIRECTION_WORDS)
ATTRIBUTE_KINDS = {"colour": COLOURS, "shape": SHAPES, "position": DIRECTION_WORDS}


@dataclass
class VisualEvalSet:
    """An evaluation set embedded for the fusion heads: contrastive embeddings as
    `EvalEmbeddings` has them, plus every item's visual tokens and the caption strings."""

    image: torch.Tensor  # (N, D) normalised
    text: torch.Tensor  # (M, D) normalised, the captions of all items, item by item
    text_to_image: torch.Tensor  # (M,) long
    visual_tokens: torch.Tensor  # (N, T', W) tokens after ln_post
    captions: list[str] = field(default_factory=list)  # (M)


def embed_with_visual_tokens(
    model: VisionLanguageModel,
    tokenizer: Tokenizer,
    sources: Sequence[Source],
    *,
    batch_size: int = 256,
    max_items: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> VisualEvalSet:
    """One pass over the evaluation shards keeping what the fusion heads need."""
    images: list[torch.Tensor] = []  # (B, D) per batch
    tokens: list[torch.Tensor] = []  # (B, T', W) per batch
    texts: list[torch.Tensor] = []  # (captions in batch, D) per batch
    owners: list[int] = []
    captions: list[str] = []
    batches = model_eval_batches(model, sources, batch_size, max_items, num_frames)
    with evaluation_mode(model, device, precision):
        for batch in batches:
            first = sum(len(t) for t in images)  # index of this batch's first item
            features, visual = model.encode_image_with_tokens(batch["image"].to(device))
            images.append(features.float())
            tokens.append(visual.float())
            chunk = [c for item in batch["captions"] for c in item]
            if chunk:
                texts.append(encode_captions(model, tokenizer, chunk, device, batch_size))
            owners += [first + i for i, item in enumerate(batch["captions"]) for _ in item]
            captions += chunk
    if not images:
        raise ValueError("the evaluation set holds no usable item.")
    return VisualEvalSet(
        image=torch.cat(images),
        text=torch.cat(texts),
        text_to_image=torch.tensor(owners, dtype=torch.long, device=device),
        visual_tokens=torch.cat(tokens),
        captions=captions,
    )


def attribute_token_ids(tokenizer: Any, words: Sequence[str] = ATTRIBUTE_WORDS) -> torch.Tensor:
    """Token ids of the words (attribute words by default) that are one BPE token each."""
    ids = [tokenizer([w])[0, 1:-1] for w in words]
    return torch.tensor(sorted({int(t) for t in ids if len(t) == 1}))


def _masked_hits(
    model: VisionLanguageModel, inputs: torch.Tensor, labels: torch.Tensor, visual: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLM predictions at the positions where labels != IGNORE: (n,) bool hits and the
    (n,) true token ids."""
    selected = labels != IGNORE
    if not selected.any():
        return torch.zeros(0, dtype=torch.bool), labels[selected]
    hidden = model.fuse(inputs, visual)
    predicted = model.mlm_logits(hidden[selected]).argmax(dim=1)
    return predicted == labels[selected], labels[selected]


def mlm_metrics(
    model: VisionLanguageModel,
    tokenizer: Any,
    data: VisualEvalSet,
    *,
    batch_size: int = 256,
    mask_ratio: float = 0.15,
    seed: int = 0,
    precision: str = "fp32",
) -> dict[str, float | int]:
    """`mlm_acc`, `mlm_attr_acc` (one word masked at a time, also by kind of word:
    `mlm_attr_acc_colour`, `_shape`, `_position`), `mlm_attr_all_acc` (all at once), each
    attribute accuracy also `_shuffled`, and `n_tokens`, `n_attr_tokens`."""
    if model.fusion is None:
        raise ConfigError(
            "this checkpoint's model has no fusion encoder, so no MLM head to evaluate; "
            'train one whose model JSON has "fusion_cfg" (e.g. model.name=tiny-masked).'
        )
    device = data.visual_tokens.device
    vocab = model.fusion.cfg.vocab_size
    attribute_ids = attribute_token_ids(tokenizer).to(device)
    kind_ids = {k: attribute_token_ids(tokenizer, w).to(device) for k, w in ATTRIBUTE_KINDS.items()}
    pool = replacement_pool(model.fusion.mlm_head.output_tokens, vocab)  # as in training
    generator = torch.Generator().manual_seed(seed)
    sums: defaultdict[str, float] = defaultdict(float)
    n_items = len(data.visual_tokens)
    with evaluation_mode(model, device, precision):
        for start in range(0, len(data.captions), batch_size):
            rows = slice(start, start + batch_size)
            tokens = tokenizer(data.captions[rows]).to(device)  # (B, L)
            owner = data.text_to_image[rows]
            images = {
                "": data.visual_tokens[owner],
                "_shuffled": data.visual_tokens[(owner + 1) % n_items],
            }
            inputs, labels = mask_tokens(
                tokens, ratio=mask_ratio, vocab_size=vocab, generator=generator, random_pool=pool
            )
            hits, _ = _masked_hits(model, inputs, labels, images[""])
            sums["acc"] += float(hits.sum())
            sums["n"] += len(hits)
            is_attribute = torch.isin(tokens, attribute_ids)
            for protocol, (inputs, labels, row) in {
                "attr": _one_attribute_masked(tokens, is_attribute, vocab),
                "attr_all": _all_attributes_masked(tokens, is_attribute, vocab),
            }.items():
                for suffix, visual in images.items():
                    for chunk in range(0, len(row), batch_size):
                        part = slice(chunk, chunk + batch_size)
                        hits, target = _masked_hits(
                            model, inputs[part], labels[part], visual[row[part]]
                        )
                        sums[protocol + suffix] += float(hits.sum())
                        sums["n_" + protocol + suffix] += len(hits)
                        if protocol + suffix == "attr":
                            for kind, ids in kind_ids.items():
                                of_kind = torch.isin(target, ids)
                                sums["attr_" + kind] += float(hits[of_kind].sum())
                                sums["n_attr_" + kind] += float(of_kind.sum())
    n, n_attr = max(sums["n"], 1), max(sums["n_attr"], 1)
    return {
        "mlm_acc": sums["acc"] / n,
        "mlm_attr_acc": sums["attr"] / n_attr,
        "mlm_attr_acc_shuffled": sums["attr_shuffled"] / n_attr,
        **{f"mlm_attr_acc_{k}": sums["attr_" + k] / max(sums["n_attr_" + k], 1) for k in kind_ids},
        "mlm_attr_all_acc": sums["attr_all"] / n_attr,
        "mlm_attr_all_acc_shuffled": sums["attr_all_shuffled"] / n_attr,
        "n_tokens": int(sums["n"]),
        "n_attr_tokens": int(sums["n_attr"]),
    }


def _one_attribute_masked(
    tokens: torch.Tensor, is_attribute: torch.Tensor, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One copy of a caption per attribute token, with only that token masked -> inputs (K, L),
    labels (K, L), and the caption row of each copy (K,)."""
    row, col = is_attribute.nonzero(as_tuple=True)
    inputs = tokens[row].clone()
    copy = torch.arange(len(row), device=tokens.device)
    inputs[copy, col] = mask_id
    labels = torch.full_like(inputs, IGNORE)
    labels[copy, col] = tokens[row, col]
    return inputs, labels, row


def _all_attributes_masked(
    tokens: torch.Tensor, is_attribute: torch.Tensor, mask_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every attribute token of each caption masked at once -> inputs, labels (B, L), rows."""
    inputs = tokens.masked_fill(is_attribute, mask_id)
    labels = tokens.masked_fill(~is_attribute, IGNORE)
    return inputs, labels, torch.arange(len(tokens), device=tokens.device)


def evaluate_mlm(
    model: VisionLanguageModel,
    tokenizer: Any,
    sources: Sequence[Source],
    *,
    batch_size: int = 256,
    max_items: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> dict[str, float | int]:
    """`vlpt eval mlm`: embed the set, then `mlm_metrics`."""
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
    return mlm_metrics(model, tokenizer, data, batch_size=batch_size, precision=precision)


def evaluate_mim(
    model: VisionLanguageModel,
    sources: Sequence[Source],
    *,
    batch_size: int = 256,
    max_items: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    mask_ratio: float = 0.75,
    seed: int = 0,
    png_path: str | Path | None = None,
    png_items: int = 8,
    num_frames: int = DEFAULT_NUM_FRAMES,
) -> dict[str, float | int]:
    """Mean MAE loss over the set (masks from a fixed seed): `mim_loss`, `mim_items`. With
    `png_path`, a grid of the first `png_items` frames is written there."""
    if model.mae_decoder is None:
        raise ConfigError('this model has no MAE decoder to evaluate (no "mae_cfg" in its JSON).')
    generator = torch.Generator().manual_seed(seed)
    total, count, shown = 0.0, 0, None
    batches = model_eval_batches(model, sources, batch_size, max_items, num_frames)
    with evaluation_mode(model, device, precision):
        for batch in batches:
            images = batch["image"].to(device)
            out = masked_reconstruction(model, images, mask_ratio, generator)
            total += float(mae_loss(out["pred"], out["target"], out["mask"])) * len(images)
            count += len(images)
            if shown is None:
                shown = {
                    k: v[:png_items].float() if v.is_floating_point() else v[:png_items]
                    for k, v in out.items()
                }
    if png_path is not None and shown is not None:
        save_reconstruction_grid(model, shown, png_path)
    return {"mim_loss": total / max(count, 1), "mim_items": count}


def save_reconstruction_grid(
    model: VisionLanguageModel, shown: dict[str, torch.Tensor], path: str | Path
) -> Path:
    """A PNG of three rows: originals, masked inputs (hidden patches grey), reconstructions
    (predicted patches, un-normalised with each original patch's mean and variance as MAE's
    figures do, visible patches pasted from the original)."""
    from torchvision.utils import save_image

    frames, pred, mask = shown["frames"], shown["pred"], shown["mask"]
    patch = model.mae_decoder.cfg.patch_size if model.mae_decoder is not None else 8
    patches = patchify(frames, patch)  # (n, N, P)
    mean, std = patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    hidden = mask[..., None]
    masked = unpatchify(patches.masked_fill(hidden, 0.0), patch)
    recon = unpatchify(torch.where(hidden, pred.float() * std + mean, patches), patch)
    pixel_mean = torch.tensor(model.image_mean, device=frames.device)[:, None, None]
    pixel_std = torch.tensor(model.image_std, device=frames.device)[:, None, None]
    rows = [frames, masked, recon]
    grid = torch.cat([(r * pixel_std + pixel_mean).clamp(0, 1) for r in rows])
    # Masked patches: mid grey in pixel space rather than the dataset mean colour.
    n = len(frames)
    grey = unpatchify(hidden.expand_as(patches).float(), patch).bool()
    grid[n : 2 * n][grey] = 0.5
    grid = torch.nn.functional.interpolate(grid, scale_factor=2, mode="nearest")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid.cpu(), str(path), nrow=n, padding=2, pad_value=1.0)
    return path
