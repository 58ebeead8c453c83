"""A run configuration from a YAML file plus dotted `key=value` overrides, and back to YAML.

Errors name the key in one sentence (`ConfigError`), with a did-you-mean for unknown keys.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from vlpt.config.fields import ConfigError
from vlpt.config.schema import RunConfig


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.strip().split("."), value


def _set_dotted(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = value


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, prefix + name + "."))
    return keys


def _explain(err: ValidationError, model: type[BaseModel], origin: str) -> ConfigError:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, _known_keys(model), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return ConfigError(f"{origin}: config key '{key}' does not exist{hint}.")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error" and isinstance(first.get("input"), dict):
        # A check across fields of a section: its message names them; the section's whole
        # value would only bury it.
        return ConfigError(f"{origin}: {message}.")
    got = first.get("input")
    return ConfigError(f"{origin}: config key '{key}' = {got!r} is invalid: {message}.")


def load_config(
    path: str | Path | None, overrides: Sequence[str] = (), model: type[BaseModel] = RunConfig
) -> Any:
    """Read a YAML config, apply dotted overrides, validate; raise ConfigError on any problem."""
    tree: dict = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        origin = str(p)
        if not p.is_file():
            raise ConfigError(
                f"config file '{p}' does not exist; pass a YAML file such as configs/pretrain/synthetic-tiny.yaml."
            )
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(
                f"config file '{p}' is not valid YAML ({e.__class__.__name__}: {str(e).splitlines()[0]})."
            ) from None
        if not isinstance(tree, dict):
            raise ConfigError(
                f"config file '{p}' must hold a mapping of keys, not {type(tree).__name__}."
            )
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(tree, keys, value)
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        raise _explain(e, model, origin) from None


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (written to the run folder and every checkpoint)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
