"""Caption decoder: a causal Transformer that reads the visual tokens through cross-attention.

The captioning head of DESIGN.md (CoCa-style). It is written here rather than taken from
open_clip because open_clip 3.3's CoCa never initialises its decoder's `text_projection` and its
`generate()` no longer imports with current transformers.

    decoder = CaptionDecoder({"width": 192, "layers": 4, "heads": 3, "visual_width": 192})
    logits = decoder(tokens, visual_tokens)        # teacher forcing: (B, L, V)
    loss = caption_loss(logits, tokens)            # next-token cross-entropy, padding ignored

Generation (greedy, beam, sampling) lives in `vlpt.models.generation`; it drives the decoder
through `init_cache` / `step`, which keep the self-attention keys/values of the tokens decoded
so far and compute the cross-attention keys/values of the visual tokens once per sequence.

Tokens follow the project tokenizer's layout: `[SOT, w1, ..., wn, EOT, 0, 0, ...]`, padded with 0.

A decoder may predict only a subset of the tokenizer's vocabulary, its *output vocabulary*
(`set_output_vocabulary`, from `vlpt.models.output_vocabulary`: e.g. the tokens of the training
captions, as captioning models built on COCO use a vocabulary of the training split). The logits
then cover that subset only (`vocab_logits`, `vocab_index`: what training uses), and `forward` /
`step` give every other token -inf, so generation works on token ids as before.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from vlpt.models.output_vocabulary import OutputVocabulary


@dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a `CaptionDecoder`; a registry JSON carries it as `"decoder_cfg"`."""

    width: int = 192
    """Width of the decoder's residual stream."""
    layers: int = 4
    """Number of blocks (causal self-attention, cross-attention, MLP)."""
    heads: int = 3
    """Attention heads; `width` must be divisible by it."""
    context_length: int = 40
    """Longest token sequence, start and end tokens included (size of the position table)."""
    vocab_size: int = 49408
    """Vocabulary size: open_clip's BPE tokenizer has 49408 tokens."""
    visual_width: int = 192
    """Width of the visual tokens the decoder attends to (the vision tower's width)."""
    mlp_ratio: float = 4.0
    """Hidden width of the MLP as a multiple of `width`."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection (GPT-2, nanoGPT): at vocabulary
    49408 an untied projection would be the largest matrix of a small decoder."""
    pad_id: int = 0
    """Token id of padding (the project tokenizer pads with 0); ignored by `caption_loss`."""
    mid_norm: int = 0
    """A LayerNorm after this many blocks (0 = none). CoCa's layout: the lower blocks are a text
    tower, which ends in its final norm, and the blocks above read its normalised states; a
    decoder started from a text tower and a fusion encoder (`finetune.decoder_init: fusion`)
    puts the tower's final norm here."""

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> DecoderConfig:
        """Build from a dict such as a registry JSON's `"decoder_cfg"`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(
                f"decoder_cfg has unknown key(s) {', '.join(unknown)}; "
                f"the known keys are {', '.join(sorted(known))}."
            )
        return cls(**cfg)

    def __post_init__(self) -> None:
        for name in ("width", "layers", "heads", "context_length", "vocab_size", "visual_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"decoder_cfg.{name} must be >= 1, got {getattr(self, name)}.")
        if self.width % self.heads:
            raise ValueError(
                f"decoder_cfg.width ({self.width}) must be divisible by heads ({self.heads})."
            )
        if not 0 <= self.mid_norm < self.layers:
            raise ValueError(
                f"decoder_cfg.mid_norm ({self.mid_norm}) must lie in [0, layers) = "
                f"[0, {self.layers}): the number of blocks below the middle norm."
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class KVCache:
    """Keys and values of one batch of sequences being generated.

    Self-attention keys/values are written into preallocated buffers, `length` positions filled;
    cross-attention keys/values of the visual tokens are computed once and reused at every step.
    Each tensor is (B, heads, positions, head_width), one per decoder block.
    """

    def __init__(
        self,
        self_keys: list[torch.Tensor],
        self_values: list[torch.Tensor],
        cross_keys: list[torch.Tensor],
        cross_values: list[torch.Tensor],
    ) -> None:
        self.self_keys, self.self_values = self_keys, self_values
        self.cross_keys, self.cross_values = cross_keys, cross_values
        self.length = 0

    @property
    def max_length(self) -> int:
        return self.self_keys[0].shape[2]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` (B',) of the batch, in that order (beam search picks its parents)."""
        for tensors in (self.self_keys, self.self_values, self.cross_keys, self.cross_values):
            tensors[:] = [t.index_select(0, index) for t in tensors]


