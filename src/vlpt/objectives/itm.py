"""Image-text matching with hard negatives drawn from the contrastive similarities (ALBEF/BLIP).

For a local batch of B pairs the fusion encoder scores 3B pairs: the B true pairs, each image
with a hard negative caption, and each caption with a hard negative image. A negative is drawn
with probability softmax(similarity) over the candidates of the whole global batch (every rank's
samples: features, tokens and visual tokens are all-gathered, the visual tokens with their
gradient), never the sample itself and never a sample whose caption is identical to its own (a
duplicate caption is not a wrong one). First token -> linear -> 2-way softmax, cross-entropy.

With a `WordSwap` each image is also scored against its own caption with one word swapped
(`loss.swap_negatives`' groups): the similarity-drawn negatives mostly differ in what the
contrastive features already see, while "a red star" against a red circle can only be
rejected by reading the shape in the visual tokens. Captions without a swappable word add no
such pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.objectives.gather import all_gather_with_grad, rank_and_world_size
from vlpt.objectives.word_swap import WordSwap


def sample_hard_negatives(
    similarity: torch.Tensor,
    positive: torch.Tensor,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One negative per row: similarity (B, N) scaled scores, positive (B,) the column of each
    row's own pair, exclude (B, N) bool columns that must not be drawn either -> (B,) indices,
    drawn with probability softmax(similarity) over the allowed columns. A row with no allowed
    column left (all excluded) falls back to any column but its positive."""
    rows = torch.arange(len(similarity), device=similarity.device)
    own = torch.zeros_like(similarity, dtype=torch.bool)
    own[rows, positive] = True
    banned = own | exclude if exclude is not None else own
    nothing_left = banned.all(dim=1, keepdim=True)
    banned = torch.where(nothing_left, own, banned)
    weights = similarity.float().masked_fill(banned, float("-inf")).softmax(dim=1)
    return torch.multinomial(weights.cpu(), 1, generator=generator).squeeze(1).to(positive.device)


def pad_tokens(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad (B, L) token ids with 0 to (B, length)."""
    return F.pad(tokens, (0, length - tokens.shape[1]))


class ImageTextMatching(nn.Module):
    """`loss/itm`: is this caption about this image? Positives and hard negatives, 1:2."""

    # features: hard negatives; text_states: the captions' text-tower states, which a fusion
    # encoder with `text_states` reads (computed with the features anyway, so reused here)
    needs = frozenset({"features", "visual_tokens", "text_states"})
    heads = ("fusion", "itm_head")

    def __init__(self, weight: float = 1.0, word_swap: WordSwap | None = None) -> None:
        super().__init__()
        self.weight, self.word_swap = weight, word_swap

    def forward(self, outputs: dict, model=None, batch: dict | None = None) -> dict:
        assert model is not None and batch is not None
        tokens, visual = batch["text"], outputs["visual_tokens"]  # (B, L), (B, N, W)
        rank, world = rank_and_world_size()
        states = outputs.get("text_states") if model.fusion.cfg.text_states else None
        if world > 1:  # captions of other ranks may be longer: one common length
            tokens = pad_tokens(tokens, model.context_length)
            if states is not None:
                states = F.pad(states, (0, 0, 0, model.context_length - states.shape[1]))
        all_tokens, all_visual = all_gather_with_grad(tokens), all_gather_with_grad(visual)
        negative_text, negative_image = self._negatives(outputs, tokens, all_tokens, rank)
        pair_tokens = torch.cat([tokens, all_tokens[negative_text], tokens])  # (3B, L)
        pair_visual = torch.cat([visual, visual, all_visual[negative_image]])  # (3B, N, W)
        pair_states = None
        if states is not None:  # (3B, L, W), in the order of pair_tokens
            pair_states = torch.cat([states, all_gather_with_grad(states)[negative_text], states])
        fused = model.fuse(pair_tokens, pair_visual, pair_states)
        logits = model.itm_logits(fused).float()  # (3B, 2)
        batch_size = len(tokens)
        labels = torch.zeros(3 * batch_size, dtype=torch.long, device=logits.device)
        labels[:batch_size] = 1
        metrics = {}
        if self.word_swap is not None:
            swapped, valid = self.word_swap(batch["text"])
            if valid.any():
                extra = model.itm_logits(model.fuse(swapped[valid], visual[valid])).float()
                metrics["itm/acc_swap"] = (extra.argmax(dim=1) == 0).float().mean().detach()
                logits = torch.cat([logits, extra])
                labels = torch.cat([labels, labels.new_zeros(len(extra))])
        loss = F.cross_entropy(logits, labels)
        hit = (logits.argmax(dim=1) == labels).float()
        return {
            **metrics,
            "loss/itm": self.weight * loss,
            "itm/acc": hit.mean().detach(),
            "itm/acc_negatives": hit[batch_size:].mean().detach(),
        }

    @torch.no_grad()
    def _negatives(
        self, outputs: dict, tokens: torch.Tensor, all_tokens: torch.Tensor, rank: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices into the global batch: a hard negative caption per local image and a hard
        negative image per local caption."""
        image, text = outputs["image_features"].float(), outputs["text_features"].float()
        all_image, all_text = all_gather_with_grad(image), all_gather_with_grad(text)  # (N, D)
        scale = outputs["logit_scale"].float()
        positive = torch.arange(len(tokens), device=tokens.device) + rank * len(tokens)
        same_caption = (tokens[:, None, :] == all_tokens[None, :, :]).all(dim=-1)  # (B, N)
        negative_text = sample_hard_negatives(scale * image @ all_text.T, positive, same_caption)
        negative_image = sample_hard_negatives(scale * text @ all_image.T, positive, same_caption)
        return negative_text, negative_image
