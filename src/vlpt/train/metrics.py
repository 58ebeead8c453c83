"""Where numbers go: JSONL (always), TensorBoard (optional), W&B (optional). Rank 0 only."""

from __future__ import annotations

import json
import time
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
