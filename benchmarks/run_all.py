"""Run the quick benchmarks one after the other and collect their JSON lines (`make bench`).

    .venv/bin/python benchmarks/run_all.py [--out benchmarks/results/results.jsonl]

Each script prints one JSON line; they are echoed and appended to `--out`. A script that fails
is reported and the others still run (exit status 1 at the end). The long ones train models for
many minutes and are run on their own (see benchmarks/README.md): train_vs_open_clip.py,
video_temporal.py, flip_curve.py, finetune_synthetic.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICK = (
    "matmul_peak.py",
    "attention_kernels.py",
    "loader_speed.py",
    "video_decode.py",
    "generation_speed.py",
    "generation_speed.py --vocabulary data/synthetic/train",  # the shipped caption decoder's
    "generation_speed.py --decoder coca-base",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "results/results.jsonl")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    failed = []
    for script in QUICK:
        name, *options = script.split()
        done = subprocess.run(
            [sys.executable, str(HERE / name), *options],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
        )
        lines = done.stdout.strip().splitlines()
        if done.returncode != 0 or not lines:
            failed.append(script)
            print(f"{script}: failed ({done.returncode}): {done.stderr.strip()[-500:]}", flush=True)
            continue
        result = json.loads(lines[-1])
        print(json.dumps(result), flush=True)
        with args.out.open("a") as out:
            out.write(json.dumps(result) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
