"""Batched caption generation: greedy, beam search and top-k / nucleus sampling.

    tokens = generate(decoder, visual_tokens, sot_id=tok.sot_id, eot_id=tok.eot_id, num_beams=3)
    tokens, texts = generate_captions(decoder, visual_tokens, tokenizer, do_sample=True, top_p=0.9)

Any decoder with the `StepDecoder` interface works (`CaptionDecoder` has it). Semantics follow
Hugging Face transformers' `generate` (beam scores `sum log p / length ** length_penalty`,
`repetition_penalty` as in CTRL, `no_repeat_ngram_size`, top-k / top-p filtering), written
here because transformers' generation loop needs a `PreTrainedModel` around the decoder. The
logit processors are checked against transformers' own in the tests.

Sequences are laid out like the tokenizer's output: `[SOT, w1, ..., EOT, 0, ...]`. The pad id
and the start token are never generated (pad 0 is the BPE token '!': generating it would make a
caption indistinguishable from padding).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F

from vlpt.models.tokenizer import Tokenizer

# Score of beams that must never be chosen; finite so that sums and comparisons stay defined.
_NEVER = -1e9


class DecodingCache(Protocol):
    """What generation needs from a decoder's cache: its length and beam reordering."""

    length: int

    def reorder(self, index: torch.Tensor) -> None: ...


class StepDecoder(Protocol):
    """A decoder that generation can drive, with or without a KV cache."""

    @property
    def context_length(self) -> int: ...

    def __call__(
        self, tokens: torch.Tensor, visual_tokens: torch.Tensor, last_only: bool = False
    ) -> torch.Tensor: ...

    def init_cache(
        self, visual_tokens: torch.Tensor, max_length: int | None = None
    ) -> DecodingCache: ...

    def step(self, tokens: torch.Tensor, cache: Any) -> torch.Tensor: ...


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode; the defaults are greedy decoding up to the decoder's context length."""

    max_new_tokens: int | None = None
    """Most tokens to generate after the start token, the end token included (None: as many as
    the decoder's context length allows)."""
    min_new_tokens: int = 0
    """The end token is forbidden until this many tokens have been generated."""
    num_beams: int = 1
    """Beam width; 1 is greedy (or sampling)."""
    length_penalty: float = 1.0
    """Beam search ranks finished beams by `sum log p / length ** length_penalty` (length counts
    the generated tokens, end token included); > 0 favours longer captions, 0 is plain sum."""
    early_stopping: bool = True
    """Beam search: stop an item as soon as `num_beams` beams have ended (True), or when no
    running beam can still beat the worst ended one by transformers' heuristic (False)."""
    do_sample: bool = False
    """Sample from the (filtered) distribution instead of taking the most likely token."""
    temperature: float = 1.0
    """Sampling: divide the logits by this (< 1 sharper, > 1 flatter)."""
    top_k: int = 0
    """Sampling: keep only the k most likely tokens (0 keeps all)."""
    top_p: float = 1.0
    """Sampling: keep the smallest set of most likely tokens whose probability reaches p."""
    repetition_penalty: float = 1.0
    """CTRL's penalty on tokens already in the sequence (> 1 discourages repeats)."""
    no_repeat_ngram_size: int = 0
    """Forbid any n-gram of this size from occurring twice (0 turns it off)."""
    use_cache: bool = True
    """Reuse keys/values of earlier steps; False recomputes the whole prefix every step."""

    def __post_init__(self) -> None:
        checks = {
            "max_new_tokens": self.max_new_tokens is None or self.max_new_tokens >= 1,
            "min_new_tokens": self.min_new_tokens >= 0,
            "num_beams": self.num_beams >= 1,
            "temperature": self.temperature > 0,
            "top_k": self.top_k >= 0,
            "top_p": 0 < self.top_p <= 1,
            "repetition_penalty": self.repetition_penalty > 0,
            "no_repeat_ngram_size": self.no_repeat_ngram_size >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"generation option {name}={getattr(self, name)!r} is invalid.")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("sampling with num_beams > 1 is not supported; use one or the other.")


