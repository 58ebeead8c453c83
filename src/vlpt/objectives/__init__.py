"""Training objectives: each an `nn.Module` mapping the model's outputs to named losses/metrics.

`forward(outputs, model=None, batch=None) -> dict`: keys starting with `loss/` are weighted
losses the loop sums; all other keys are detached metrics for logging. An objective declares
`needs` (extra model outputs, e.g. `visual_tokens`) and `heads` (the model heads it trains);
the objectives that run extra passes (fusion encoder, MAE decoder) call the model they are
given. Cross-rank communication lives inside each objective, so the loop knows no objective by
name: it calls `ModelWithObjectives(model, objectives)(batch)`.
"""

from __future__ import annotations

import torch
from torch import nn

from vlpt.config import ConfigError, RunConfig
from vlpt.models import VisionLanguageModel, get_tokenizer
from vlpt.objectives.caption import Captioning
from vlpt.objectives.contrastive import ClipLoss, SigLipLoss
from vlpt.objectives.gather import all_gather_with_grad, rank_and_world_size
from vlpt.objectives.itm import ImageTextMatching, sample_hard_negatives
from vlpt.objectives.mim import MaskedImageModeling, masked_reconstruction
from vlpt.objectives.mlm import MaskedLanguageModeling, mask_tokens
from vlpt.objectives.stack import ModelWithObjectives
from vlpt.objectives.word_region import WordRegionAlignment
from vlpt.objectives.word_swap import WordSwap


def build_objectives(cfg: RunConfig, model: VisionLanguageModel | None = None) -> nn.ModuleList:
    """The objectives a run trains with: the contrastive loss of `cfg.loss` (clip|siglip; none
    when its weight is 0) and every enabled entry of `cfg.objectives`. Given the `model`, an
    enabled objective whose head the model lacks is a ConfigError naming both."""
    objectives = [_contrastive(cfg)] if cfg.loss.weight > 0 else []
    masked = cfg.objectives
    enabled: dict[str, nn.Module] = {}
    if masked.mlm.enabled:
        enabled["mlm"] = _mlm(cfg)
    if masked.itm.enabled:
        swap = _word_swap(cfg) if masked.itm.swap_negatives else None
        enabled["itm"] = ImageTextMatching(masked.itm.weight, word_swap=swap)
    if masked.mim.enabled:
        enabled["mim"] = MaskedImageModeling(masked.mim.weight, masked.mim.mask_ratio)
    if masked.caption.enabled:
        enabled["caption"] = Captioning(masked.caption.weight)
    if masked.word_region.enabled:
        enabled["word_region"] = _word_region(cfg)
    for key, objective in enabled.items():
        if model is not None:
            _check_heads(f"objectives.{key}", objective, model, cfg.model.name)
        objectives.append(objective)
    if not objectives:
        raise ConfigError(
            "nothing to train: loss.weight is 0 and no objective is enabled; set loss.weight > 0 "
            "or enable one, e.g. objectives.caption.enabled=true."
        )
    return nn.ModuleList(objectives)


def _contrastive(cfg: RunConfig) -> nn.Module:
    loss = cfg.loss
    if loss.name == "clip":
        return ClipLoss(
            weight=loss.weight,
            local_loss=loss.local_loss,
            reversed_negatives=loss.reversed_negatives,
            word_swap=_word_swap(cfg) if loss.swap_negatives else None,
        )
    if loss.name == "siglip":
        return SigLipLoss(weight=loss.weight)
    # unreachable through RunConfig validation; kept for configs built by hand
    raise ValueError(f"loss.name '{loss.name}' is unknown; use 'clip' or 'siglip'.")


def _mlm(cfg: RunConfig) -> MaskedLanguageModeling:
    mlm = cfg.objectives.mlm
    focus = _word_ids(cfg, mlm.focus_words) if mlm.focus_words else None
    return MaskedLanguageModeling(mlm.weight, mlm.mask_ratio, focus, mlm.focus_ratio)


def _word_ids(cfg: RunConfig, words: list[str]) -> torch.Tensor:
    """The token ids of `words` (without the start and end tokens), sorted."""
    tokenizer = get_tokenizer(cfg.model.name)
    return torch.tensor(sorted(tokenizer.token_ids(words) - {tokenizer.sot_id, tokenizer.eot_id}))


def _word_region(cfg: RunConfig) -> WordRegionAlignment:
    region = cfg.objectives.word_region
    ids = _word_ids(cfg, region.words)
    alone = None
    if not region.in_context:
        tokenizer = get_tokenizer(cfg.model.name)
        sot, eot = torch.full_like(ids, tokenizer.sot_id), torch.full_like(ids, tokenizer.eot_id)
        alone = torch.stack([sot, ids, eot], dim=1)
    return WordRegionAlignment(ids, region.weight, region.temperature, alone)


def _word_swap(cfg: RunConfig) -> WordSwap:
    return WordSwap.from_words(cfg.loss.swap_negatives, get_tokenizer(cfg.model.name))


# A head an objective trains -> (what it is, its registry JSON key, a model that has it).
_HEADS = {
    "fusion": ("fusion encoder", "fusion_cfg", "tiny-masked"),
    "mae_decoder": ("MAE decoder", "mae_cfg", "tiny-masked"),
    "decoder": ("caption decoder", "decoder_cfg", "tiny-conv-caption"),
}


def _check_heads(
    key: str, objective: nn.Module, model: VisionLanguageModel, model_name: str
) -> None:
    missing = [h for h in getattr(objective, "heads", ()) if h not in model.heads()]
    if missing:
        # mlm_head / itm_head live inside the fusion encoder: name the encoder.
        head, entry, example = _HEADS.get(missing[0], _HEADS["fusion"])
        raise ConfigError(
            f"config enables {key}, but model '{model_name}' has no {head} (its JSON has "
            f'no "{entry}"); use a model with that head, e.g. model.name={example}, or set '
            f"{key}.enabled=false."
        )


__all__ = [
    "Captioning",
    "ClipLoss",
    "ImageTextMatching",
    "MaskedImageModeling",
    "MaskedLanguageModeling",
    "ModelWithObjectives",
    "SigLipLoss",
    "WordRegionAlignment",
    "WordSwap",
    "all_gather_with_grad",
    "build_objectives",
    "mask_tokens",
    "masked_reconstruction",
    "rank_and_world_size",
    "sample_hard_negatives",
]
