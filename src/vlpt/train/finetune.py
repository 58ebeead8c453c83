"""Fine-tuning: the pretraining loop started from trained weights (`init`), with towers
optionally frozen (`finetune.freeze`) and layer-wise learning-rate decay (`finetune.layer_decay`,
applied by the optimiser).

`vlpt finetune CONFIG init=CKPT` differs from `vlpt pretrain` only in requiring `init`: the same
loop, run folder, checkpoints, logging and `resume=auto`. Task configs live in configs/finetune/.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed
from torch import nn

from vlpt.config import ConfigError, RunConfig
from vlpt.models import VisionLanguageModel, WeightsError
from vlpt.models.decoder_init import decoder_state_from_towers
from vlpt.models.fusion import FusionConfig
from vlpt.models.weights import read_state_dict
from vlpt.train.checkpoint import CheckpointError, checkpoint_folder

# Top-level parts of the model that may be absent from `init` and then start from random init:
# the heads a fine-tune adds (a caption decoder on a contrastive checkpoint), a temporal module
# added for clips, and SigLIP's bias (open_clip's CLIP checkpoints have none).
FRESH_PARTS = ("decoder", "fusion", "mae_decoder", "temporal", "logit_bias")
# Tensors whose size is data, not architecture: the output vocabularies (token ids) of the
# caption decoder and the MLM head take the size `init` gives them.
DATA_SIZED = ("decoder.output_tokens", "fusion.mlm_head.output_tokens")


class InitReport(NamedTuple):
    fresh: list[str]
    """Parts of the model not in `init`, left at their random init (e.g. `decoder`)."""
    ignored: list[str]
    """Parts of `init` the model has no place for (e.g. a `fusion` head), not loaded."""
    derived: str = ""
    """What of `init` the caption decoder was built from (`finetune.decoder_init`), if it was."""


def finetune(cfg: RunConfig) -> dict[str, Any]:
    """`pretrain(cfg)` after checking that `cfg.init` names readable weights."""
    from vlpt.train.loop import pretrain

    require_init(cfg)
    return pretrain(cfg)


def require_init(cfg: RunConfig) -> None:
    """A ConfigError when `cfg.init` is empty, a CheckpointError when it names nothing usable."""
    if not cfg.init:
        raise ConfigError(
            "vlpt finetune needs init=CHECKPOINT, the weights to start from (a checkpoint "
            "folder, a run folder or a weights file), e.g. init=runs/synthetic-tiny (the "
            "caption config starts from a masked run: init=runs/synthetic-tiny-masked)."
        )
    init_weights_file(cfg.init)


def init_weights_file(init: str | Path) -> Path:
    """The weights file `init` names: a checkpoint folder's (or a run folder's newest
    checkpoint's) model.safetensors, or the file itself."""
    path = Path(init)
    if not path.exists():
        raise CheckpointError(
            f"init '{path}' does not exist; pass a checkpoint folder "
            "(OUTPUT_DIR/checkpoints/step_XXXXXXXX), a run folder or a weights file."
        )
    return checkpoint_folder(path) / "model.safetensors" if path.is_dir() else path


