"""The model a run config describes (one place for training, planning and checkpoint loading)."""

from __future__ import annotations

from vlpt.config import ConfigError, ModelConfig, RunConfig
from vlpt.data.vocabulary import caption_vocabulary
from vlpt.models import Tokenizer, VisionLanguageModel, build_model


def model_from_config(cfg: ModelConfig, *, pretrained: bool = True) -> VisionLanguageModel:
    """Build `cfg`'s architecture; `pretrained=False` skips the initial weights (a checkpoint
    will overwrite them anyway)."""
    return build_model(
        cfg.name,
        patch_dropout=cfg.patch_dropout,
        pretrained=cfg.pretrained if pretrained else "",
        temporal=cfg.temporal,
        temporal_shift=cfg.temporal_shift,
    )


def set_caption_vocabulary(
    model: VisionLanguageModel, cfg: RunConfig, tokenizer: Tokenizer
) -> str | None:
    """With `objectives.caption.vocabulary=train`, restrict the caption decoder's predictions to
    the tokens of the training captions; returns the console line about it (None otherwise)."""
    caption = cfg.objectives.caption
    if not (caption.enabled and caption.vocabulary == "train"):
        return None
    vocab = caption_vocabulary(cfg.data.train, tokenizer, caption.vocabulary_samples)
    if not vocab.n_samples:
        raise ConfigError(
            "objectives.caption.vocabulary=train found no captioned sample in data.train; "
            "check data.train or use objectives.caption.vocabulary=model."
        )
    model.caption_decoder().set_output_vocabulary(vocab.token_ids)
    return (
        f"vlpt: caption vocabulary: {len(vocab.token_ids)} tokens, the {vocab.n_words} distinct "
        f"words of {vocab.n_samples} training samples' captions"
    )
