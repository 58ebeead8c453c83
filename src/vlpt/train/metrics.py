"""Where numbers go: JSONL (always), TensorBoard (optional), W&B (optional), rank 0 only; and
the training clock and per-log-line window of averages the loop fills them from."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any


class MetricsLogger:
    """Appends one JSON object per call to OUTPUT_DIR/metrics.jsonl and mirrors scalars."""

    def __init__(
        self, output_dir: Path, *, tensorboard: bool, wandb: bool, config: dict[str, Any]
    ) -> None:
        self.path = output_dir / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 (closed in close(); line-buffered: a kill loses no line)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output_dir / "tb"))
        self._wandb = None
        if wandb:
            import wandb as wb  # optional dependency

            self._wandb = wb.init(
                project="vlpt", dir=str(output_dir), config=config, resume="allow"
            )

    def log(self, step: int, values: dict[str, Any]) -> None:
        record = {"step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class NullLogger:
    """What ranks other than 0 log to."""

    def log(self, step: int, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def resident_memory_mb() -> float:
    """Resident memory of this process and its children (dataloader workers), in MiB.

    Read from /proc (Linux); elsewhere this process's peak RSS from `resource`, or 0.
    """
    try:
        return _proc_rss_kib(os.getpid(), recursive=True) / 1024
    except OSError:
        try:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        except (ImportError, OSError):
            return 0.0


def _proc_rss_kib(pid: int, recursive: bool) -> int:
    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
                break
    if recursive:
        for child in _children(pid):
            with contextlib.suppress(OSError):  # the child exited meanwhile
                rss += _proc_rss_kib(child, recursive=True)
    return rss


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def release_free_heap() -> None:
    """Hand the allocator's free memory back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Freed activations stay in the process heap; dataloader workers forked afterwards inherit it
    copy-on-write, and their own allocations dirty those pages, so each new data segment's
    worker would carry a private copy of the trainer's free heap (~1.4 GB on the video run)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Clock:
    """Training seconds so far: carried over from the checkpoint, minus time spent evaluating."""

    def __init__(self, carried: float = 0.0) -> None:
        self.started = time.monotonic() - carried

    def seconds(self) -> float:
        return time.monotonic() - self.started

    def exclude(self, seconds: float) -> None:
        self.started += seconds


class Window:
    """Metrics averaged over the steps since the last log line, with their throughput."""

    def __init__(self) -> None:
        self.sums: Counter = Counter()
        self.steps, self.samples, self.clock = 0, 0, Clock()

    def add(self, metrics: dict[str, float], samples: int) -> None:
        self.sums.update(metrics)
        self.steps += 1
        self.samples += samples

    def summary(self) -> dict[str, float]:
        return {
            **{k: v / self.steps for k, v in self.sums.items()},
            "samples_per_s": self.samples / max(self.clock.seconds(), 1e-9),
            "memory/rss_mb": resident_memory_mb(),
        }
