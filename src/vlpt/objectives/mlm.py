"""Masked language modelling of the caption, conditioned on the image (BERT's 80/10/10 masking).

15% of each caption's word tokens are selected (never the start, end or padding tokens); of
those, 80% become the mask token, 10% a random token, 10% stay as they are, and the fusion
encoder, reading the visual tokens, predicts the original token at every selected position.

Short captions: every caption with at least one word token gets at least one selected token
(a 5-token caption would otherwise often get none). A caption with no word token at all
(`[SOT, EOT]`) cannot be masked; it is left out of the loss and counted in the
`mlm/unmaskable` metric, and a batch of only such captions gives a zero loss, not an error.

Focus words (`objectives.mlm.focus_words`; "object-token masking", Bitton et al. 2021, Data
Efficient Masked Language Modeling for Vision and Language): the tokens of the listed words are
selected at `focus_ratio` instead of `mask_ratio`. Uniform 15% masking spends most targets on
words the rest of the caption gives away ("a", "the", "there is"); the words only the image
can fill in (colours, shapes, objects) are the ones that teach the fusion encoder, and through
it the image tower, to read the picture.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


def maskable_positions(tokens: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(B, L) -> (B, L) bool: the word tokens, strictly between the start and end tokens."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
    eot = (tokens == eot_id).int().argmax(dim=1, keepdim=True)
    return (positions > 0) & (positions < eot)


def mask_tokens(
    tokens: torch.Tensor,
    *,
    ratio: float,
    vocab_size: int,
    generator: torch.Generator | None = None,
    focus: torch.Tensor | None = None,
    focus_ratio: float = 0.5,
    random_pool: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of (B, L) token ids -> (inputs, labels), both (B, L) long.

    `labels` holds the original id at selected positions and -100 elsewhere. In `inputs` a
    selected position is `vocab_size` (the mask id) with p=0.8, a random word id with p=0.1,
    and unchanged with p=0.1. The end token is `vocab_size - 1`, the start `vocab_size - 2`.
    A token whose id is in `focus` (1-D ids) is selected with p=`focus_ratio`, others with
    p=`ratio`. The random ids are drawn from `random_pool` (1-D word ids, e.g. the MLM head's
    output vocabulary) when given, else from the whole vocabulary.
    """
    candidates = maskable_positions(tokens, eot_id=vocab_size - 1)
    draw = torch.rand(tokens.shape, generator=generator).to(tokens.device)
    threshold: torch.Tensor | float = ratio
    if focus is not None and focus.numel():
        is_focus = torch.isin(tokens, focus.to(tokens.device))
        threshold = torch.where(is_focus, focus_ratio, ratio)
    selected = (draw < threshold) & candidates
    # At least one selected token per maskable caption: its candidate with the smallest draw.
    missing = candidates.any(dim=1) & ~selected.any(dim=1)
    first = draw.masked_fill(~candidates, 2.0).argmin(dim=1)
    selected[missing, first[missing]] = True

    action = torch.rand(tokens.shape, generator=generator).to(tokens.device)
    if random_pool is None or not random_pool.numel():
        random_ids = torch.randint(1, vocab_size - 2, tokens.shape, generator=generator)
    else:
        pick = torch.randint(0, len(random_pool), tokens.shape, generator=generator)
        random_ids = random_pool.cpu()[pick]
    inputs = tokens.clone()
    inputs[selected & (action < 0.8)] = vocab_size
    swap = selected & (action >= 0.8) & (action < 0.9)
    inputs[swap] = random_ids.to(tokens.device)[swap]
    labels = tokens.masked_fill(~selected, IGNORE)
    return inputs, labels


class MaskedLanguageModeling(nn.Module):
    """`loss/mlm`: cross-entropy of the fusion encoder's predictions at the selected tokens."""

    needs = frozenset({"visual_tokens"})
    heads = ("fusion", "mlm_head")

    def __init__(
        self,
        weight: float = 1.0,
        mask_ratio: float = 0.15,
        focus: torch.Tensor | None = None,
        focus_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        self.weight, self.mask_ratio, self.focus_ratio = weight, mask_ratio, focus_ratio
        self.focus = focus  # (K,) token ids selected at focus_ratio, or None

    def forward(self, outputs: dict, model=None, batch: dict | None = None) -> dict:
        assert model is not None and batch is not None
        tokens = batch["text"]  # (B, L)
        head = model.fusion.mlm_head
        vocab = model.fusion.cfg.vocab_size
        inputs, labels = mask_tokens(
            tokens,
            ratio=self.mask_ratio,
            vocab_size=vocab,
            focus=self.focus,
            focus_ratio=self.focus_ratio,
            random_pool=replacement_pool(head.output_tokens, vocab),
        )
        hidden = model.fuse(inputs, outputs["visual_tokens"])  # (B, L, W)
        selected = labels != IGNORE
        # The vocabulary projection only at the selected positions, over the head's output
        # vocabulary (tokens outside it, index -1, are not trained).
        logits = model.mlm_logits(hidden[selected], full=False).float()  # (n, V')
        target = head.vocab_index(labels[selected])
        known = target >= 0
        n = known.sum()  # a tensor: no host sync on the hot path
        denominator = n.clamp(min=1).float()
        loss = F.cross_entropy(logits, target, ignore_index=-1, reduction="sum") / denominator
        correct = ((logits.argmax(dim=1) == target) & known).float().sum()
        unmaskable = ~maskable_positions(tokens, vocab - 1).any(dim=1)
        return {
            "loss/mlm": self.weight * loss,
            "mlm/acc": (correct / denominator).detach(),
            "mlm/masked_tokens": n.float().detach(),
            "mlm/unmaskable": unmaskable.float().sum().detach(),
        }


def replacement_pool(output_tokens: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """The ids BERT's 10% random replacements are drawn from: the word tokens of the MLM
    head's output vocabulary (a restricted head could never predict the others back), or None
    (the whole vocabulary) when the head is not restricted."""
    if not output_tokens.numel():
        return None
    return output_tokens[output_tokens < vocab_size - 2]  # not the start and end tokens