def load_init_weights(
    model: VisionLanguageModel, init: str | Path, decoder_init: str = ""
) -> InitReport:
    """Load `init` (vlpt or open_clip names) into `model`, leaving `FRESH_PARTS` it lacks at
    their random init; with `decoder_init` ("text" or "fusion"), a caption decoder it lacks
    starts from its towers instead (`vlpt.models.decoder_init`). A tower tensor it lacks, a
    part it has only some tensors of, or any tensor of another shape, is a WeightsError
    naming the tensor."""
    file = init_weights_file(init)
    state = convert_to_custom_text_state_dict(read_state_dict(file))
    resize_pos_embed(state, model)  # a checkpoint trained at another resolution still loads
    own, held = model.state_dict(), _parts_in(state)
    for key, tensor in own.items():
        if key in state and state[key].shape != tensor.shape and key not in DATA_SIZED:
            raise WeightsError(
                f"init '{init}' does not fit model: '{key}' has shape {tuple(state[key].shape)}, "
                f"the model's {tuple(tensor.shape)}; check that model.name matches it."
            )
        if key not in state and key not in DATA_SIZED and _part(key) in held:
            raise WeightsError(
                f"init '{init}' has only part of the model's '{_part(key)}': it has no '{key}'; "
                "check that model.name matches the checkpoint's architecture."
            )
        if key not in state and _part(key) not in FRESH_PARTS:
            raise WeightsError(
                f"init '{init}' does not fit model: it has no '{key}'; check that model.name "
                "matches the checkpoint's architecture."
            )
    derived, used = "", set()  # what the decoder was built from, and the parts that fed it
    if decoder_init and "decoder" not in held:
        derived = _derive_decoder(model, state, decoder_init, file)
        used = {"fusion"} if decoder_init == "fusion" else set()
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return InitReport(
        fresh=sorted({_part(k) for k in own if k not in state and k not in DATA_SIZED}),
        ignored=sorted({_part(k) for k in state if k not in own} - used),
        derived=derived,
    )


def _parts_in(state: dict[str, Any]) -> set[str]:
    """The model parts `state` holds tensors of (data-sized buffers alone do not count)."""
    return {_part(k) for k in state if k not in DATA_SIZED}


def _derive_decoder(
    model: VisionLanguageModel, state: dict[str, Any], source: str, file: Path
) -> str:
    """Add `decoder.*` tensors built from `state`'s towers to `state`; the console phrase."""
    decoder = model.decoder
    if decoder is None:
        raise WeightsError(
            f"finetune.decoder_init={source} needs a model with a caption decoder "
            "(decoder_cfg in its registry config), e.g. tiny-conv-masked-caption."
        )
    if model.text.attn_mask is None:
        raise WeightsError(
            f"finetune.decoder_init={source}: the text tower attends both ways (no causal "
            "mask), so it cannot start a decoder that must not see the words ahead."
        )
    heads = {"text": model.text.heads, "fusion": _saved_fusion_heads(file)}
    try:
        built = decoder_state_from_towers(state, decoder.state_dict(), decoder.cfg, source, heads)
    except ValueError as error:
        raise WeightsError(f"init '{file}': {error}") from None
    state.update({f"decoder.{k}": v for k, v in built.items() if f"decoder.{k}" not in DATA_SIZED})
    return "text tower" + (" and fusion encoder" if source == "fusion" else "")


def _saved_fusion_heads(file: Path) -> int | None:
    """The fusion encoder's head count from the architecture JSON saved beside the weights (a
    vlpt checkpoint's model.json); None when there is none to read."""
    saved = file.parent / "model.json"
    try:
        fusion = json.loads(saved.read_text()).get("fusion_cfg")
    except (OSError, ValueError):
        return None
    return FusionConfig.from_dict(fusion).heads if isinstance(fusion, dict) else None


def _part(key: str) -> str:
    return key.split(".", 1)[0]


def describe_init(init: str, report: InitReport) -> str:
    """The console line about what `init` gave the model."""
    line = f"vlpt: initialised from {init}"
    if report.fresh:
        line += f"; not in it, freshly initialised: {', '.join(report.fresh)}"
    if report.derived:
        line += f"; caption decoder built from its {report.derived}"
    if report.ignored:
        line += f"; in it but not in this model, ignored: {', '.join(report.ignored)}"
    return line


def freeze_towers(model: VisionLanguageModel, towers: Sequence[str]) -> None:
    """No gradient (and so no optimiser state) for the named towers: `vision` (`.visual`, its
    projection included) and `text` (`.text`). The towers have no batch norm or dropout, so
    train mode changes nothing in them (patch dropout, a `model` option, aside) and they
    are not switched to eval mode."""
    parts: dict[str, nn.Module] = {"vision": model.visual, "text": model.text}
    for tower in towers:
        parts[tower].requires_grad_(False)
