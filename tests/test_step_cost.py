"""`benchmarks/step_cost.py`: prices every variant of a config on the same batches."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

MICRO_MASKED = str(ROOT / "tests/fixtures/micro-masked.json")


def test_step_cost_times_each_variant_and_reports_speedups(synth_world):
    common = (
        f"model.name={MICRO_MASKED} data.train={synth_world / 'train'} train.batch_size=16 "
        "data.shuffle_buffer=50"
    )
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks/step_cost.py"),
        str(ROOT / "configs/pretrain/synthetic-tiny-masked.yaml"),
        "--variant",
        f"{common} model.length_groups=1",
        "--variant",
        common,
        "--steps",
        "2",
        "--threads",
        "1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "step_cost" and result["batch_size"] == 16
    assert len(result["text_length"]) == 3  # the warm-up batch and two timed ones
    first, second = result["variants"]
    assert first["speedup"] == 1.0 and first["overrides"].endswith("model.length_groups=1")
    assert second["step_s"] > 0
    assert abs(second["speedup"] - first["step_s"] / second["step_s"]) < 0.01
