"""The two-tower vision-language model: open_clip's ViT and text Transformer, plus temperature.

Parameter names match open_clip's `CustomTextCLIP` (`visual.*`, `text.*`, `logit_scale`,
`logit_bias`), so open_clip checkpoints load directly and exports need no renaming.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower, _build_vision_tower
from open_clip.transformer import text_global_pool
from torch import nn

from vlpt.models.registry import get_model_config
from vlpt.models.temporal import TemporalConfig, TemporalModule

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
        self.logit_scale = nn.Parameter(torch.tensor(init_logit_scale))
        # Only SigLIP reads the bias; it is kept for every model so checkpoints are uniform.
        self.logit_bias = nn.Parameter(torch.tensor(init_logit_bias))
        self.embed_dim = embed_dim
        self.image_size = int(vcfg.image_size)
        self.context_length = int(tcfg.context_length)
        self.image_mean, self.image_std = OPENAI_MEAN, OPENAI_STD

    def set_patch_dropout(self, ratio: float) -> None:
        """FLIP: drop this fraction of patch tokens in training (0 turns it off)."""
        from open_clip.transformer import PatchDropout

        self.visual.patch_dropout = PatchDropout(ratio) if ratio > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, 3, H, W) images or (B, T, 3, H, W) clips, normalised pixels -> (B, D) embeddings.

        Every frame goes through the image tower; the temporal module (mean pooling for a model
        without one) turns the (B, T, D) frame embeddings into one per clip."""
        if images.ndim == 5:
            batch, n_frames = images.shape[:2]
            frames = self.visual(images.flatten(0, 1)).unflatten(0, (batch, n_frames))
            features = self.temporal(frames) if self.temporal is not None else frames.mean(1)
        else:
            features = self.visual(images)
            if self.temporal is not None:
                features = self.temporal(features.unsqueeze(1))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """(B, L) token ids, 0-padded, L <= context_length -> (B, D) embeddings.

        Same result as open_clip's `TextTransformer.forward`, but it accepts batches cut to
        their longest caption (the tokenizer does that): with the causal mask, padding after the
        end token never changes the pooled feature, so computing it is wasted work.
        """
        tower = self.text
        length = tokens.shape[1]
        x = tower.token_embedding(tokens) + tower.positional_embedding[:length]
        mask = tower.attn_mask[:length, :length] if tower.attn_mask is not None else None
        x = tower.transformer(x, attn_mask=mask)  # (B, L', W)
        x = tower.ln_final(x)
        pooled = text_global_pool(x, tokens, pool_type=tower.pool_type)  # (B, W)
        if isinstance(tower.text_projection, nn.Linear):
            pooled = tower.text_projection(pooled)
        elif tower.text_projection is not None:
            pooled = pooled @ tower.text_projection
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "image_features": self.encode_image(images),  # (B, D)
            "text_features": self.encode_text(tokens),  # (B, D)
            "logit_scale": self.logit_scale.exp().clamp(max=100.0),
            "logit_bias": self.logit_bias,
        }


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


def build_model(
    name_or_path: str = "tiny",
    *,
    patch_dropout: float = 0.0,
    pretrained: str = "",
    temporal: str = "",
) -> VisionLanguageModel:
    """Build a registered architecture with random init, or from an open_clip checkpoint file.

    `temporal` ("mean" or "transformer") overrides the kind of the architecture's temporal
    module, adding one with default settings to an architecture that has none."""
    cfg = get_model_config(name_or_path)
    temporal_cfg = cfg.get("temporal_cfg")
    if temporal:
        temporal_cfg = {**(temporal_cfg or {}), "kind": temporal}
    extra = {k: cfg[k] for k in ("init_logit_scale", "init_logit_bias") if k in cfg}
    model = VisionLanguageModel(
        cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], temporal_cfg, **extra
    )
    if pretrained:
        from vlpt.models.weights import load_open_clip_weights

        load_open_clip_weights(model, pretrained)
    model.set_patch_dropout(patch_dropout)
    return model
