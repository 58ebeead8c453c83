"""Contrastive image-text objectives: CLIP's InfoNCE and SigLIP's pairwise sigmoid loss.

Both read the model's outputs (`image_features`, `text_features` (B, D), L2-normalised;
`logit_scale`, already exponentiated; `logit_bias`) and return `loss/contrastive` (weighted)
plus detached metrics. Negatives come from every rank: features are all-gathered with their
gradient, so under DDP (which averages gradients over ranks) training is equivalent to one
process on the global batch.

Logits are computed in fp32 with autocast off: in bf16 the similarity scores of a large batch
keep ~3 significant digits, too few for the softmax/sigmoid to rank near-identical pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.objectives.gather import all_gather_with_grad, rank_and_world_size
from vlpt.objectives.word_swap import WordSwap


def _fp32(outputs: dict[str, torch.Tensor], *keys: str) -> tuple[torch.Tensor, ...]:
    return tuple(outputs[k].float() for k in keys)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=1) == labels).float().mean().detach()


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (Radford et al. 2021), the same loss as open_clip's `ClipLoss`.

    `local_loss=False`: every rank builds the full (N, N) logit matrix of the global batch
    (N = world * B) and computes the global loss, as open_clip with `gather_with_grad`.
    `local_loss=True`: each rank scores only its B rows against all N columns, (B, N) logits,
    labels offset by rank; the average over ranks is the global loss, at 1/world the memory.
    """

    needs: frozenset[str] = frozenset({"features"})
    heads: tuple[str, ...] = ()

    def __init__(
        self,
        weight: float = 1.0,
        local_loss: bool = False,
        reversed_negatives: bool = False,
        word_swap: WordSwap | None = None,
    ) -> None:
        super().__init__()
        self.weight = weight
        self.local_loss = local_loss
        # Word-swap hard negatives (NegCLIP): each caption with one attribute word swapped
        # joins the image->text candidates (see `vlpt.objectives.word_swap`).
        self.word_swap = word_swap
        # Time-reversal hard negatives: every clip played backwards joins the text->clip
        # candidates, so a caption must prefer its clip over the same frames in reverse order.
        # Random in-batch negatives almost never differ from a positive only in direction, so
        # without these the temporal module gets no reason to learn the order of frames.
        self.reversed_negatives = reversed_negatives
        if reversed_negatives:
            self.needs = frozenset({"features", "reversed_features"})
        self._labels: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def labels(self, device: torch.device, size: int, offset: int) -> torch.Tensor:
        """Index of the positive column of each row: `offset + arange(size)`, cached."""
        key = (device, size, offset)
        if key not in self._labels:
            self._labels[key] = torch.arange(size, device=device) + offset
        return self._labels[key]

    def forward(
        self, outputs: dict[str, torch.Tensor], model=None, batch=None
    ) -> dict[str, torch.Tensor]:
        swapped = None
        if self.word_swap is not None:
            assert model is not None and batch is not None
            negatives, valid = self.word_swap(batch["text"])
            swapped = (model.encode_text(negatives), valid)  # (B, D), (B,)
        with torch.autocast(outputs["image_features"].device.type, enabled=False):
            image, text, scale = _fp32(outputs, "image_features", "text_features", "logit_scale")
            rank, _ = rank_and_world_size()
            all_image, all_text = all_gather_with_grad(image), all_gather_with_grad(text)  # (N, D)
            if self.local_loss:
                logits_i2t = scale * image @ all_text.T  # (B, N)
                logits_t2i = scale * text @ all_image.T  # (B, N)
                labels = self.labels(image.device, image.shape[0], rank * image.shape[0])
            else:
                logits_i2t = scale * all_image @ all_text.T  # (N, N)
                logits_t2i = logits_i2t.T
                labels = self.labels(image.device, all_image.shape[0], 0)
            metrics = {}
            if "reversed_features" in outputs:  # clips: their reversals as extra t2i negatives
                reversed_ = all_gather_with_grad(outputs["reversed_features"].float())
                query = text if self.local_loss else all_text
                logits_t2r = scale * query @ reversed_.T  # (B or N, N)
                logits_t2i = torch.cat([logits_t2i, logits_t2r], dim=1)
                diagonal = logits_t2r.gather(1, labels[:, None]).squeeze(1)
                positive = logits_t2i.gather(1, labels[:, None]).squeeze(1)
                metrics["contrastive/acc_order"] = (positive > diagonal).float().mean().detach()
            if swapped is not None:
                query = image if self.local_loss else all_image
                logits_i2t, metrics["contrastive/acc_swap"] = _with_swapped_negatives(
                    logits_i2t, query, scale, swapped, labels
                )
            loss = (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2
        return {
            **metrics,
            "loss/contrastive": self.weight * loss,
            "contrastive/acc_i2t": _accuracy(logits_i2t, labels),
            "contrastive/acc_t2i": _accuracy(logits_t2i, labels),
            "contrastive/logit_scale": scale.detach(),
        }


def _with_swapped_negatives(
    logits_i2t: torch.Tensor,
    image: torch.Tensor,
    scale: torch.Tensor,
    swapped: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, N) image->text logits -> (R, 2N) with every rank's swapped captions as extra
    columns (captions without a swappable word masked out), and the share of images whose
    caption beats its own swapped copy."""
    features, valid = swapped
    negatives = all_gather_with_grad(features.float())  # (N, D)
    valid_all = all_gather_with_grad(valid.float()) > 0  # (N,)
    logits_swap = (scale * image @ negatives.T).masked_fill(~valid_all, float("-inf"))
    own = logits_swap.gather(1, labels[:, None]).squeeze(1)  # each image vs its swapped caption
    positive = logits_i2t.gather(1, labels[:, None]).squeeze(1)
    has = valid_all[labels]
    beats = ((positive > own) & has).float().sum() / has.float().sum().clamp(min=1)
    return torch.cat([logits_i2t, logits_swap], dim=1), beats.detach()


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (Zhai et al. 2023), normalised as open_clip's `SigLipLoss`.

    Each rank scores its B images against the texts of all ranks, (B, N) logits, with label +1
    on its own pairs and -1 elsewhere; the sum is divided by B. The average over ranks is then
    the single-process loss of the global batch. This all-gathers the texts (N, D) instead of
    passing them round a ring as open_clip does: same result, simpler, and the (B, N) logits
    are no larger than CLIP's local loss.
    """

    needs: frozenset[str] = frozenset({"features"})
    heads: tuple[str, ...] = ()

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight
        self._signs: dict[tuple[torch.device, int, int, int], torch.Tensor] = {}

    def signs(self, device: torch.device, rows: int, cols: int, offset: int) -> torch.Tensor:
        """(rows, cols) of -1 with +1 at `[i, offset + i]`, cached."""
        key = (device, rows, cols, offset)
        if key not in self._signs:
            signs = -torch.ones(rows, cols, device=device)
            signs.diagonal(offset).fill_(1.0)
            self._signs[key] = signs
        return self._signs[key]

    def forward(
        self, outputs: dict[str, torch.Tensor], model=None, batch=None
    ) -> dict[str, torch.Tensor]:
        with torch.autocast(outputs["image_features"].device.type, enabled=False):
            image, text = _fp32(outputs, "image_features", "text_features")  # (B, D)
            scale, bias = _fp32(outputs, "logit_scale", "logit_bias")  # ()
            rank, _ = rank_and_world_size()
            all_text = all_gather_with_grad(text)  # (N, D)
            logits = scale * image @ all_text.T + bias  # (B, N)
            batch = image.shape[0]
            signs = self.signs(image.device, batch, all_text.shape[0], rank * batch)
            loss = -F.logsigmoid(signs * logits).sum() / batch
        labels = torch.arange(batch, device=image.device) + rank * batch
        return {
            "loss/contrastive": self.weight * loss,
            "contrastive/acc_i2t": _accuracy(logits, labels),
            "contrastive/logit_scale": scale.detach(),
            "contrastive/logit_bias": bias.detach(),
        }
