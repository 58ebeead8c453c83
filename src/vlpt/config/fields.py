"""What every config section shares: the error type, strict models, the field validators."""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A user-facing configuration problem; the message is one sentence that names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True
    )


def _below_one(v: float) -> float:
    """A fraction in [0, 1) (a start point, a dropout ratio)."""
    if not 0 <= v < 1:
        raise ValueError("must be >= 0 and < 1")
    return v


def _positive(v: float) -> float:
    """A strictly positive number (a sampling weight, a temperature)."""
    if v <= 0:
        raise ValueError("must be > 0")
    return v


def _at_least_one(v: int) -> int:
    """A count that must be positive (frames, steps, samples)."""
    if v < 1:
        raise ValueError("must be >= 1")
    return v


def _open_unit_interval(v: float) -> float:
    if not 0 < v < 1:
        raise ValueError("must be a fraction strictly between 0 and 1")
    return v


def grid_block(ratio: float) -> int:
    """The k of a `grid` pattern at `ratio`: 0 for the checkerboard (0.5), k for one kept patch
    in every k x k block (ratio 1 - 1/k^2). A ValueError names the ratios it supports."""
    if math.isclose(ratio, 0.5):
        return 0
    k = round(1 / math.sqrt(1 - ratio)) if 0 < ratio < 1 else 0
    if k >= 2 and math.isclose(ratio, 1 - 1 / k**2, abs_tol=1e-3):
        return k
    raise ValueError(
        f"grid patch dropout keeps a regular pattern: ratio 0.5 (a checkerboard) or 1 - 1/k^2 "
        f"(one patch per k x k block: 0.75, 0.889, 0.9375); got {ratio} (use the random pattern)"
    )
