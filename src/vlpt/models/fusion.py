"""Fusion encoder: caption tokens attend to each other and, through cross-attention, to the
visual tokens of their image or clip (ALBEF / BLIP style). It carries the two heads that need
both modalities at once: masked language modelling and image-text matching.

    fusion = FusionEncoder({"width": 192, "layers": 2, "heads": 3, "visual_width": 192})
    hidden = fusion(tokens, visual_tokens, model.text.token_embedding)   # (B, L, W)
    hidden = model.fuse(tokens, visual_tokens)   # the same, text states computed if configured
    logits = fusion.mlm_head(hidden[selected], model.text.token_embedding)  # (n, vocab)
    match = fusion.itm_head(hidden[:, 0])                                  # (B, 2)

Token embeddings are the text tower's (passed in, not owned: one embedding table, and a
checkpoint never holds two names for the same tensor, which safetensors refuses). With
`text_states` (ALBEF's layout) the blocks read the text tower's output states instead, which the
model computes from the same embeddings (mask vector included). The MLM head's
output projection is tied to it, as in BERT. Tokens use the project tokenizer's layout,
`[SOT, w1, ..., wn, EOT, 0, ...]`; `MASK_ID` (= vocab size, one past the BPE table) marks a
masked position and is embedded by the MLM head's learned mask vector.

Self-attention is bidirectional (MLM needs the words on both sides), with padding after the
end token masked out; its blocks are written here (pre-LN, SDPA) rather than taken from
open_clip, whose `ResidualAttentionBlock` takes no key-padding mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.models.lengths import LENGTH_GROUPS, by_length, caption_lengths
from vlpt.models.output_vocabulary import OutputVocabulary


@dataclass(frozen=True)
class FusionConfig:
    """Architecture of a `FusionEncoder`; a registry JSON carries it as `"fusion_cfg"`."""

    width: int = 192
    """Residual width; must equal the text tower's width (the token embeddings are shared)."""
    layers: int = 2
    """Blocks of (bidirectional self-attention, cross-attention to the image, MLP)."""
    heads: int = 3
    """Attention heads; `width` must be divisible by it."""
    visual_width: int = 192
    """Width of the visual tokens (the vision tower's width)."""
    context_length: int = 40
    """Longest token sequence (size of the position table)."""
    vocab_size: int = 49408
    """BPE vocabulary size; id `vocab_size` is the mask token, `vocab_size - 1` the end token."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLP as a multiple of `width`."""
    text_states: bool = False
    """Read the text tower's per-token output states (ALBEF: the fusion layers sit on top of the
    text encoder) instead of bare token embeddings with the fusion encoder's own positions. The
    words then arrive already read in context ("red" knows it belongs to "circle"), and the text
    tower learns from MLM and ITM too; it costs a text-tower pass over the masked captions."""
    summary_first: bool = False
    """With `text_states`: the first token (the one the ITM head reads) starts as the end
    token's state, the caption's summary that CLIP pools, instead of the start token's. A causal
    text tower leaves the start token knowing nothing of the caption, so the ITM head had to
    wait for the fusion self-attention to gather it; BERT's [CLS] carries the sentence in ALBEF."""

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> FusionConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(
                f"fusion_cfg has unknown key(s) {', '.join(unknown)}; "
                f"the known keys are {', '.join(sorted(known))}."
            )
        return cls(**cfg)

    def __post_init__(self) -> None:
        if self.summary_first and not self.text_states:
            raise ValueError("fusion_cfg.summary_first needs fusion_cfg.text_states: true.")
        if self.width % self.heads:
            raise ValueError(
                f"fusion_cfg.width ({self.width}) must be divisible by heads ({self.heads})."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Attention(nn.Module):
    """Multi-head attention of queries `x` over `memory` (self-attention when memory is x)."""

    def __init__(self, width: int, memory_width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(memory_width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, L, W), memory (B, N, Wm), mask (B, 1, 1, N) True = attend -> (B, L, W)."""
        b, n_q, w = x.shape
        q = self.q(x).view(b, n_q, self.heads, -1).transpose(1, 2)  # (B, H, L, Dh)
        k, v = self.kv(memory).view(b, memory.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, n_q, w))


class FusionBlock(nn.Module):
    """Pre-LN: bidirectional self-attention, cross-attention to the visual tokens, MLP."""

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.self_attn = Attention(cfg.width, cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.cross_attn = Attention(cfg.width, cfg.width, cfg.heads)
        self.ln_3 = nn.LayerNorm(cfg.width)
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, hidden), nn.GELU(), nn.Linear(hidden, cfg.width)
        )

    def forward(self, x: torch.Tensor, visual: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.self_attn(h, h, mask)
        x = x + self.cross_attn(self.ln_2(x), visual)
        return x + self.mlp(self.ln_3(x))


class MLMHead(OutputVocabulary):
    """BERT's prediction head: dense + GELU + LayerNorm, then the (tied) token embedding and a
    bias. It also owns the learned embedding of the mask token (only MLM ever uses it).

    With an output vocabulary (`set_output_vocabulary`, e.g. the training captions' tokens:
    `objectives.mlm.vocabulary=train`) `vocab_logits` covers only those tokens: at 49,408 the
    projection and its gradient were ~0.5 s of a 3.3 s masked step on 2 CPU cores."""

    def __init__(self, width: int, vocab_size: int) -> None:
        super().__init__(vocab_size)
        self.dense = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.mask_embedding = nn.Parameter(torch.randn(width) * 0.02)

    def vocab_logits(self, hidden: torch.Tensor, token_embedding: nn.Embedding) -> torch.Tensor:
        """hidden (n, W) at the masked positions only -> (n, V') logits over the output
        vocabulary (its columns: `vocab_index`)."""
        h = self.ln(F.gelu(self.dense(hidden)))
        weight, bias = self.restrict(token_embedding.weight), self.restrict(self.bias)
        return h @ weight.T.to(h.dtype) + bias.to(h.dtype)

    def forward(self, hidden: torch.Tensor, token_embedding: nn.Embedding) -> torch.Tensor:
        """hidden (n, W) -> (n, vocab) logits over the whole vocabulary (-inf outside the
        output vocabulary)."""
        return self.full_logits(self.vocab_logits(hidden, token_embedding))


class FusionEncoder(nn.Module):
    """Caption tokens (B, L) + visual tokens (B, N, visual_width) -> fused states (B, L, width)."""

    def __init__(self, cfg: FusionConfig | Mapping[str, Any]) -> None:
        super().__init__()
        cfg = cfg if isinstance(cfg, FusionConfig) else FusionConfig.from_dict(cfg)
        self.cfg = cfg
        self.mask_id = cfg.vocab_size
        self.eot_id = cfg.vocab_size - 1
        # With text states the text tower has added its positions already.
        self.positional_embedding: nn.Parameter | None = None
        if not cfg.text_states:
            self.positional_embedding = nn.Parameter(
                torch.randn(cfg.context_length, cfg.width) * 0.01
            )
        self.ln_visual = nn.LayerNorm(cfg.visual_width)
        self.visual_proj = nn.Linear(cfg.visual_width, cfg.width)
        self.blocks = nn.ModuleList(FusionBlock(cfg) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.mlm_head = MLMHead(cfg.width, cfg.vocab_size)
        self.itm_head = nn.Linear(cfg.width, 2)
        self.length_groups = LENGTH_GROUPS  # `VisionLanguageModel.set_length_groups`

    def padding_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, 1, 1, L) bool, True up to and including the end token. The end token
        is the largest id and is never masked, so this works on masked inputs too."""
        length = tokens.shape[1]
        eot = (tokens == self.eot_id).int().argmax(dim=1, keepdim=True)  # (B, 1)
        return (torch.arange(length, device=tokens.device)[None] <= eot)[:, None, None]

    def _summary_first(self, tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """(B, L, W) states with the first replaced by the end token's state."""
        eot = (tokens == self.eot_id).int().argmax(dim=1)  # (B,)
        summary = states[torch.arange(len(tokens), device=tokens.device), eot]
        return torch.cat([summary[:, None], states[:, 1:]], dim=1)

    def embed_tokens(self, tokens: torch.Tensor, token_embedding: nn.Embedding) -> torch.Tensor:
        """(B, L) ids, MASK_ID allowed -> (B, L, W) token embeddings (no positions)."""
        is_mask = tokens == self.mask_id
        x = token_embedding(tokens.masked_fill(is_mask, 0))
        return torch.where(is_mask[..., None], self.mlm_head.mask_embedding.to(x.dtype), x)

    def forward(
        self,
        tokens: torch.Tensor,
        visual_tokens: torch.Tensor,
        token_embedding: nn.Embedding,
        text_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`text_states` (B, L, W): the text tower's states of `tokens`, required when
        `cfg.text_states` (the model computes them: `VisionLanguageModel.fuse`)."""
        if self.cfg.text_states:
            if text_states is None:
                raise ValueError("this fusion encoder reads text states (fusion_cfg.text_states)")
            x = self._summary_first(tokens, text_states) if self.cfg.summary_first else text_states
        else:
            assert self.positional_embedding is not None
            x = self.embed_tokens(tokens, token_embedding)  # (B, L, W)
            x = x + self.positional_embedding[: tokens.shape[1]].to(x.dtype)
        visual = self.visual_proj(self.ln_visual(visual_tokens))  # (B, N, W)
        mask = self.padding_mask(tokens)

        def blocks(rows: torch.Tensor, cut: int) -> torch.Tensor:
            h, memory, keys = x[rows, :cut], visual[rows], mask[rows, ..., :cut]
            for block in self.blocks:
                h = block(h, memory, keys)
            return h

        # Rows in groups of similar caption length: padding queries are not computed at all.
        lengths = caption_lengths(tokens, self.eot_id)
        return self.ln_final(by_length(blocks, lengths, self.length_groups, tokens.shape[1]))
