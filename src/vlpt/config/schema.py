"""The typed sections of a run configuration, one pydantic model each, a docstring per field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import field_validator, model_validator

from vlpt.config.fields import _at_least_one, _below_one, _positive, _Strict, grid_block
from vlpt.config.objectives import ObjectivesConfig


class Source(_Strict):
    """One stream of shards."""

    url: str
    """Shard pattern: a folder of .tar files, a brace pattern (`/d/{00000..00099}.tar`), an
    `http(s)://` URL or a `pipe:` command; several patterns may be joined with `::`."""
    weight: float = 1.0
    """Relative sampling weight when several sources are mixed."""
    start: float = 0.0
    """Training sources only: the fraction of `train.max_steps` from which this source joins
    the mix (a curriculum: e.g. images from 0, videos from 0.4). Reaching it starts a new data
    segment with a checkpoint; some source must start at 0."""

    _weight = field_validator("weight")(classmethod(lambda cls, v: _positive(v)))

    _start_fraction = field_validator("start")(classmethod(lambda cls, v: _below_one(v)))


def _as_sources(v: Any) -> Any:
    """Accept `"pattern"`, `["p1", "p2"]`, `[{"url": .., "weight": ..}]` or `"p1::p2"`."""
    if v is None:
        return []
    if isinstance(v, str):
        return [{"url": v}]
    if isinstance(v, list):
        return [{"url": s} if isinstance(s, str) else s for s in v]
    return v


class DataConfig(_Strict):
    """Where samples come from and how they are turned into tensors."""

    train: list[Source] = []
    """Training sources (shard patterns with weights); streamed with resampling."""
    val: list[Source] = []
    """Validation shards for periodic evaluation (read once, in order)."""
    test: list[Source] = []
    """Optional test shards (e.g. unseen attribute combinations), evaluated at the end."""
    workers: int = 1
    """Dataloader worker processes per rank (0 = decode in the training process)."""
    shuffle_buffer: int = 2000
    """Samples held in the shuffle buffer of each worker."""
    resampled: bool = True
    """Draw shards with replacement forever (epochs are then measured in samples)."""
    epoch_samples: int = 0
    """Samples that make one epoch when resampling (0 = read from sizes.json / not needed)."""
    crop_scale: tuple[float, float] = (0.9, 1.0)
    """Random-resized-crop area range for training images."""
    max_image_pixels: int = 64_000_000
    """Images larger than this (width*height) are skipped as decompression bombs."""
    num_frames: int = 8
    """Frames per video clip: one from each of this many equal segments of the clip (a random
    frame in training, the middle one in evaluation). Image samples stay single frames."""
    frames_curriculum: list[tuple[float, int]] = []
    """Few frames first: `[[fraction, frames], ...]` (fractions of `train.max_steps`, rising); from
    each fraction on, clips have that many frames, e.g. `[[0, 2], [0.4, 4]]`. Empty: always
    `num_frames`. A stage change starts a new data segment and writes a checkpoint."""
    reversed_pairs: bool = False
    """Clips whose json carries `reversed_captions` (the captions of the clip played backwards)
    enter the batch twice: as they are with a caption, and played backwards with the matching
    reversed caption. Each is then the other's hardest negative in both directions (text->clip
    and clip->text), at the cost of one clip; the batch holds batch_size / 2 distinct clips.
    Clips without reversed captions enter once, and a pair after one can straddle two batches."""
    twin_pairs: bool = False
    """Images that carry a hard-negative twin (`twin.jpg` with json `twin_captions`: the same
    scene with one thing changed, as TripletCLIP's negative images; `vlpt data synth --twins`
    writes them) enter the batch with it, both with the caption at the same index and the same
    crop: each is the other's hardest negative both ways, and the one thing that differs must
    be seen to tell them apart. The batch holds batch_size / 2 distinct scenes.
    Needs an even batch size."""
    seed: int = 0
    """Seed for shard order and shuffling."""

    _split_sources = field_validator("train", "val", "test", mode="before")(
        classmethod(lambda cls, v: _as_sources(v))
    )

    @field_validator("train")
    @classmethod
    def _one_source_from_the_start(cls, v: list[Source]) -> list[Source]:
        if v and min(source.start for source in v) > 0:
            raise ValueError(
                "some training source must start at 0 (start is a fraction of the run)"
            )
        return v

    @field_validator("workers", "shuffle_buffer", "epoch_samples")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    _frames = field_validator("num_frames")(classmethod(lambda cls, v: _at_least_one(v)))

    @field_validator("frames_curriculum")
    @classmethod
    def _rising_stages(cls, v: list[tuple[float, int]]) -> list[tuple[float, int]]:
        fractions = [fraction for fraction, _ in v]
        if any(not 0 <= f <= 1 for f in fractions) or fractions != sorted(fractions):
            raise ValueError("stage fractions must rise within [0, 1]")
        if any(frames < 1 for _, frames in v):
            raise ValueError("every stage needs >= 1 frame")
        return v


class ModelConfig(_Strict):
    """Which architecture to build and where its weights come from."""

    name: str = "tiny"
    """Registered model name (see `vlpt models`): tiny, small, base, large, or a path to a JSON."""
    pretrained: str = ""
    """Optional open_clip checkpoint file (.pt/.bin/.safetensors) to initialise from."""
    patch_dropout: float = 0.0
    """FLIP: fraction of image patches dropped during training (0 disables)."""
    patch_dropout_pattern: Literal["random", "grid"] = "random"
    """Which patches FLIP drops: `random` (FLIP's rule: a uniformly random subset per image) or
    `grid` (a regular pattern at a random phase per image: a checkerboard at 0.5, one patch per
    k x k block at 1 - 1/k^2, so no region loses all its patches; the model's patch grid must
    divide into those blocks)."""
    unmasked_tuning: float = 0.0
    """FLIP's unmasked tuning phase: train the last steps with patch dropout off. A value >= 1
    is a number of steps, one in (0, 1) a fraction of train.max_steps; 0 = no such phase."""
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    length_groups: int = 4
    """Run the text tower and the fusion encoder in this many groups of similar caption length,
    each cut to its own longest caption (exact; ~0.66 of the padded text-side work at 4 on the
    synthetic captions). 1 = the whole batch at its longest caption."""
    temporal: Literal["", "mean", "transformer"] = ""
    """Temporal module for clips: `transformer` (temporal positions + a small Transformer over
    frame embeddings), `mean` (order-blind pooling, the baseline), or "" for the architecture's
    own choice (none for image models, which then mean-pool clips)."""
    temporal_shift: float | None = None
    """`transformer` only: fraction of the image tower's channels shifted between neighbouring
    frames (TSM; 0.25 is TSM's setting), so patches see motion; None = the architecture's own."""

    _dropout_fraction = field_validator("patch_dropout")(classmethod(lambda cls, v: _below_one(v)))
    _groups = field_validator("length_groups")(classmethod(lambda cls, v: _at_least_one(v)))

    @field_validator("unmasked_tuning")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be >= 0")
        return v

    @model_validator(mode="after")
    def _grid_ratio(self) -> ModelConfig:
        if self.patch_dropout and self.patch_dropout_pattern == "grid":
            try:
                grid_block(self.patch_dropout)
            except ValueError as e:
                raise ValueError(
                    f"patch_dropout={self.patch_dropout} with the grid pattern: {e}"
                ) from None
        return self

    @model_validator(mode="after")
    def _shift_alone(self) -> ModelConfig:
        # The shift's hooks know a pass's frames only while it runs: blocks recomputed in the
        # backward pass would see none; dropped patches differ from frame to frame.
        if self.temporal_shift:
            if self.temporal == "mean":
                raise ValueError(
                    "model.temporal_shift needs model.temporal=transformer (mean pooling is the "
                    "order-blind baseline); set model.temporal_shift=0 with model.temporal=mean"
                )
            for name in ("patch_dropout", "grad_checkpointing"):
                if getattr(self, name):
                    raise ValueError(
                        f"model.temporal_shift cannot be combined with model.{name}; use one"
                    )
        return self


class LossConfig(_Strict):
    """Contrastive objective."""

    name: Literal["clip", "siglip"] = "clip"
    """`clip` (InfoNCE, softmax) or `siglip` (pairwise sigmoid)."""
    weight: float = 1.0
    """Weight of this loss in the total; 0 turns it off (not computed, and the text tower and
    temperature, which nothing else reads, are frozen), e.g. for caption fine-tuning."""
    local_loss: bool = False
    """CLIP only: compute logits of the local batch against all gathered features (saves memory)."""
    reversed_negatives: bool = False
    """CLIP only, clips: each clip played backwards is an extra text->clip negative (time-reversal
    hard negatives), so captions must tell a clip from its reversal; image batches unchanged."""
    swap_negatives: list[list[str]] = []
    """CLIP only: groups of interchangeable single-token words (e.g. `[[circle, square, star],
    [red, blue, green]]`). Each caption with one of its group words replaced by another member
    becomes an extra image->text negative (NegCLIP's word-swap hard negatives), so the image
    must encode what that word names. Empty (default): none. Costs one more text-tower pass."""

    @field_validator("weight")
    @classmethod
    def _non_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be >= 0 (0 turns the contrastive loss off)")
        return v

    @model_validator(mode="after")
    def _clip_only_options(self) -> LossConfig:
        if self.name != "clip":
            for key in ("local_loss", "reversed_negatives", "swap_negatives"):
                if getattr(self, key):
                    raise ValueError(f"loss.{key} is an option of the clip loss, not {self.name}")
        return self


class FinetuneConfig(_Strict):
    """What fine-tuning changes about training (used with a top-level `init` checkpoint)."""

    freeze: list[Literal["vision", "text"]] = []
    """Towers that get no gradient and no optimiser state: `vision` (the ViT with its
    projection; a temporal module stays trainable) and/or `text` (the text Transformer with its
    token table and projection). `[vision]` is LiT (locked-image tuning); `[vision, text]` trains
    only the heads. The towers have no batch norm and no dropout, so frozen is frozen in either
    mode: no eval-mode switch is needed."""
    layer_decay: float = 1.0
    """Layer-wise learning-rate decay (BEiT, BLIP fine-tuning): the last residual block of each
    tower trains at `train.lr * layer_decay`, each block below at one more factor, the
    embeddings at `layer_decay ** (layers + 1)`; the heads, the towers' final norm and
    projection and the temperature at `train.lr`. 1.0 = one learning rate for all."""
    decoder_init: Literal["", "text", "fusion"] = ""
    """Start a caption decoder that `init` lacks from `init`'s own towers instead of random
    init: `text` copies the text tower into the decoder's blocks (CoCa: the decoder's lower
    layers are the text tower), `fusion` the text tower and, above it, a masked run's fusion
    encoder (BLIP starts its decoder from its fusion encoder), which already ties caption words
    to image tokens. The decoder must have one block per copied block (`decoder_cfg.layers`,
    and `mid_norm` = text blocks for `fusion`: model `tiny-conv-masked-caption` fits
    `tiny-conv-masked`). "" = random init. A decoder that `init` has is loaded as it is."""

    @field_validator("freeze")
    @classmethod
    def _no_repeats(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("list each tower at most once")
        return v

    @field_validator("layer_decay")
    @classmethod
    def _decay_fraction(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError("must be > 0 and <= 1")
        return v


class TrainConfig(_Strict):
    """Optimisation and the shape of the run."""

    batch_size: int = 128
    """Samples per rank per optimiser step (before gradient accumulation)."""
    accum_steps: int = 1
    """Micro-batches accumulated per optimiser step."""
    max_steps: int = 1000
    """Stop after this many optimiser steps."""
    max_minutes: float = 0.0
    """Stop after this many minutes of training (0 = no limit); evaluation time is not counted."""
    fit_to_time: bool = True
    """With max_minutes set: after the first 25 steps (and again after every checkpoint), set
    max_steps to the steps that fit in the minutes left at the measured speed, so the LR schedule,
    curricula and unmasked tuning run to their end on a slower machine (never above the
    configured max_steps; the chosen count is kept in the checkpoint). False: the schedule is
    built for max_steps and max_minutes only stops the run."""
    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak (cosine floor)."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    lr_scale: dict[str, float] = {}
    """Learning-rate multipliers by parameter-name prefix, whole dotted components (`fusion`,
    `fusion.itm_head`, `mae_decoder`, `visual`, ...): e.g. `{fusion: 3}` trains the fusion
    encoder and its heads at 3x the scheduled rate (fresh heads on pretrained towers). The
    longest matching prefix wins; it multiplies `finetune.layer_decay`'s scale. A prefix that
    names no parameter of the model is an error when the optimiser is built."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to biases, norms, embeddings, temperature)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Autocast dtype for the forward pass; parameters and optimiser stay fp32."""
    compile: bool = False
    """Wrap the model in torch.compile."""
    attention: Literal["auto", "math", "flash", "efficient", "default"] = "auto"
    """Scaled-dot-product attention kernel. `auto`: the plain matmul-softmax kernel on CPU (1.5x
    faster than the CPU flash kernel at ViT/caption lengths), torch's own choice on CUDA."""
    threads: int = 0
    """torch intra-op threads per process (0 = torch default)."""
    seed: int = 0
    """Seed for model init and every RNG."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    eval_every: int = 0
    """Evaluate on data.val every this many steps (0 = only at the end)."""
    ckpt_every: int = 500
    """Write a checkpoint every this many steps (and always at the end)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    progress: bool = True
    """Show a progress bar on the console."""
    tensorboard: bool = True
    """Write TensorBoard event files to OUTPUT_DIR/tb."""
    wandb: bool = False
    """Log to Weights & Biases (needs `pip install wandb` and a login)."""

    _counts = field_validator("batch_size", "accum_steps", "max_steps")(
        classmethod(lambda cls, v: _at_least_one(v))
    )

    @field_validator("lr_scale")
    @classmethod
    def _positive_scales(cls, v: dict[str, float]) -> dict[str, float]:
        for prefix, scale in v.items():
            if scale <= 0:
                raise ValueError(
                    f"train.lr_scale.{prefix} = {scale} must be > 0 (to leave a tower "
                    "untrained: finetune.freeze)"
                )
        return v


class EvalConfig(_Strict):
    """Evaluation during and after training."""

    batch_size: int = 256
    """Batch size for embedding the evaluation sets."""
    max_items: int = 1000
    """Evaluate on at most this many val items (all captions of each are queries)."""
    zeroshot: list[str] = ["shape", "colour"]
    """Zero-shot classification tasks to report (synthetic world attributes)."""
    rerank_k: int = 0
    """Also report retrieval re-ranked by the ITM head over the contrastive top k (`{split}/
    rerank/...`; needs a fusion encoder); 0 = off."""

    @field_validator("rerank_k")
    @classmethod
    def _non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be >= 0")
        return v


class RunConfig(_Strict):
    """A whole pretraining run."""

    output_dir: str = "runs/default"
    """Run folder: checkpoints/, metrics.jsonl, tb/, config.yaml."""
    resume: str = ""
    """`auto` = continue from the last checkpoint in output_dir; or a checkpoint folder; or empty."""
    init: str = ""
    """Start from these weights (fine-tuning; `vlpt finetune` requires it): a vlpt checkpoint
    folder, a run folder (its newest checkpoint), a model.safetensors, or an open_clip weights
    file. Heads of `model.name` that it lacks (e.g. a caption decoder) start from random init
    and are listed on the console; a tower tensor that is missing or of another shape is an
    error naming it. `resume` (a checkpoint of this run) takes precedence over it."""
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    objectives: ObjectivesConfig = ObjectivesConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _itm_swaps_have_words(self) -> RunConfig:
        if self.objectives.itm.swap_negatives and not self.loss.swap_negatives:
            raise ValueError(
                "objectives.itm.swap_negatives swaps the words of loss.swap_negatives, which is "
                "empty: give it the word groups, e.g. loss.swap_negatives='[[circle, square]]'"
            )
        return self

    @model_validator(mode="after")
    def _pairs_fit_in_a_batch(self) -> RunConfig:
        if self.data.reversed_pairs and self.train.batch_size % 2:
            raise ValueError(
                f"data.reversed_pairs puts each clip and its reversal in one batch, so "
                f"train.batch_size must be even (got {self.train.batch_size})"
            )
        if self.data.twin_pairs and self.train.batch_size % 2:
            raise ValueError(
                f"data.twin_pairs puts each image and its twin in one batch, so "
                f"train.batch_size must be even (got {self.train.batch_size})"
            )
        return self
