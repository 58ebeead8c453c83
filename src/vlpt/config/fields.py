"""What every config section shares: the error type, strict models, the field validators."""

from __future__ import annotations

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
