"""A caption decoder started from a pretrained checkpoint's text tower and fusion encoder.

A fresh decoder has to learn the language of the captions and, harder, which image tokens each
word is about. A pretrained checkpoint knows both: its text tower reads the captions (causally,
as a decoder does), and the fusion encoder of a masked run (MLM, ITM) ties caption words to image
tokens through cross-attention. Both large captioners start their decoders this way: CoCa's
decoder *is* its text tower (the unimodal lower layers) with multimodal layers on top, and BLIP
initialises its decoder from its fusion encoder. `decoder_state_from_towers` builds a
`CaptionDecoder` state dict from a checkpoint's, block for block:

    source "text":    blocks[:T]   <- text.transformer.resblocks[:T]
    source "fusion":  blocks[:T]   <- the same, then ln_mid <- text.ln_final (decoder_cfg.mid_norm = T)
                      blocks[T:]   <- fusion.blocks (their self-attention now causal)

The text blocks gain a cross-attention the tower never had; it starts at the decoder's own init
with a zero output projection, so each block starts as exactly the text block it copies. Token
and position embeddings are the text tower's (the output projection is tied to them); the
visual input norm and projection and the final norm are the fusion encoder's (source "fusion")
or, for "text", the decoder's own init and the text tower's final norm. With source "text" and
an untouched cross-attention the decoder's normalised states *are* the text tower's.

Only the fusion encoder's bidirectional self-attention changes meaning (a word no longer sees
the words after it), and its MLM head (dense, GELU, norm before the tied table) is not carried
over: the decoder reads the tied table right after its final norm.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from vlpt.models.decoder import DecoderConfig

SOURCES = ("text", "fusion")

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
) -> dict[str, torch.Tensor]:
    """The `decoder.*` tensors of a decoder (`cfg`, its own freshly initialised `decoder_state`
    without the prefix) started from checkpoint `state`'s text tower and, with source "fusion",
    its fusion encoder. A ValueError says what does not fit (missing tower, block counts,
    widths)."""
    if source not in SOURCES:
        raise ValueError(
            f"decoder init source must be one of {', '.join(SOURCES)}, got {source!r}."
        )
    text_layers = count_blocks(state, "text.transformer.resblocks.")
    fusion_layers = count_blocks(state, "fusion.blocks.") if source == "fusion" else 0
    if not text_layers:
        raise ValueError("the checkpoint has no text tower to start the caption decoder from.")
    if source == "fusion" and not fusion_layers:
        raise ValueError(
            "the checkpoint has no fusion encoder (a masked run's MLM/ITM head) to start the "
            "caption decoder from; start from its text tower alone (decoder_init: text)."
        )
    wanted = text_layers + fusion_layers
    if cfg.layers != wanted or cfg.mid_norm != (text_layers if fusion_layers else 0):
        raise ValueError(
            f"a decoder started from the checkpoint's {text_layers} text blocks"
            + (f" and {fusion_layers} fusion blocks" if fusion_layers else "")
            + f" needs decoder_cfg.layers = {wanted} and mid_norm = "
            f"{text_layers if fusion_layers else 0}; this one has {cfg.layers} and {cfg.mid_norm}."
        )
    out = {k: v.clone() for k, v in decoder_state.items()}
    take = _Taker(state, out)
    take("token_embedding.weight", "text.token_embedding.weight")
    take("positional_embedding", "text.positional_embedding")
    for i in range(text_layers):
        for name, text_name in _TEXT_BLOCK:
            for p in ("weight", "bias"):
                take(
                    f"blocks.{i}.{name}".format(p=p),
                    f"text.transformer.resblocks.{i}.{text_name}".format(p=p),
                )
        # A cross-attention the text block never had: it adds nothing until trained.
        out[f"blocks.{i}.cross_attn.out.weight"].zero_()
    if not fusion_layers:
        for p in ("weight", "bias"):
            take(f"ln_final.{p}", f"text.ln_final.{p}")
        return out
    for p in ("weight", "bias"):
        take(f"ln_mid.{p}", f"text.ln_final.{p}")
        take(f"ln_final.{p}", f"fusion.ln_final.{p}")
        take(f"ln_visual.{p}", f"fusion.ln_visual.{p}")
        take(f"visual_proj.{p}", f"fusion.visual_proj.{p}")
    for j in range(fusion_layers):
        block, fusion = f"blocks.{text_layers + j}.", f"fusion.blocks.{j}."
        for name, fusion_name in _FUSION_BLOCK:
            for p in ("weight", "bias"):
                take(f"{block}{name}.{p}", f"{fusion}{fusion_name}.{p}")
        for p in ("weight", "bias"):  # the fusion encoder's q and kv are one qkv here
            q, kv = state[f"{fusion}self_attn.q.{p}"], state[f"{fusion}self_attn.kv.{p}"]
            take.put(f"{block}self_attn.qkv.{p}", torch.cat([q, kv]), f"{fusion}self_attn.q|kv")
    return out


class _Taker:
    """Copies checkpoint tensors into the decoder state, checking names and shapes."""

    def __init__(self, state: Mapping[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
        self.state, self.out = state, out

    def __call__(self, name: str, source: str) -> None:
        if source not in self.state:
            raise ValueError(f"the checkpoint has no '{source}' for the decoder's '{name}'.")
        self.put(name, self.state[source], source)

    def put(self, name: str, tensor: torch.Tensor, source: str) -> None:
        own = self.out[name]
        if tensor.shape != own.shape:
            raise ValueError(
                f"the checkpoint's '{source}' has shape {tuple(tensor.shape)}; the decoder's "
                f"'{name}' needs {tuple(own.shape)} (decoder and towers must share widths)."
            )
        self.out[name] = tensor.detach().clone().to(own.dtype)
