"""The model a run config describes (one place for training, planning and checkpoint loading)."""

from __future__ import annotations

from vlpt.config import ConfigError, ModelConfig, RunConfig
from vlpt.data.vocabulary import CaptionVocabulary, caption_vocabulary
from vlpt.models import Tokenizer, VisionLanguageModel, build_model
from vlpt.models.output_vocabulary import OutputVocabulary
from vlpt.models.patch_dropout import GridError


def model_from_config(cfg: ModelConfig, *, pretrained: bool = True) -> VisionLanguageModel:
    """Build `cfg`'s architecture; `pretrained=False` skips the initial weights (a checkpoint
    will overwrite them anyway)."""
    try:
        model = build_model(
            cfg.name,
            patch_dropout=cfg.patch_dropout,
            patch_dropout_pattern=cfg.patch_dropout_pattern,
            pretrained=cfg.pretrained if pretrained else "",
            temporal=cfg.temporal,
            temporal_shift=cfg.temporal_shift,
        )
    except GridError as e:  # the config's ratio, on this model's patch grid
        raise ConfigError(
            f"model.patch_dropout={cfg.patch_dropout} with model.patch_dropout_pattern=grid on "
            f"{cfg.name}: {e}"
        ) from None
    model.set_length_groups(cfg.length_groups)
    return model


def set_output_vocabularies(
    model: VisionLanguageModel, cfg: RunConfig, tokenizer: Tokenizer
) -> list[str]:
    """With `objectives.caption.vocabulary=train` (or `objectives.mlm.vocabulary=train`),
    restrict the caption decoder's (the MLM head's) predictions to the tokens of the training
    captions; returns a console line per restricted head. Call after `build_objectives`, which
    checks that the model has the heads its enabled objectives train."""
    lines: list[str] = []
    read: dict[int, CaptionVocabulary] = {}  # by sample count: read the shards once for both
    for key, name in (("caption", "caption"), ("mlm", "MLM")):
        objective = getattr(cfg.objectives, key)
        if not (objective.enabled and objective.vocabulary == "train"):
            continue
        samples = objective.vocabulary_samples
        if samples not in read:
            read[samples] = caption_vocabulary(cfg.data.train, tokenizer, samples)
        vocab = read[samples]
        if not vocab.n_samples:
            raise ConfigError(
                f"objectives.{key}.vocabulary=train found no captioned sample in data.train; "
                f"check data.train or use objectives.{key}.vocabulary=model."
            )
        if key == "caption":
            head: OutputVocabulary = model.caption_decoder()
        else:
            assert model.fusion is not None
            head = model.fusion.mlm_head
        head.set_output_vocabulary(vocab.token_ids)
        lines.append(
            f"vlpt: {name} vocabulary: {len(vocab.token_ids)} tokens, the {vocab.n_words} "
            f"distinct words of {vocab.n_samples} training samples' captions"
        )
    return lines