class GeneratedCaptions(NamedTuple):
    tokens: torch.Tensor
    """(B, L) long: start token, caption, end token (if reached), then 0 padding."""
    texts: list[str]
    """The decoded captions."""


@torch.no_grad()
def generate(
    decoder: StepDecoder,
    visual_tokens: torch.Tensor,
    *,
    sot_id: int,
    eot_id: int,
    pad_id: int = 0,
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    **options: Any,
) -> torch.Tensor:
    """Generate captions for visual tokens (B, N, D) -> token ids (B, L), 0-padded.

    `options` are `GenerationConfig` fields and override `config`. `generator` makes sampling
    reproducible (it must live on the visual tokens' device).
    """
    cfg = _resolve_config(config, options)
    length = decoder.context_length  # start token + new tokens
    if cfg.max_new_tokens is not None:
        length = 1 + cfg.max_new_tokens
    if length > decoder.context_length:
        raise ValueError(
            f"max_new_tokens={cfg.max_new_tokens} plus the start token exceeds the decoder's "
            f"context_length ({decoder.context_length}); lower max_new_tokens."
        )
    special = _SpecialTokens(sot_id, eot_id, pad_id)
    if cfg.num_beams > 1:
        return _beam_search(decoder, visual_tokens, length, cfg, special)
    return _greedy_or_sample(decoder, visual_tokens, length, cfg, special, generator)


def generate_captions(
    decoder: StepDecoder,
    visual_tokens: torch.Tensor,
    tokenizer: Tokenizer,
    *,
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    **options: Any,
) -> GeneratedCaptions:
    """`generate` with the tokenizer's special tokens, plus the decoded strings."""
    tokens = generate(
        decoder,
        visual_tokens,
        sot_id=tokenizer.sot_id,
        eot_id=tokenizer.eot_id,
        config=config,
        generator=generator,
        **options,
    )
    return GeneratedCaptions(tokens, [tokenizer.decode(row) for row in tokens.cpu()])


