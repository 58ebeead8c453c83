"""Model architectures as data: JSON files in `configs/`, looked up by name.

A file holds open_clip's model config (`embed_dim`, `vision_cfg`, `text_cfg`) plus an optional
`description`. `vlpt models` lists them; a path to a JSON file works wherever a name does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).parent / "configs"


class UnknownModelError(ValueError):
    """The model name is neither registered nor a readable JSON file."""


def list_models() -> list[str]:
    """Names of the registered architectures, sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_model_config(name_or_path: str) -> dict[str, Any]:
    """The architecture dict for a registered name or a JSON file path."""
    path = Path(name_or_path)
    if not (path.suffix == ".json" and path.is_file()):
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise UnknownModelError(
            f"model '{name_or_path}' is not registered (known: {', '.join(list_models())}) "
            "and is not a JSON file; pick one of those names or pass a path to a config JSON."
        )
    cfg = json.loads(path.read_text())
    cfg.setdefault("description", "")
    return cfg
