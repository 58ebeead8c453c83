"""Checkpoints: one directory per step, written to a temporary name and renamed when complete.

Layout of `OUTPUT_DIR/checkpoints/step_00001000/`:
  model.safetensors   weights (the unwrapped model; loadable without vlpt's training code)
  optimizer.pt        AdamW state (torch.save of tensors; read back with weights_only=True)
  state.json          step, samples seen, data segment, RNG states, skip counts
  config.yaml         the resolved run config
  model.json          the architecture (registry JSON), so the checkpoint loads even when
                      `model.name` was a path that has since moved
  version.json        vlpt version and git commit of the code that wrote it
A folder only gets its final name after every file is on disk, so a kill mid-write leaves a
`.tmp-*` folder that `resume=auto` ignores (and removes).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import vlpt
from vlpt.models import VisionLanguageModel
from vlpt.train.build import model_from_config

REQUIRED_FILES = ("model.safetensors", "optimizer.pt", "state.json", "config.yaml", "version.json")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or unreadable."""


def code_version() -> dict[str, str]:
    """vlpt's version and, when run from a git checkout, the commit (with a dirty flag)."""
    info = {"vlpt": vlpt.__version__, "git": "unknown"}
    try:
        root = Path(__file__).resolve().parents[3]
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if sha.returncode == 0:
            info["git"] = sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    state = {
        "python": random.getstate()[1],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((3, tuple(state["python"]), None))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    config_yaml: str,
    keep: int = 2,
    architecture: dict[str, Any] | None = None,
) -> Path:
    """Write `ckpt_root/step_{step:08d}` atomically and prune old ones; returns the folder."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:08d}-", dir=ckpt_root))
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "rng": rng_state()}))
    (tmp / "config.yaml").write_text(config_yaml)
    if architecture is not None:
        (tmp / "model.json").write_text(json.dumps(architecture, indent=1))
    (tmp / "version.json").write_text(json.dumps(code_version()))
    for f in tmp.iterdir():  # data on disk before the rename makes the folder visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())


def is_complete(path: Path) -> bool:
    return all((path / f).is_file() and (path / f).stat().st_size > 0 for f in REQUIRED_FILES)


def find_resume_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones (cut off mid-write) are skipped."""
    for tmp in ckpt_root.glob(".tmp-*") if ckpt_root.is_dir() else []:
        shutil.rmtree(tmp, ignore_errors=True)
    for path in reversed(list_checkpoints(ckpt_root)):
        if is_complete(path):
            try:
                load_file(str(path / "model.safetensors"))
                json.loads((path / "state.json").read_text())
                return path
            except Exception:  # truncated file inside a folder someone copied by hand
                pass
        print(f"vlpt: skipping incomplete checkpoint {path}")
    return None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint folder (or a bare .safetensors file)."""
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(
            f"checkpoint '{path}' has no model.safetensors; pass a folder under OUTPUT_DIR/checkpoints/."
        )
    try:
        return load_file(str(file))
    except Exception as e:
        raise CheckpointError(
            f"checkpoint '{path}' is unreadable ({type(e).__name__}); it may have been cut off mid-write."
        ) from None


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Restore weights, optimiser and RNG from a checkpoint folder; returns its state.json."""
    if not is_complete(path):
        raise CheckpointError(
            f"checkpoint '{path}' is incomplete (needs {', '.join(REQUIRED_FILES)})."
        )
    try:
        model.load_state_dict(load_weights(path))
    except RuntimeError as error:  # torch lists every key; the first line says enough
        raise CheckpointError(
            f"checkpoint '{path}' holds another architecture than this run's model "
            f"({str(error).splitlines()[0].rstrip(':. ')}); resume it with the model.name it "
            "was trained with, or give this run another output_dir."
        ) from None
    if optimizer is not None:
        optimizer.load_state_dict(
            torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        )
    state = json.loads((path / "state.json").read_text())
    set_rng_state(state.pop("rng"))
    return state


def checkpoint_folder(path: str | Path) -> Path:
    """A checkpoint folder as given, or the newest complete checkpoint of a run folder."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint '{path}' is not a folder; pass OUTPUT_DIR/checkpoints/step_XXXXXXXX or OUTPUT_DIR."
        )
    if (path / "model.safetensors").is_file():
        return path
    newest = find_resume_checkpoint(path / "checkpoints")
    if newest is None:
        raise CheckpointError(
            f"'{path}' holds no complete checkpoint (model.safetensors + config.yaml)."
        )
    return newest


def load_trained_model(path: str | Path) -> tuple[VisionLanguageModel, Any]:
    """Rebuild the model a checkpoint folder was trained with and load its weights.

    Returns (model in eval mode, the run config). Used by `vlpt eval`, the demo and exports.
    """
    from vlpt.config import RunConfig, load_config

    path = checkpoint_folder(path)
    cfg = load_config(path / "config.yaml", model=RunConfig)
    if (path / "model.json").is_file():  # the architecture it was trained with, kept inside
        cfg.model = cfg.model.model_copy(update={"name": str(path / "model.json")})
    model = model_from_config(cfg.model, pretrained=False)
    model.load_state_dict(load_weights(path))
    return model.eval(), cfg
