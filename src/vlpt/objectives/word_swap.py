"""Word-swap hard negative captions (NegCLIP, Yuksekgonul et al. 2023).

    swap = WordSwap.from_words([["circle", "square", "star"], ["red", "blue"]], tokenizer)
    negatives, valid = swap(batch["text"])  # "a red circle ..." -> "a red star ..."

Contrastive training with random in-batch negatives learns a bag of the attributes that tell
most pairs apart: when colour and position already single out a scene among the batch, shape
costs nothing to ignore (on the synthetic world the image run's patch tokens give shape to a
linear probe at 0.48 and colour at 0.998). A negative caption that differs from the true one
in a single word of a group (one shape replaced by another) is wrong only in that word, so
the image must encode it for its caption to win.

The swap works on token ids: each word of a group must be one BPE token (with its
end-of-word mark, so "circle" anywhere in a caption is the same id). For each caption one
group token, drawn uniformly among those it has, is replaced by another member of its group,
drawn uniformly. A caption without a group word gets no negative (`valid` False).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlpt.config import ConfigError
from vlpt.models import Tokenizer


class WordSwap:
    """`(B, L) token ids -> (negatives (B, L), valid (B,) bool)`; see the module docstring."""

    def __init__(self, groups: Sequence[Sequence[int]], vocab_size: int) -> None:
        if any(len(g) < 2 for g in groups):
            raise ConfigError("every word-swap group needs at least two words to swap between")
        members = [t for g in groups for t in g]
        if len(set(members)) != len(members):
            raise ConfigError("a word appears in two word-swap groups (or twice in one)")
        size = max(len(g) for g in groups)
        self.members = torch.tensor([[*g, *[g[0]] * (size - len(g))] for g in groups])  # (G, M)
        self.sizes = torch.tensor([len(g) for g in groups])  # (G,)
        self.group_of = torch.full((vocab_size,), -1, dtype=torch.long)  # token -> group
        self.index_in_group = torch.zeros(vocab_size, dtype=torch.long)  # token -> column
        for k, group in enumerate(groups):
            for i, token in enumerate(group):
                self.group_of[token], self.index_in_group[token] = k, i

    @classmethod
    def from_words(cls, words: Sequence[Sequence[str]], tokenizer: Tokenizer) -> WordSwap:
        """Groups of words -> token-id groups; a word that is not one token is a ConfigError."""
        groups = []
        for group in words:
            ids = []
            for word in group:
                row = tokenizer([word])[0]
                pieces = row[1 : int((row == tokenizer.eot_id).int().argmax())]
                if len(pieces) != 1:
                    raise ConfigError(
                        f"loss.swap_negatives: '{word}' is {len(pieces)} tokens, not one; "
                        "only single-token words can be swapped (use another word or drop it)."
                    )
                ids.append(int(pieces[0]))
            groups.append(ids)
        return cls(groups, tokenizer.vocab_size)

    def __call__(
        self, tokens: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = tokens.device
        ids = tokens.cpu()
        group = self.group_of[ids.clamp(max=len(self.group_of) - 1)]  # (B, L), -1: not a word
        eligible = group >= 0
        valid = eligible.any(dim=1)  # (B,)
        draw = torch.rand(ids.shape, generator=generator).masked_fill(~eligible, -1.0)
        position = draw.argmax(dim=1)  # (B,) a uniformly drawn group word of each caption
        rows = torch.arange(len(ids))
        old = ids[rows, position]
        k = group[rows, position].clamp(min=0)
        size = self.sizes[k]
        # Another member of the group: shift the word's column by 1..size-1, uniformly.
        shift = 1 + (torch.rand(len(ids), generator=generator) * (size - 1)).long()
        new = self.members[k, (self.index_in_group[old] + shift) % size]
        negatives = ids.clone()
        negatives[rows[valid], position[valid]] = new[valid]
        return negatives.to(device), valid.to(device)
