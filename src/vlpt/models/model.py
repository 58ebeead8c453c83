"""The two-tower vision-language model: open_clip's ViT and text Transformer, plus temperature.

Parameter names match open_clip's `CustomTextCLIP` (`visual.*`, `text.*`, `logit_scale`,
`logit_bias`), so open_clip checkpoints load directly and exports need no renaming.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower, _build_vision_tower
from open_clip.transformer import text_global_pool
from torch import nn

from vlpt.models.decoder import CaptionDecoder
from vlpt.models.fusion import FusionEncoder
from vlpt.models.lengths import LENGTH_GROUPS, by_length, caption_lengths
from vlpt.models.mae import MAEDecoder
from vlpt.models.patch_dropout import PatchDropout, Pattern
from vlpt.models.registry import get_model_config
from vlpt.models.temporal import TemporalConfig, TemporalModule, TemporalShift

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionLanguageModel(nn.Module):
    """Image tower + text tower projecting into one embedding space.

    `forward` returns the normalised features and the (exponentiated) temperature that the
    contrastive objectives consume; it has no knowledge of losses, data or distribution.
    """

    def __init__(
        self,
        embed_dim: int,
        vision_cfg: dict[str, Any],
        text_cfg: dict[str, Any],
        temporal_cfg: dict[str, Any] | None = None,
        init_logit_scale: float = math.log(1 / 0.07),
        init_logit_bias: float = -10.0,
        fusion_cfg: dict[str, Any] | None = None,
        mae_cfg: dict[str, Any] | None = None,
        decoder_cfg: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        vision_cfg = dict(vision_cfg)
        stem_channels = vision_cfg.pop("stem_channels", None)
        vcfg, tcfg = CLIPVisionCfg(**vision_cfg), CLIPTextCfg(**text_cfg)
        self.visual = _build_vision_tower(embed_dim, vcfg)
        if stem_channels:
            # open_clip's forward only calls `conv1(x)`, so the stem replaces the patchify conv.
            self.visual.conv1 = ConvStem(stem_channels, int(vcfg.width), int(vcfg.patch_size))
        self.text = _build_text_tower(embed_dim, tcfg)
        # None: a pure image model (open_clip's layout); otherwise clips (B, T, 3, H, W) and
        # images (one-frame clips) go through the temporal module.
        self.temporal: TemporalModule | None = None
        if temporal_cfg is not None:
            self.temporal = TemporalModule(embed_dim, TemporalConfig.from_dict(temporal_cfg))
        # TSM's shift between neighbouring frames inside the image tower (temporal_cfg.shift).
        self._shift: TemporalShift | None = None
        if self.temporal is not None and self.temporal.cfg.shift:
            blocks = list(self.visual.transformer.resblocks)
            self._shift = TemporalShift(blocks, self.temporal.cfg.shift, int(vcfg.width))
        self.logit_scale = nn.Parameter(torch.tensor(init_logit_scale))
        # Only SigLIP reads the bias; it is kept for every model so checkpoints are uniform.
        self.logit_bias = nn.Parameter(torch.tensor(init_logit_bias))
        self.embed_dim = embed_dim
        self.image_size = int(vcfg.image_size)
        self.context_length = int(tcfg.context_length)
        self.eot_id = int(tcfg.vocab_size) - 1  # the tokenizer's end token: the largest id
        self.length_groups = LENGTH_GROUPS
        self.image_mean, self.image_std = OPENAI_MEAN, OPENAI_STD
        # Optional heads for the masked objectives (registry keys "fusion_cfg", "mae_cfg"); the
        # tower sizes they must agree with are filled in from the towers.
        self.fusion: FusionEncoder | None = None
        if fusion_cfg is not None:
            if fusion_cfg.get("width", tcfg.width) != tcfg.width:
                raise ValueError(
                    f"fusion_cfg.width ({fusion_cfg['width']}) must equal text_cfg.width "
                    f"({tcfg.width}): the fusion encoder shares the text token embeddings."
                )
            self.fusion = FusionEncoder(
                {
                    "width": tcfg.width,
                    "visual_width": vcfg.width,
                    "context_length": tcfg.context_length,
                    "vocab_size": tcfg.vocab_size,
                    **fusion_cfg,
                }
            )
        self.mae_decoder: MAEDecoder | None = None
        if mae_cfg is not None:
            sizes = {"visual_width": vcfg.width, "image_size": self.image_size}
            self.mae_decoder = MAEDecoder({**sizes, "patch_size": vcfg.patch_size, **mae_cfg})
        # Caption decoder (registry key "decoder_cfg"): its own token table and positions, its
        # cross-attention reading the vision tower's tokens; vocabulary and length from the text
        # tower, so the one tokenizer serves both.
        self.decoder: CaptionDecoder | None = None
        if decoder_cfg is not None:
            text_sizes = {"context_length": tcfg.context_length, "vocab_size": tcfg.vocab_size}
            self.decoder = CaptionDecoder(
                {**text_sizes, "visual_width": vcfg.width, "width": tcfg.width, **decoder_cfg}
            )

    def heads(self) -> dict[str, nn.Module]:
        """The optional heads this model has, by the name an objective asks for them with."""
        found: dict[str, nn.Module] = {}
        if self.fusion is not None:
            found.update(
                fusion=self.fusion, mlm_head=self.fusion.mlm_head, itm_head=self.fusion.itm_head
            )
        if self.mae_decoder is not None:
            found["mae_decoder"] = self.mae_decoder
        if self.decoder is not None:
            found["decoder"] = self.decoder
        return found

    def contrastive_parameters(self) -> list[nn.Parameter]:
        """The parameters the contrastive features and their temperature depend on and the
        visual tokens do not: the text tower (whose token table the fusion encoder also reads),
        the vision projection, the temporal module, `logit_scale` and `logit_bias`."""
        params = list(self.text.parameters())
        if self.visual.proj is not None:
            params.append(self.visual.proj)
        if self.temporal is not None:
            params += list(self.temporal.parameters())
        return [*params, self.logit_scale, self.logit_bias]

    def caption_decoder(self) -> CaptionDecoder:
        """The caption decoder, or a ValueError saying that this model has none."""
        if self.decoder is None:
            raise ValueError(
                "this checkpoint has no caption decoder (decoder_cfg); fine-tune one with "
                "`vlpt finetune configs/finetune/synthetic-caption-tiny.yaml init=CHECKPOINT` "
                '(model tiny-conv-masked-caption), or use a model whose JSON has "decoder_cfg".'
            )
        return self.decoder

    def set_patch_dropout(self, ratio: float, pattern: Pattern | None = None) -> None:
        """FLIP: drop this fraction of patch tokens in training (0 turns it off), by `pattern`
        (`random` or `grid`, see `vlpt.models.patch_dropout`; None keeps the last one set)."""
        if pattern is not None:
            self._dropout_pattern: Pattern = pattern
        elif not hasattr(self, "_dropout_pattern"):
            self._dropout_pattern = "random"
        self.visual.patch_dropout = (
            PatchDropout(
                ratio,
                self._dropout_pattern,
                tuple(self.visual.grid_size),
                device=self.visual.positional_embedding.device,
            )
            if ratio > 0
            else nn.Identity()
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable and self._shift is not None:
            raise ValueError(
                "gradient checkpointing with a temporal shift: blocks recomputed in the backward "
                "pass would not see the clip's frames; use one or the other"
            )
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) images or (B, T, 3, H, W) clips, normalised pixels -> (B, D) embeddings.

        Every frame goes through the image tower; the temporal module (mean pooling for a model
        without one) turns the (B, T, D) frame embeddings into one per clip."""
        features = self._pool_frames(self._encode_frames(images, with_tokens=False)[0])
        return F.normalize(features, dim=-1) if normalize else features

    def _encode_frames(
        self, images: torch.Tensor, with_tokens: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images (B, 3, H, W) as one-frame clips, or clips (B, T, 3, H, W), through the image
        tower frame by frame -> frame embeddings (B, T, D) and, `with_tokens`, the frames' output
        tokens (B, T, 1 + N, W): CLS first, after `ln_post`, before pooling and projection.

        The token path is written out (open_clip's `output_tokens=True` drops the CLS token and
        changes the tower's return type) for the standard tower: no attention pooling,
        `ln_post` on all tokens before pooling, which every registered architecture uses."""
        clips = images if images.ndim == 5 else images.unsqueeze(1)
        shape = clips.shape[:2]
        frames = clips.flatten(0, 1)
        in_time = self._shift.frames(shape[1]) if self._shift is not None else nullcontext()
        if not with_tokens:
            with in_time:
                return self.visual(frames).unflatten(0, shape), None
        tower = self.visual
        with in_time:
            tokens = tower.ln_post(tower.transformer(tower._embeds(frames)))  # (B*T, 1 + N, W)
        pooled, _ = tower._global_pool(tokens)
        if tower.proj is not None:
            pooled = pooled @ tower.proj  # (B*T, D)
        return pooled.unflatten(0, shape), tokens.unflatten(0, shape)

    def _pool_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, D) frame embeddings -> (B, D): the temporal module, or the mean of the frames
        for a model without one (a single frame is passed through)."""
        if self.temporal is not None:
            return self.temporal(frames)
        return frames[:, 0] if frames.shape[1] == 1 else frames.float().mean(1)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, L) token ids, 0-padded, L <= context_length -> (B, D) embeddings.

        Same result as open_clip's `TextTransformer.forward`, but it accepts batches cut to
        their longest caption (the tokenizer does that): with the causal mask, padding after the
        end token never changes the pooled feature, so computing it is wasted work.
        """
        return self.encode_text_with_states(tokens, normalize)[0]

    def encode_text_with_states(
        self, tokens: torch.Tensor, normalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode_text`'s embeddings (B, D) and the per-token states they are pooled from,
        (B, L, W) after `ln_final` (what a fusion encoder with `text_states` reads)."""
        tower = self.text
        states = self._text_states(tokens, tower.token_embedding(tokens))
        pooled = text_global_pool(states, tokens, pool_type=tower.pool_type)  # (B, W)
        if isinstance(tower.text_projection, nn.Linear):
            pooled = tower.text_projection(pooled)
        elif tower.text_projection is not None:
            pooled = pooled @ tower.text_projection
        return (F.normalize(pooled, dim=-1) if normalize else pooled), states

    def project_text_states(self, states: torch.Tensor) -> torch.Tensor:
        """Text-tower states (..., W) through the text projection -> (..., D), unnormalised:
        a single word's state in the contrastive space (FILIP's token-wise features)."""
        projection = self.text.text_projection
        if isinstance(projection, nn.Linear):
            return projection(states)
        return states if projection is None else states @ projection.to(states.dtype)

    def project_visual_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Visual tokens (..., W) through the image projection -> (..., D), unnormalised."""
        proj = self.visual.proj
        return tokens if proj is None else tokens @ proj.to(tokens.dtype)

    def _text_states(self, tokens: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, L) ids and their embeddings (B, L, W) -> the tower's states (B, L, W), the rows
        run in `length_groups` groups of similar caption length (zeros past each group's
        longest caption; `vlpt.models.lengths`)."""
        lengths = caption_lengths(tokens, self.eot_id)
        # Exact only for a causal tower pooled at the end token or before it (every registered
        # one): a bidirectional tower sees the padding, `last` pooling reads it.
        tower = self.text
        exact = tower.attn_mask is not None and tower.pool_type != "last"
        return by_length(
            lambda rows, cut: self._text_tower(x[rows, :cut]),
            lengths,
            self.length_groups if exact else 1,
            total=tokens.shape[1],
        )

    def set_length_groups(self, groups: int) -> None:
        """Run the text tower and the fusion encoder in `groups` groups of similar caption
        length (1: the whole batch at the length of its longest caption)."""
        if groups < 1:
            raise ValueError(f"length groups must be >= 1, got {groups}")
        self.length_groups = groups
        if self.fusion is not None:
            self.fusion.length_groups = groups

    def _text_tower(self, x: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, W) -> the text tower's states after `ln_final` (B, L, W)."""
        tower = self.text
        length = x.shape[1]
        x = x + tower.positional_embedding[:length].to(x.dtype)
        mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
        return tower.ln_final(tower.transformer(x, attn_mask=mask))

    def encode_clip_both_ways(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, 3, H, W) clips -> normalised embeddings of the clips and of the same clips
        played backwards, (B, D) each, from one pass of the image tower over the frames (only
        the temporal module runs twice), or, when the tower shifts channels between frames and
        so sees their order, of one pass over both (2B clips)."""
        if self._shift is not None and clips.shape[1] > 1:
            both = self._encode_frames(torch.cat([clips, clips.flip(1)]), with_tokens=False)[0]
            forward, backward = (self._pool_frames(half) for half in both.chunk(2))
            return F.normalize(forward, dim=-1), F.normalize(backward, dim=-1)
        frames = self._encode_frames(clips, with_tokens=False)[0]  # (B, T, D)
        forward, backward = self._pool_frames(frames), self._pool_frames(frames.flip(1))
        return F.normalize(forward, dim=-1), F.normalize(backward, dim=-1)

    def encode_image_with_tokens(
        self, images: torch.Tensor, normalize: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the image tower giving `encode_image`'s embeddings (B, D) and the visual
        tokens (B, 1 + N, W): every output token (CLS first) after `ln_post`, before pooling and
        projection; a clip (B, T, 3, H, W) gives its frames' tokens one after the other,
        (B, T * (1 + N), W). Patch dropout, when active, leaves fewer tokens."""
        frames, tokens = self._encode_frames(images, with_tokens=True)
        assert tokens is not None
        pooled = self._pool_frames(frames)
        return (F.normalize(pooled, dim=-1) if normalize else pooled), tokens.flatten(1, 2)

    def encode_visible_patches(self, frames: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """MAE encoder pass: (B, 3, H, W) frames, `keep` (B, K) patch indices -> (B, 1 + K, W)
        tokens after `ln_post`. Only the kept patches (and CLS) enter the Transformer."""
        tower = self.visual
        x = tower.conv1(frames).flatten(2).transpose(1, 2)  # (B, N, W)
        pos = tower.positional_embedding.to(x.dtype)
        x = (x + pos[1:]).gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, W)
        cls = (tower.class_embedding.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1)
        x = tower.ln_pre(torch.cat([cls, x], dim=1))
        return tower.ln_post(tower.transformer(x))

    def fuse(
        self,
        tokens: torch.Tensor,
        visual_tokens: torch.Tensor,
        text_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fusion encoder: (B, L) tokens (mask id allowed) x (B, N, W) visual -> (B, L, W).

        A fusion encoder with `text_states` reads the text tower's states of `tokens`: pass them
        when they are at hand (`forward` returns them with the contrastive features), otherwise
        they are computed here (masked captions included: the mask vector goes in as a token)."""
        fusion = self.fusion
        if fusion is None:
            raise ValueError("this model has no fusion encoder (no fusion_cfg in its config).")
        if not fusion.cfg.text_states:
            text_states = None
        elif text_states is None:
            embedded = fusion.embed_tokens(tokens, self.text.token_embedding)
            text_states = self._text_states(tokens, embedded)
        return fusion(tokens, visual_tokens, self.text.token_embedding, text_states)

    def fusion_text_parameters(self) -> list[nn.Parameter]:
        """The text-tower parameters the fusion encoder reads: the token table, and with
        `text_states` every part of the tower but the projection to the embedding space."""
        if self.fusion is None:
            return []
        if not self.fusion.cfg.text_states:
            return list(self.text.token_embedding.parameters())
        named = self.text.named_parameters()
        return [p for name, p in named if not name.startswith("text_projection")]

    def mlm_logits(self, hidden: torch.Tensor, full: bool = True) -> torch.Tensor:
        """Fused states at masked positions (n, W) -> vocabulary logits: (n, V), -inf outside
        the MLM head's output vocabulary, or with `full=False` (n, V') over that vocabulary only
        (columns: `fusion.mlm_head.vocab_index`; what training uses)."""
        assert self.fusion is not None
        head, table = self.fusion.mlm_head, self.text.token_embedding
        return head(hidden, table) if full else head.vocab_logits(hidden, table)

    def itm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Fused states (B, L, W) -> (B, 2) logits of [no match, match], from the first token."""
        assert self.fusion is not None
        return self.fusion.itm_head(hidden[:, 0])

    def forward(
        self,
        images: torch.Tensor,
        tokens: torch.Tensor | None,
        needs: frozenset[str] = frozenset(),
    ) -> dict[str, torch.Tensor]:
        """Contrastive features, plus what `needs` asks for: `visual_tokens` (B, N', W),
        `text_states` (B, L, W; the text tower's per-token states, free with the features).

        `tokens=None` skips the text tower (no `text_features`): objectives that only read the
        visual tokens, such as captioning, do not pay for it."""
        outputs: dict[str, torch.Tensor] = {}
        if "reversed_features" in needs and images.ndim == 5 and "visual_tokens" not in needs:
            outputs["image_features"], outputs["reversed_features"] = self.encode_clip_both_ways(
                images
            )
        elif "visual_tokens" in needs:
            outputs["image_features"], outputs["visual_tokens"] = self.encode_image_with_tokens(
                images
            )
        else:
            outputs["image_features"] = self.encode_image(images)  # (B, D)
        if tokens is not None and "text_states" in needs:
            outputs["text_features"], outputs["text_states"] = self.encode_text_with_states(tokens)
        elif tokens is not None:
            outputs["text_features"] = self.encode_text(tokens)  # (B, D)
        outputs["logit_scale"] = self.logit_scale.exp().clamp(max=100.0)
        outputs["logit_bias"] = self.logit_bias
        return outputs


class ConvStem(nn.Sequential):
    """Patch embedding by stride-2 3x3 convolutions (Xiao et al. 2021, "Early convolutions help
    transformers see better"): one conv per halving of the patch side, GELU between, then a 1x1
    conv to the transformer width. Same output shape as the patchify conv it replaces,
    (B, width, H / patch, W / patch); it sees shapes inside a patch that a linear patch
    embedding learns slowly."""

    def __init__(self, channels: list[int], width: int, patch_size: int) -> None:
        halvings = int(math.log2(patch_size))
        if 2**halvings != patch_size or len(channels) != halvings:
            raise ValueError(
                f"stem_channels needs one entry per halving of patch_size {patch_size} "
                f"({halvings}), got {channels}"
            )
        layers: list[nn.Module] = []
        previous = 3
        for out in channels:
            layers += [nn.Conv2d(previous, out, 3, stride=2, padding=1, bias=False), nn.GELU()]
            previous = out
        layers.append(nn.Conv2d(previous, width, 1))
        super().__init__(*layers)
        # He init keeps the signal's scale through the GELUs, and a linear-gain 1x1 conv gives
        # patch embeddings of std ~0.75 (the patchify conv gives ~0.6). PyTorch's default conv
        # init shrinks it to ~0.05 over four convs, so the position embedding (std 0.07)
        # drowned the image at first and the first ~100 steps learned next to nothing.
        convs = [m for m in self if isinstance(m, nn.Conv2d)]
        for conv in convs[:-1]:
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        nn.init.kaiming_normal_(convs[-1].weight, nonlinearity="linear")
        if convs[-1].bias is not None:
            nn.init.zeros_(convs[-1].bias)


def build_model(
    name_or_path: str = "tiny",
    *,
    patch_dropout: float = 0.0,
    patch_dropout_pattern: Pattern = "random",
    pretrained: str = "",
    temporal: str = "",
    temporal_shift: float | None = None,
) -> VisionLanguageModel:
    """Build a registered architecture with random init, or from an open_clip checkpoint file.

    `temporal` ("mean" or "transformer") overrides the kind of the architecture's temporal
    module, adding one with default settings to an architecture that has none;
    `temporal_shift` (a fraction of channels, see `TemporalConfig.shift`) overrides its shift."""
    cfg = get_model_config(name_or_path)
    temporal_cfg = cfg.get("temporal_cfg")
    if temporal:
        temporal_cfg = {**(temporal_cfg or {}), "kind": temporal}
    if temporal_shift is not None:
        temporal_cfg = {**(temporal_cfg or {}), "shift": temporal_shift}
    if patch_dropout and (temporal_cfg or {}).get("shift"):
        raise ValueError(
            "patch_dropout with a temporal shift: each frame keeps different patches, so the "
            "shifted channels would mix unrelated patches; use one or the other"
        )
    keys = ("init_logit_scale", "init_logit_bias", "fusion_cfg", "mae_cfg", "decoder_cfg")
    extra = {k: cfg[k] for k in keys if k in cfg}
    model = VisionLanguageModel(
        cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], temporal_cfg, **extra
    )
    if pretrained:
        from vlpt.models.weights import load_open_clip_weights

        load_open_clip_weights(model, pretrained)
    model.set_patch_dropout(patch_dropout, patch_dropout_pattern)
    return model
