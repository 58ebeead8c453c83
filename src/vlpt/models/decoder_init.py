"""A caption decoder started from a pretrained checkpoint's text tower and fusion encoder.

A fresh decoder has to learn the language of the captions and, harder, which image tokens each
word is about. A pretrained checkpoint knows both: its text tower reads the captions (causally,
as a decoder does), and the fusion encoder of a masked run (MLM, ITM) ties caption words to image
tokens through cross-attention. Both large captioners start their decoders this way: CoCa's
decoder *is* its text tower (the unimodal lower layers) with multimodal layers on top, and BLIP
initialises its decoder from its fusion encoder. `decoder_state_from_towers` builds a
`CaptionDecoder` state dict from a checkpoint's, block for block:

    source "text":    blocks[:T]   <- text.transformer.resblocks[:T]
    source "fusion":  blocks[:T]   <- the same
                      ln_mid       <- text.ln_final     (decoder_cfg.mid_norm = T)
                      blocks[T:]   <- fusion.blocks     (their self-attention now causal)

The text blocks gain a cross-attention the tower never had; it starts at the decoder's own init
with a zero output projection, so each block starts as exactly the text block it copies. Token
and position embeddings are the text tower's (the output projection is tied to them); the
visual input norm and projection and the final norm are the fusion encoder's (source "fusion")
or, for "text", the decoder's own init and the text tower's final norm. With source "text" and
an untouched cross-attention the decoder's normalised states *are* the text tower's.

Only the fusion encoder's bidirectional self-attention changes meaning: a word no longer sees
the words after it. At the last word the first fusion block computes what the encoder's did;
above it, the earlier words' states it reads differ, so the copy is a start, not the same
function. The MLM head (dense, GELU, norm before the tied table) is not carried over: the
decoder reads the tied table right after its final norm.

Shapes do not show everything: the caller passes the towers' head counts, and every tensor of
the copied blocks must find a place (a text tower with layer scale, for one, does not fit).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from vlpt.models.decoder import DecoderConfig

SOURCES = ("text", "fusion")
TEXT_BLOCKS, FUSION_BLOCKS = "text.transformer.resblocks.", "fusion.blocks."
FRESH = "model.name=tiny-conv-caption finetune.decoder_init="  # a fresh decoder (the overrides)
FRESH_HINT = (
    "start from the text tower alone (finetune.decoder_init=text, with a decoder as deep as "
    f"the tower), or fresh: {FRESH}"
)

# (decoder name, text-tower name) inside a block; {p} is weight or bias.
_TEXT_BLOCK = (
    ("ln_1.{p}", "ln_1.{p}"),
    ("self_attn.qkv.{p}", "attn.in_proj_{p}"),  # [q; k; v] both, heads contiguous in each
    ("self_attn.out.{p}", "attn.out_proj.{p}"),
    ("ln_3.{p}", "ln_2.{p}"),  # the text block's second norm is the one before its MLP
    ("mlp_fc.{p}", "mlp.c_fc.{p}"),
    ("mlp_proj.{p}", "mlp.c_proj.{p}"),
)
_FUSION_BLOCK = (
    ("ln_1", "ln_1"),
    ("self_attn.out", "self_attn.out"),
    ("ln_2", "ln_2"),
    ("cross_attn.q", "cross_attn.q"),
    ("cross_attn.kv", "cross_attn.kv"),
    ("cross_attn.out", "cross_attn.out"),
    ("ln_3", "ln_3"),
    ("mlp_fc", "mlp.0"),
    ("mlp_proj", "mlp.2"),
)


def count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered blocks `prefix{i}.` the state dict holds."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    return max(found) + 1 if found else 0


def decoder_state_from_towers(
    state: Mapping[str, torch.Tensor],
    decoder_state: Mapping[str, torch.Tensor],
    cfg: DecoderConfig,
    source: str,
    heads: Mapping[str, int | None],
) -> dict[str, torch.Tensor]:
    """The `decoder.*` tensors (without the prefix) of a decoder `cfg`, whose own freshly
    initialised state is `decoder_state`, started from checkpoint `state`'s text tower and, with
    source "fusion", its fusion encoder. `heads` gives their attention heads ("text", "fusion";
    None = not known), which the tensor shapes do not show. A ValueError says what does not fit:
    a missing tower, block counts, heads, widths, or a tensor of the towers left unused (a layer
    scale, say), which would make the copy compute something else."""
    if source not in SOURCES:
        raise ValueError(
            f"decoder init source must be one of {', '.join(SOURCES)}, got {source!r}."
        )
    text_layers = count_blocks(state, TEXT_BLOCKS)
    fusion_layers = count_blocks(state, FUSION_BLOCKS) if source == "fusion" else 0
    if not text_layers:
        raise ValueError("the checkpoint has no text tower to start the caption decoder from.")
    if source == "fusion" and not fusion_layers:
        raise ValueError(
            "the checkpoint has no fusion encoder (a masked run's MLM/ITM head) to start the "
            f"caption decoder from; {FRESH_HINT}."
        )
    if fusion_layers and "fusion.positional_embedding" in state:
        raise ValueError(
            "the checkpoint's fusion encoder reads bare token embeddings, not the text tower's "
            "states (fusion_cfg.text_states: false), so it cannot sit on the text blocks; "
            f"{FRESH_HINT}."
        )
    _check_shape(cfg, text_layers, fusion_layers, heads)
    out = {k: v.clone() for k, v in decoder_state.items()}
    take = _Taker(state, out)
    take("token_embedding.weight", "text.token_embedding.weight")
    take("positional_embedding", "text.positional_embedding")
    _copy_text_blocks(take, text_layers)
    if fusion_layers:
        _copy_fusion(take, text_layers, fusion_layers)
    else:
        for p in ("weight", "bias"):
            take(f"ln_final.{p}", f"text.ln_final.{p}")
    prefixes = (TEXT_BLOCKS, FUSION_BLOCKS) if fusion_layers else (TEXT_BLOCKS,)
    unused = sorted(k for k in state if k.startswith(prefixes) and k not in take.used)
    if unused:
        raise ValueError(
            f"the checkpoint's towers have tensors a caption decoder block has no place for "
            f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''}): start the decoder "
            f"fresh ({FRESH})."
        )
    return out


def _check_shape(
    cfg: DecoderConfig, text_layers: int, fusion_layers: int, heads: Mapping[str, int | None]
) -> None:
    wanted, mid = text_layers + fusion_layers, text_layers if fusion_layers else 0
    if cfg.layers != wanted or cfg.mid_norm != mid:
        towers = f"{text_layers} text blocks" + (
            f" and {fusion_layers} fusion blocks" if fusion_layers else ""
        )
        raise ValueError(
            f"a decoder started from the checkpoint's {towers} needs {wanted} blocks and "
            f"mid_norm {mid} (the model's decoder_cfg); this one has {cfg.layers} and "
            f"{cfg.mid_norm}: pick a model whose decoder fits, e.g. tiny-conv-masked-caption "
            "for tiny-conv-masked."
        )
    for tower in ("text", "fusion") if fusion_layers else ("text",):
        count = heads.get(tower)
        if count is not None and count != cfg.heads:
            raise ValueError(
                f"the checkpoint's {tower} blocks have {count} attention heads; the decoder "
                f"has {cfg.heads} (decoder_cfg.heads must match to reuse their attention)."
            )


def _copy_text_blocks(take: _Taker, layers: int) -> None:
    for i in range(layers):
        block, text = f"blocks.{i}.", f"{TEXT_BLOCKS}{i}."
        for name, text_name in _TEXT_BLOCK:
            for p in ("weight", "bias"):
                take(block + name.format(p=p), text + text_name.format(p=p))
        # A cross-attention the text block never had: it adds nothing until trained.
        for p in ("weight", "bias"):
            take.out[f"{block}cross_attn.out.{p}"].zero_()


def _copy_fusion(take: _Taker, text_layers: int, layers: int) -> None:
    for p in ("weight", "bias"):
        take(f"ln_mid.{p}", f"text.ln_final.{p}")
        take(f"ln_final.{p}", f"fusion.ln_final.{p}")
        take(f"ln_visual.{p}", f"fusion.ln_visual.{p}")
        take(f"visual_proj.{p}", f"fusion.visual_proj.{p}")
    for j in range(layers):
        block, fusion = f"blocks.{text_layers + j}.", f"{FUSION_BLOCKS}{j}."
        for name, fusion_name in _FUSION_BLOCK:
            for p in ("weight", "bias"):
                take(f"{block}{name}.{p}", f"{fusion}{fusion_name}.{p}")
        for p in ("weight", "bias"):  # the fusion encoder's q and kv are one qkv here
            q, kv = f"{fusion}self_attn.q.{p}", f"{fusion}self_attn.kv.{p}"
            take.concat(f"{block}self_attn.qkv.{p}", [q, kv])


class _Taker:
    """Copies checkpoint tensors into the decoder state, checking names and shapes, and
    remembers which it used."""

    def __init__(self, state: Mapping[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
        self.state, self.out = state, out
        self.used: set[str] = set()

    def __call__(self, name: str, source: str) -> None:
        self.concat(name, [source])

    def concat(self, name: str, sources: list[str]) -> None:
        """Decoder tensor `name` <- the checkpoint's `sources` concatenated along dim 0."""
        missing = [s for s in sources if s not in self.state]
        if missing:
            raise ValueError(f"the checkpoint has no '{missing[0]}' for the decoder's '{name}'.")
        tensor = torch.cat([self.state[s] for s in sources])
        own = self.out[name]
        if tensor.shape != own.shape:
            raise ValueError(
                f"the checkpoint's '{'|'.join(sources)}' has shape {tuple(tensor.shape)}; the "
                f"decoder's '{name}' needs {tuple(own.shape)} (decoder and text tower must "
                "share width and context length)."
            )
        self.out[name] = tensor.detach().clone().to(own.dtype)
        self.used.update(sources)
