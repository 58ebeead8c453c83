"""Fitting the run to its time limit: `train.max_minutes` with `train.fit_to_time`.

A config sized for one machine meets another that is slower: without this, the time limit stops
the run mid-schedule, at a high learning rate, before a curriculum's late stages or the unmasked
tuning phase (the default image run on a machine at 40% speed: val R@1 0.42 instead of 0.79).
Instead the loop measures the seconds per step over the first steps, and at that point and
one step after every later checkpoint (so the speed it measures includes a checkpoint write and
the restart of the data stream that follows it, which recur at every checkpoint) sets
`train.max_steps` to the steps that fit in the minutes left, so
the warmup + cosine schedule and every option given as a fraction of the run (frames curriculum,
`Source.start`, unmasked tuning) still run to their end. A later fit may raise the count again
when the first steps were slower than the rest (loader start-up, a busy machine), but never
above the configured `train.max_steps`: on a faster machine the run simply ends sooner. The
chosen count goes into the checkpoint, and a resumed run keeps it.

FLIP's unmasked tuning steps see every patch and are slower than the masked ones before them:
the fit prices each of them at `1 + model.patch_dropout` masked steps (measured: ~1.5x at 50% on
the tiny model), so the plan made from masked steps leaves them their time; a window that holds
both kinds is read with the same ratio.
"""

from __future__ import annotations

import math
from typing import Any

from vlpt.config import RunConfig

WARM_STEPS = 5
"""Steps left out of the first measurement (loader start-up, allocator warm-up)."""
CALIBRATION_STEPS = 20
"""Steps measured before the first fit."""
MARGIN = 0.95
"""Plan for 95% of the time left: the machine's speed wanders (the last checkpoint's write and
restart are in the measured speed; the first fit's window has none, hence the margin there)."""


def with_max_steps(cfg: RunConfig, max_steps: int) -> RunConfig:
    """`cfg` with `train.max_steps` replaced (everything that reads the run's length follows)."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": max_steps})})


class StepBudget:
    """Decides how many steps fit in `train.max_minutes`, from the step times it is shown.

    `observe(step, seconds)` after every step says whether the first fit is due; `fit(step,
    seconds, cap)` returns the steps that fit (never more than `cap`) and starts a new
    measurement window, so a later fit (after a checkpoint) uses the speed since the last one."""

    def __init__(self, cfg: RunConfig, start_step: int) -> None:
        self.enabled = cfg.train.fit_to_time and cfg.train.max_minutes > 0
        self.limit_seconds = 60 * cfg.train.max_minutes
        self.start_step = start_step
        self.mark: tuple[int, float] | None = None  # (step, seconds) the speed window began at
        self.fitted = False
        self.seconds_per_step = 0.0  # as last measured (a masked step's, with FLIP)
        dropout = cfg.model.patch_dropout
        self.tuning = cfg.model.unmasked_tuning if dropout > 0 else 0.0
        self.slowdown = 1.0 + dropout  # an unmasked tuning step, in masked steps

    def observe(self, step: int, seconds: float) -> bool:
        """Record the clock after `step`; True when the first fit is due."""
        if not self.enabled:
            return False
        if step == self.start_step + WARM_STEPS:
            self.mark = (step, seconds)
        return (
            not self.fitted and self.mark is not None and step == self.mark[0] + CALIBRATION_STEPS
        )

    def due_after_checkpoint(self) -> bool:
        """Later fits happen after checkpoints, once the first one has been made."""
        return self.enabled and self.fitted

    def fit(self, step: int, seconds: float, cap: int, planned: int | None = None) -> int:
        """Steps (in all, from step 0, at most `cap`) that end within the limit at the speed
        measured since the last fit; `planned` is the run length the measured steps ran under
        (it says which of them were unmasked tuning steps; default `cap`)."""
        assert self.mark is not None and step > self.mark[0], "fit() before any step was measured"
        units = self._units(self.mark[0], step, planned or cap)
        per_step = max((seconds - self.mark[1]) / units, 1e-9)
        self.mark, self.fitted, self.seconds_per_step = (step, seconds), True, per_step
        budget = MARGIN * max(self.limit_seconds - seconds, 0.0) / per_step
        n = min(cap, step + max(1, int(budget)))  # an upper bound: a step is >= 1 unit
        while n > step + 1 and self._units(step, n, n) > budget:
            n -= 1
        return n

    def _units(self, first: int, end: int, run_length: int) -> float:
        """Steps `first` .. `end - 1` of a run of `run_length` steps in masked-step units."""
        unmasked = max(0, end - max(first, tuning_start(self.tuning, run_length)))
        return (end - first - unmasked) + self.slowdown * unmasked


def tuning_start(unmasked_tuning: float, max_steps: int) -> int:
    """The first step of FLIP's unmasked tuning phase (`model.unmasked_tuning`: a number of
    steps when >= 1, else a fraction of the run) in a run of `max_steps`; `max_steps` if none."""
    steps = unmasked_tuning if unmasked_tuning >= 1 else unmasked_tuning * max_steps
    return math.ceil(max_steps - steps)


def planned_steps(cfg: RunConfig, saved: dict[str, Any]) -> int:
    """The run length a resumed run continues with: the checkpoint's fitted `max_steps` when it
    was fitted from the same configured `max_steps` (a user who changes `train.max_steps` on
    resume gets the new value)."""
    fitted = saved.get("max_steps")
    if fitted and saved.get("configured_max_steps") == cfg.train.max_steps:
        return min(int(fitted), cfg.train.max_steps)
    return cfg.train.max_steps
