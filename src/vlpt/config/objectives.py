"""The `objectives` section: the masked and generative objectives beside the contrastive loss."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from vlpt.config.fields import _at_least_one, _open_unit_interval, _positive, _Strict


class _PredictsTokens(_Strict):
    """An objective whose head predicts caption tokens (MLM, captioning), over a vocabulary."""

    vocabulary: Literal["model", "train"] = "model"
    """Tokens the head predicts. `model`: its own (the tokenizer's whole vocabulary, 49,408
    tokens, or the output vocabulary of the `init` checkpoint). `train`: the tokens of the
    training captions (of the first `vocabulary_samples` samples of each data.train source,
    read before training), as COCO captioning models predict over their training split's
    words; the vocabulary projection, at 49,408 a third to a half of a tiny model's step on
    CPU, then costs almost nothing. Saved with the weights: evaluation and generation predict
    over it too."""
    vocabulary_samples: int = 200_000
    """`vocabulary=train`: samples read per training source to collect the vocabulary."""

    _samples = field_validator("vocabulary_samples")(classmethod(lambda cls, v: _at_least_one(v)))


class MLMConfig(_PredictsTokens):
    """Masked language modelling of the caption through the fusion encoder (BERT 80/10/10)."""

    enabled: bool = False
    """Train with this objective (the model needs a fusion encoder: "fusion_cfg")."""
    weight: float = 1.0
    """Weight of `loss/mlm` in the total."""
    mask_ratio: float = 0.15
    """Fraction of each caption's word tokens selected for prediction (at least one)."""
    focus_words: list[str] = []
    """Words whose tokens are selected at `focus_ratio` instead of `mask_ratio` (object-token
    masking): the words only the image can fill in, e.g. colours, shapes, object names. Uniform
    masking spends most targets on words the caption itself gives away."""
    focus_ratio: float = 0.5
    """Selection probability of a `focus_words` token."""

    _ratio = field_validator("mask_ratio", "focus_ratio")(
        classmethod(lambda cls, v: _open_unit_interval(v))
    )


class ITMConfig(_Strict):
    """Image-text matching through the fusion encoder, hard negatives from the batch."""

    enabled: bool = False
    """Train with this objective (the model needs a fusion encoder: "fusion_cfg")."""
    weight: float = 1.0
    """Weight of `loss/itm` in the total."""
    swap_negatives: bool = False
    """Also score each image against its caption with one word swapped (the word groups of
    `loss.swap_negatives`): a negative the fusion encoder can only reject by reading what that
    word names in the visual tokens. Pairs become 1:3 (true, two hard negatives, the swap)."""


class MIMConfig(_Strict):
    """MAE-style masked image (video: tube) modelling with the model's pixel decoder."""

    enabled: bool = False
    """Train with this objective (the model needs an MAE decoder: "mae_cfg")."""
    weight: float = 1.0
    """Weight of `loss/mim` in the total."""
    mask_ratio: float = 0.75
    """Fraction of each image's patches hidden from the encoder."""

    _ratio = field_validator("mask_ratio")(classmethod(lambda cls, v: _open_unit_interval(v)))


class CaptionConfig(_PredictsTokens):
    """Captioning (CoCa-style): the caption decoder predicts each caption token from the ones
    before it and the visual tokens, teacher-forced, in the same pass as the contrastive loss."""

    enabled: bool = False
    """Train with this objective (the model needs a caption decoder: "decoder_cfg")."""
    weight: float = 1.0
    """Weight of `loss/caption` in the total (CoCa uses 2 beside a contrastive weight of 1)."""


class WordRegionConfig(_Strict):
    """Word-region alignment (FILIP's token-wise similarity for the listed words): each listed
    word of a caption is matched to its image's best patch against the batch's other images
    (those whose caption names the word too are not negatives). No head: the contrastive
    projections score words and patches."""

    enabled: bool = False
    """Train with this objective (any model: it reads the towers' per-token outputs)."""
    weight: float = 1.0
    """Weight of `loss/word_region` in the total."""
    words: list[str] = []
    """The words aligned to patches: what a region shows (colours, shapes, object names), not
    what only the whole picture says (positions, relations)."""
    temperature: float = 0.05
    """Softmax temperature of the word-image scores (cosine similarities)."""
    in_context: bool = True
    """Score each word by the text tower's state at its place in the caption (FILIP; "red"
    knows it is the triangle's colour). `false`: by the word's own embedding, the word alone as
    a caption, so a shape word says only the shape and a colour in the patch cannot stand in
    for it."""

    _temperature = field_validator("temperature")(classmethod(lambda cls, v: _positive(v)))

    @model_validator(mode="after")
    def _words_when_enabled(self) -> WordRegionConfig:
        if self.enabled and not self.words:
            raise ValueError("enabled with no words: list the words to align in `words`")
        return self


class ObjectivesConfig(_Strict):
    """Objectives trained beside the contrastive loss (`loss`), each switchable and weighted."""

    mlm: MLMConfig = MLMConfig()
    itm: ITMConfig = ITMConfig()
    mim: MIMConfig = MIMConfig()
    caption: CaptionConfig = CaptionConfig()
    word_region: WordRegionConfig = WordRegionConfig()