class SelfAttention(nn.Module):
    """Causal multi-head self-attention, optionally reading and extending a KV cache."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(
        self,
        x: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """x (B, T, W) at positions [start, start + T) -> (B, T, W).

        With `cache` (key and value buffers (B, H, max_length, Dh)), the new keys/values are
        written at [start, start + T) and the queries attend to every position before them.
        """
        b, t, w = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            key_buffer, value_buffer = cache
            key_buffer[:, :, start : start + t] = k
            value_buffer[:, :, start : start + t] = v
            k, v = key_buffer[:, :, : start + t], value_buffer[:, :, : start + t]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=_chunk_mask(t, start, x.device))
        return self.out(y.transpose(1, 2).reshape(b, t, w))


def _chunk_mask(t: int, start: int, device: torch.device) -> torch.Tensor | None:
    """Causal mask of T queries at positions [start, start + T) over keys [0, start + T).

    None for a single query: it may attend to every cached position.
    """
    if t == 1:
        return None
    keys = torch.arange(start + t, device=device)
    queries = torch.arange(start, start + t, device=device)
    return keys[None, :] <= queries[:, None]  # (T, start + T), True = attend


class CrossAttention(nn.Module):
    """Multi-head attention from the text positions to the (projected) visual tokens."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, N, W) -> keys, values (B, H, N, Dh); computed once per sequence."""
        b, n, w = memory.shape
        k, v = self.kv(memory).view(b, n, 2, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q = self.q(x).view(b, t, self.heads, w // self.heads).transpose(1, 2)  # (B, H, T, Dh)
        y = F.scaled_dot_product_attention(q, keys, values)
        return self.out(y.transpose(1, 2).reshape(b, t, w))


class DecoderBlock(nn.Module):
    """Pre-LN block: causal self-attention, cross-attention to the image, MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.self_attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.cross_attn = CrossAttention(width, heads)
        self.ln_3 = nn.LayerNorm(width)
        self.mlp_fc = nn.Linear(width, hidden)
        self.mlp_proj = nn.Linear(hidden, width)

    def forward(
        self,
        x: torch.Tensor,
        cross_kv: tuple[torch.Tensor, torch.Tensor],
        cache: tuple[torch.Tensor, torch.Tensor] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.ln_1(x), cache, start)
        x = x + self.cross_attn(self.ln_2(x), *cross_kv)
        return x + self.mlp_proj(F.gelu(self.mlp_fc(self.ln_3(x))))


class CaptionDecoder(OutputVocabulary):
    """Token + learned position embeddings, `layers` decoder blocks (with a LayerNorm after the
    first `mid_norm` of them, if set), final LN, vocabulary logits.

    Visual tokens (B, N, visual_width) — e.g. the vision tower's patch tokens — are layer-normed
    and projected to the decoder width once, then every block cross-attends to them.
    """

    def __init__(self, cfg: DecoderConfig | Mapping[str, Any] | None = None) -> None:
        if cfg is None:
            cfg = DecoderConfig()
        elif not isinstance(cfg, DecoderConfig):
            cfg = DecoderConfig.from_dict(cfg)
        super().__init__(cfg.vocab_size)
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.ln_visual = nn.LayerNorm(cfg.visual_width)
        self.visual_proj = nn.Linear(cfg.visual_width, cfg.width)
        self.blocks = nn.ModuleList(
            DecoderBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers)
        )
        self.ln_mid = nn.LayerNorm(cfg.width) if cfg.mid_norm else None
        self.ln_final = nn.LayerNorm(cfg.width)
        # Tied: the logits read the token table itself, so the state dict names that tensor
        # once (safetensors refuses two names for one tensor).
        self.output_projection: nn.Linear | None = None
        if not cfg.tie_embeddings:
            self.output_projection = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.init_weights()

    @property
    def context_length(self) -> int:
        return self.cfg.context_length

    @property
    def output_weight(self) -> torch.Tensor:
        """(V, width) projection onto the output vocabulary: rows of the token table when tied."""
        weight = (
            self.token_embedding.weight
            if self.output_projection is None
            else self.output_projection.weight
        )
        return self.restrict(weight)

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., width) -> logits over the output vocabulary (..., V')."""
        return F.linear(self.ln_final(hidden), self.output_weight)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., width) -> logits over the whole vocabulary (..., vocab_size);
        tokens outside the output vocabulary get -inf."""
        return self.full_logits(self.vocab_logits(hidden))

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 init: normal(0.02) everywhere, residual output layers scaled by 1/sqrt(2 layers).

        Every parameter is set here, the output projection included (open_clip's CoCa leaves
        its `text_projection` as uninitialised memory).
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.positional_embedding, std=0.01)
        residual_std = 0.02 / math.sqrt(2 * self.cfg.layers)
        for block in self._blocks():
            for layer in (block.self_attn.out, block.cross_attn.out, block.mlp_proj):
                nn.init.normal_(layer.weight, std=residual_std)

    def _blocks(self) -> list[DecoderBlock]:
        # Iterating an nn.ModuleList yields plain Modules as far as a type checker knows.
        return cast(list[DecoderBlock], list(self.blocks))

    def encode_visual(self, visual_tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, visual_width) -> (B, N, width), the memory the blocks cross-attend to."""
        return self.visual_proj(self.ln_visual(visual_tokens))

    def forward(
        self, tokens: torch.Tensor, visual_tokens: torch.Tensor, last_only: bool = False
    ) -> torch.Tensor:
        """Teacher forcing: tokens (B, L), visual tokens (B, N, visual_width) -> logits (B, L, V).

        Position i predicts token i + 1. `last_only` returns logits (B, 1, V) of the last position
        (what uncached generation needs: the vocabulary projection is a large part of a step).
        """
        x = self.hidden_states(tokens, visual_tokens)
        if last_only:
            x = x[:, -1:]
        return self.logits(x)

    def hidden_states(self, tokens: torch.Tensor, visual_tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing up to the vocabulary projection: -> (B, L, width), before `ln_final`.

        `logits(hidden[selected])` then projects only the positions that have a target (training
        skips the padding: the 49k-wide projection is most of a small decoder's work)."""
        self._check_length(tokens.shape[1])
        memory = self.encode_visual(visual_tokens)
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for i, block in enumerate(self._blocks()):
            x = self._mid(i, block(x, block.cross_attn.keys_values(memory)))
        return x

    def _mid(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """The states after block i, through the middle norm when it sits there."""
        return self.ln_mid(x) if self.ln_mid is not None and i + 1 == self.cfg.mid_norm else x

    @torch.no_grad()
    def init_cache(self, visual_tokens: torch.Tensor, max_length: int | None = None) -> KVCache:
        """An empty cache for sequences of at most `max_length` tokens (default context_length).

        The cross-attention keys/values of `visual_tokens` (B, N, visual_width) are computed here,
        once for the whole sequence.
        """
        max_length = self.context_length if max_length is None else max_length
        self._check_length(max_length)
        memory = self.encode_visual(visual_tokens)
        cross = [block.cross_attn.keys_values(memory) for block in self._blocks()]
        k0 = cross[0][0]
        shape = (k0.shape[0], self.cfg.heads, max_length, self.cfg.width // self.cfg.heads)
        self_keys = [k0.new_empty(shape) for _ in self.blocks]
        self_values = [k0.new_empty(shape) for _ in self.blocks]
        return KVCache(self_keys, self_values, [k for k, _ in cross], [v for _, v in cross])

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed the next tokens (B, T) after the `cache.length` cached ones -> logits (B, T, V).

        Usually T = 1; T > 1 pre-fills a prompt. The cache grows by T positions.
        """
        start, t = cache.length, tokens.shape[1]
        if start + t > cache.max_length:
            raise ValueError(
                f"the cache holds {cache.max_length} positions; cannot add {t} after {start}."
            )
        x = self.token_embedding(tokens) + self.positional_embedding[start : start + t]
        for i, block in enumerate(self.blocks):
            self_kv = (cache.self_keys[i], cache.self_values[i])
            x = self._mid(i, block(x, (cache.cross_keys[i], cache.cross_values[i]), self_kv, start))
        cache.length = start + t
        return self.logits(x)

    def _check_length(self, length: int) -> None:
        if length > self.context_length:
            raise ValueError(
                f"{length} tokens do not fit the decoder's context_length "
                f"({self.context_length}); shorten the captions or raise context_length."
            )


def caption_loss(logits: torch.Tensor, tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, L, V) at position i against tokens (B, L) at i + 1.

    Padding targets are ignored (note: id 0 is also the BPE token '!', which the project
    tokenizer uses as padding, so a real '!' is never a target). Computed in fp32.
    """
    predictions = logits[:, :-1].flatten(0, 1).float()  # (B * (L - 1), V)
    targets = tokens[:, 1:].flatten()  # (B * (L - 1),)
    return F.cross_entropy(predictions, targets, ignore_index=pad_id)
