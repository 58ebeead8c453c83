"""Heads that predict tokens over a subset of the vocabulary: the caption decoder, the MLM head.

A head's *output vocabulary* is the buffer `output_tokens` (sorted token ids; empty = the whole
vocabulary), saved with the weights. Restricted, the head's training logits cover only those
tokens (`restrict` its projection rows, `vocab_index` its targets), which makes the vocabulary
projection, at 49,408 tokens most of a tiny model's head cost on CPU, almost free; `full_logits`
gives every other token -inf, so evaluation and generation keep working on token ids. The
subset is data, not architecture: a state dict with another subset, or none (checkpoints from
before it existed: the whole vocabulary), loads into any head.

    head.set_output_vocabulary(caption_vocabulary(...).token_ids)
    logits = hidden @ head.restrict(weight).T               # (n, V')
    loss = F.cross_entropy(logits, head.vocab_index(targets), ignore_index=-1)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class OutputVocabulary(nn.Module):
    """Base class: owns `output_tokens` and the mapping between token ids and logit columns."""

    output_tokens: torch.Tensor

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.full_vocab_size = vocab_size
        self.register_buffer("output_tokens", torch.empty(0, dtype=torch.long))

    @property
    def restricted(self) -> bool:
        """Whether the head predicts a subset of the vocabulary (`output_tokens`)."""
        return self.output_tokens.numel() > 0

    @torch.no_grad()
    def set_output_vocabulary(self, token_ids: Sequence[int] | torch.Tensor | None) -> None:
        """Predict only `token_ids`, or, with None, the whole vocabulary again. The weights are
        unchanged: tied rows keep their embeddings."""
        if token_ids is None:
            ids = torch.empty(0, dtype=torch.long)
        else:
            ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().unique()  # sorted
            if not len(ids):
                raise ValueError("an output vocabulary needs at least one token.")
            if int(ids[0]) < 0 or int(ids[-1]) >= self.full_vocab_size:
                raise ValueError(
                    f"output vocabulary token ids must lie in [0, {self.full_vocab_size}), "
                    f"got {int(ids[0])}..{int(ids[-1])}."
                )
        self.output_tokens = ids.to(self.output_tokens.device)

    def restrict(self, rows: torch.Tensor) -> torch.Tensor:
        """A per-token tensor over the whole vocabulary (V, ...) -> its output-vocabulary rows."""
        return rows.index_select(0, self.output_tokens) if self.restricted else rows

    def vocab_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> their columns in the restricted logits; -1 for tokens outside the
        output vocabulary (the ignore index of the losses)."""
        if not self.restricted:
            return token_ids
        vocab = self.output_tokens
        index = torch.searchsorted(vocab, token_ids).clamp(max=len(vocab) - 1)
        return torch.where(vocab[index] == token_ids, index, -1)

    def full_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Restricted logits (..., V') -> logits over the whole vocabulary (..., V), -inf for
        the tokens outside the output vocabulary."""
        if not self.restricted:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.full_vocab_size), float("-inf"))
        return full.index_copy_(-1, self.output_tokens, logits)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # The output vocabulary is data, not architecture: take the saved one's size (none
        # saved: the whole vocabulary).
        key = prefix + "output_tokens"
        saved = state_dict.setdefault(key, torch.empty(0, dtype=torch.long))
        self.output_tokens = torch.empty_like(saved, device=self.output_tokens.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