def _resolve_config(config: GenerationConfig | None, options: dict[str, Any]) -> GenerationConfig:
    known = {f.name for f in fields(GenerationConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"unknown generation option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}."
        )
    return replace(config or GenerationConfig(), **options)


@dataclass(frozen=True)
class _SpecialTokens:
    sot: int
    eot: int
    pad: int


class _NextTokenLogits:
    """Logits of the next token of growing sequences, through the KV cache or by recomputing."""

    def __init__(
        self, decoder: StepDecoder, visual_tokens: torch.Tensor, max_length: int, use_cache: bool
    ) -> None:
        self.decoder, self.visual_tokens = decoder, visual_tokens
        self.cache = decoder.init_cache(visual_tokens, max_length) if use_cache else None

    def __call__(self, sequences: torch.Tensor) -> torch.Tensor:
        """Sequences (N, T) -> fp32 logits (N, V) of token T + 1."""
        if self.cache is None:
            return self.decoder(sequences, self.visual_tokens, last_only=True)[:, -1].float()
        new_tokens = sequences[:, self.cache.length :]  # only what the cache has not seen
        return self.decoder.step(new_tokens, self.cache)[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        """Continue with rows `index` of the batch (beam search's surviving parents)."""
        if self.cache is None:
            self.visual_tokens = self.visual_tokens.index_select(0, index)
        else:
            self.cache.reorder(index)


def _greedy_or_sample(
    decoder: StepDecoder,
    visual_tokens: torch.Tensor,
    length: int,
    cfg: GenerationConfig,
    special: _SpecialTokens,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Sequences (B, <= length) token by token: the most likely token, or a sampled one."""
    batch = visual_tokens.shape[0]
    next_logits = _NextTokenLogits(decoder, visual_tokens, length, cfg.use_cache)
    sequences = visual_tokens.new_full((batch, length), special.pad, dtype=torch.long)
    sequences[:, 0] = special.sot
    done = torch.zeros(batch, dtype=torch.bool, device=sequences.device)
    for t in range(1, length):
        prefix = sequences[:, :t]  # (B, t)
        scores = _process_logits(next_logits(prefix), prefix, cfg, special)  # (B, V)
        token = _sample(scores, cfg, generator) if cfg.do_sample else scores.argmax(dim=-1)
        token = token.masked_fill(done, special.pad)  # finished captions stay padded
        sequences[:, t] = token
        done |= token == special.eot
        if bool(done.all()):
            break
    return _trim_padding(sequences, special.pad)


def _beam_search(
    decoder: StepDecoder,
    visual_tokens: torch.Tensor,
    length: int,
    cfg: GenerationConfig,
    special: _SpecialTokens,
) -> torch.Tensor:
    """Batched beam search (the algorithm of transformers' `_beam_search`).

    Each step ranks, per item, the 2K best continuations of its K running beams. Those of the
    top K that end (end token, or maximum length) become finished hypotheses scored
    `sum log p / length ** length_penalty`; the best K that do not end keep running.
    """
    k, batch = cfg.num_beams, visual_tokens.shape[0]
    device = visual_tokens.device
    beams_visual = visual_tokens.repeat_interleave(k, dim=0)  # (B*K, N, D), item-major
    next_logits = _NextTokenLogits(decoder, beams_visual, length, cfg.use_cache)

    running = torch.full((batch, k, length), special.pad, dtype=torch.long, device=device)
    running[:, :, 0] = special.sot
    running_scores = torch.zeros(batch, k, device=device)
    running_scores[:, 1:] = _NEVER  # all beams start identical: expand only the first
    finished, finished_scores = running.clone(), torch.full((batch, k), _NEVER, device=device)
    is_finished = torch.zeros(batch, k, dtype=torch.bool, device=device)
    open_items = torch.ones(batch, dtype=torch.bool, device=device)
    top_k_rank = torch.arange(2 * k, device=device) < k
    item_offset = torch.arange(batch, device=device)[:, None] * k

    for t in range(1, length):
        prefix = running[:, :, :t].reshape(batch * k, t)
        log_probs = F.log_softmax(next_logits(prefix), dim=-1)
        log_probs = _process_logits(log_probs, prefix, cfg, special)  # (B*K, V)
        vocab = log_probs.shape[-1]
        totals = (log_probs.view(batch, k, vocab) + running_scores[:, :, None]).view(batch, -1)
        cand_scores, cand_index = totals.topk(2 * k, dim=-1)  # (B, 2K), best first
        parent, token = cand_index // vocab, cand_index % vocab
        candidates = running.gather(1, parent[:, :, None].expand(-1, -1, length)).clone()
        candidates[:, :, t] = token  # (B, 2K, L)
        ends = (token == special.eot) | (t == length - 1)

        # The best K candidates that do not end keep running.
        keep = (cand_scores + ends * _NEVER).topk(k, dim=-1).indices  # (B, K)
        running = candidates.gather(1, keep[:, :, None].expand(-1, -1, length))
        running_scores = (cand_scores + ends * _NEVER).gather(1, keep)
        next_logits.reorder((parent.gather(1, keep) + item_offset).flatten())

        # Ending candidates ranked in the top K join the finished hypotheses of open items.
        accept = ends & top_k_rank & open_items[:, None] & (cand_scores > _NEVER / 2)
        new_scores = torch.where(accept, cand_scores / t**cfg.length_penalty, _NEVER)
        merged_scores = torch.cat([finished_scores, new_scores], dim=1)  # (B, 3K)
        best = merged_scores.topk(k, dim=-1).indices
        finished_scores = merged_scores.gather(1, best)
        finished = torch.cat([finished, candidates], 1).gather(
            1, best[:, :, None].expand(-1, -1, length)
        )
        is_finished = torch.cat([is_finished, accept], dim=1).gather(1, best)

        open_items &= _can_improve(running_scores, finished_scores, is_finished, t, cfg)
        if not bool(open_items.any()):
            break
    return _trim_padding(finished[:, 0], special.pad)


def _can_improve(
    running_scores: torch.Tensor,
    finished_scores: torch.Tensor,
    is_finished: torch.Tensor,
    generated: int,
    cfg: GenerationConfig,
) -> torch.Tensor:
    """(B,) whether an item should keep searching (transformers' `early_stopping` rule)."""
    all_finished = is_finished.all(dim=-1)
    if cfg.early_stopping:
        return ~all_finished
    best_running = running_scores[:, 0] / generated**cfg.length_penalty
    worst_finished = finished_scores.min(dim=-1).values
    return ~all_finished | (best_running > worst_finished)


def _process_logits(
    scores: torch.Tensor, sequences: torch.Tensor, cfg: GenerationConfig, special: _SpecialTokens
) -> torch.Tensor:
    """The logit processors, in transformers' order: scores (N, V), sequences so far (N, T)."""
    scores = scores.clone()
    scores[:, [special.pad, special.sot]] = float("-inf")
    if sequences.shape[1] - 1 < cfg.min_new_tokens:
        scores[:, special.eot] = float("-inf")
    if cfg.repetition_penalty != 1.0:
        scores = apply_repetition_penalty(scores, sequences, cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size > 0:
        scores = ban_repeated_ngrams(scores, sequences, cfg.no_repeat_ngram_size)
    return scores


def _sample(
    scores: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Temperature, top-k, top-p, then one draw per row: scores (N, V) -> tokens (N,)."""
    scores = scores / cfg.temperature
    if cfg.top_k > 0:
        scores = top_k_filter(scores, cfg.top_k)
    if cfg.top_p < 1.0:
        scores = top_p_filter(scores, cfg.top_p)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def apply_repetition_penalty(
    scores: torch.Tensor, sequences: torch.Tensor, penalty: float
) -> torch.Tensor:
    """CTRL: scores (N, V) of tokens present in sequences (N, T) are divided by `penalty` when
    positive and multiplied by it when negative (transformers' `RepetitionPenaltyLogitsProcessor`)."""
    seen = scores.gather(1, sequences)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, sequences, seen)


def ban_repeated_ngrams(scores: torch.Tensor, sequences: torch.Tensor, n: int) -> torch.Tensor:
    """Forbid each token that would repeat an n-gram already in sequences (N, T); scores (N, V)."""
    if sequences.shape[1] < n:
        return scores
    if n == 1:
        banned = torch.zeros_like(scores).scatter_(1, sequences, 1.0) > 0
        return scores.masked_fill(banned, float("-inf"))
    ngrams = sequences.unfold(1, n, 1)  # (N, T - n + 1, n)
    current = sequences[:, sequences.shape[1] - (n - 1) :]  # (N, n - 1), the prefix to complete
    repeats = (ngrams[:, :, :-1] == current[:, None, :]).all(dim=-1)  # (N, T - n + 1)
    # scatter_add, not scatter: several n-grams may end in the same token.
    hits = torch.zeros_like(scores).scatter_add_(1, ngrams[:, :, -1], repeats.to(scores.dtype))
    return scores.masked_fill(hits > 0, float("-inf"))


def top_k_filter(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest scores of each row (ties with the k-th kept), the rest -inf."""
    k = min(k, scores.shape[-1])
    threshold = scores.topk(k, dim=-1).values[:, -1:]
    return scores.masked_fill(scores < threshold, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the most likely tokens until their probability reaches p (at least one)."""
    sorted_scores, order = scores.sort(dim=-1)  # ascending
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= 1 - p
    drop_sorted[:, -1] = False  # the most likely token always stays
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def _trim_padding(sequences: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Cut the padding columns that no row uses; pad is never generated, so counts are lengths."""
    longest = int((sequences != pad_id).sum(dim=1).max())
    return sequences[:, :longest]
