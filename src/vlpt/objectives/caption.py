"""Captioning (CoCa): the caption decoder predicts every caption token from the tokens before it
and the visual tokens, teacher-forced.

It reads the visual tokens the model's forward already computed for the contrastive loss (one
vision-tower pass for both, as in CoCa), so captioning costs only the decoder. Images give
(B, 1 + N, W) visual tokens, clips their frames' tokens one after the other (B, T * (1 + N), W);
the decoder cross-attends to whichever it is given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Captioning(nn.Module):
    """`loss/caption`: next-token cross-entropy of the caption (padding ignored), and
    `caption/token_acc`, the fraction of caption tokens (end token included) predicted right."""

    needs = frozenset({"visual_tokens"})
    heads = ("decoder",)

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, outputs: dict, model=None, batch: dict | None = None) -> dict:
        assert model is not None and batch is not None
        decoder = model.caption_decoder()
        tokens = batch["text"]  # (B, L): [SOT, words, EOT, 0...]
        hidden = decoder.hidden_states(tokens, outputs["visual_tokens"])  # (B, L, W)
        # Position i predicts token i + 1; the vocabulary projection runs only where that
        # token is not padding (the positions `caption_loss` counts), and over the decoder's
        # output vocabulary only (a caption vocabulary makes the head ~0 cost instead of half
        # of the step; tokens outside it, index -1, are not trained).
        targets = tokens[:, 1:]
        real = targets != decoder.cfg.pad_id  # (B, L - 1)
        logits = decoder.vocab_logits(hidden[:, :-1][real])  # (n, V')
        target = decoder.vocab_index(targets[real])
        # Cross-entropy in the autocast dtype (bf16), not fp32 as the contrastive losses: an fp32
        # copy of the (n, 49408) logits and its log-softmax doubled the cost of the vocabulary
        # head, half of a caption step on CPU (docs/architecture.md). The
        # gradient agrees with fp32 to bf16 precision; the logged loss is within ~1%.
        loss = F.cross_entropy(logits, target, ignore_index=-1).float()
        with torch.no_grad():  # amax, not argmax: argmax over bf16 rows is ~20x slower on CPU
            known = target >= 0  # the end token always is: no batch is without targets
            target_logit = logits.gather(1, target.clamp(min=0)[:, None]).squeeze(1)
            right = (target_logit >= logits.amax(dim=-1)) & known
            accuracy = right.sum() / known.sum().clamp(min=1)
        return {"loss/caption": self.weight * loss, "caption/token_acc": accuracy.detach()}
