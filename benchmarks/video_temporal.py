"""Video pretraining: temporal Transformer vs mean pooling, trained the same way, and memory.

Runs `vlpt pretrain` on the default video config and on its mean-pooling twin (one after the
other, same data, same budget), then reports each run's final evaluation on 1,000 val clips:
temporal-order accuracy (true vs reversed caption, true vs reversed clip), text-to-clip R@1/5,
zero-shot action accuracy, and resident memory (process + dataloader workers, logged by the
loop as `memory/rss_mb`) at 5 minutes and at the end, with the slope between them.

    make train && vlpt pretrain configs/pretrain/synthetic-tiny-masked.yaml
    vlpt data synth data/synthetic --video    # both configs start from the masked run's towers
    .venv/bin/python benchmarks/video_temporal.py [--minutes 18] [--only transformer|mean]

Prints one JSON line: {"bench": "video_temporal", "transformer": {...}, "mean": {...},
"settings": {...}}. The runs go to runs/bench-video-{transformer,mean}/ (resume=auto: an
interrupted benchmark continues where it stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "transformer": ROOT / "configs/pretrain/synthetic-video-tiny.yaml",
    "mean": ROOT / "configs/pretrain/synthetic-video-tiny-meanpool.yaml",
}
KEYS = (
    "temporal_text_acc",
    "temporal_video_acc",
    "t2i_r1",
    "t2i_r5",
    "i2t_r1",
    "zeroshot_action_top1",
)


def run(kind: str, minutes: float, extra: list[str]) -> dict:
    out = ROOT / f"runs/bench-video-{kind}"
    for override in extra:  # an output_dir override moves the run (and where its logs are)
        if override.startswith("output_dir="):
            out = Path(override.split("=", 1)[1]) / kind
            extra = [o for o in extra if o != override]
    cmd = [
        sys.executable,
        "-m",
        "vlpt.cli",
        "pretrain",
        str(CONFIGS[kind]),
        f"output_dir={out}",
        f"train.max_minutes={minutes}",
        "train.progress=false",
        *extra,
    ]
    done = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    final = json.loads(done.stdout.strip().splitlines()[-1])
    result: dict = {k: round(final[f"val/{k}"], 4) for k in KEYS if f"val/{k}" in final}
    result.update(
        {f"test_{k}": round(final[f"test/{k}"], 4) for k in KEYS[:3] if f"test/{k}" in final}
    )
    result["steps"], result["train_minutes"] = final["step"], round(final["train_minutes"], 2)
    result.update(memory_profile(out / "metrics.jsonl"))
    return result


def memory_profile(metrics: Path) -> dict:
    """RSS (MiB) at about 5 minutes and at the end of training, and the slope between them."""
    points = [
        (record["minutes"], record["memory/rss_mb"])
        for record in map(json.loads, metrics.read_text().splitlines())
        if "memory/rss_mb" in record and "minutes" in record
    ]
    if not points:
        return {}
    at5 = min(points, key=lambda p: abs(p[0] - 5.0))
    end = points[-1]
    slope = (end[1] - at5[1]) / (end[0] - at5[0]) if end[0] > at5[0] else 0.0
    return {
        "rss_mb_at_5min": round(at5[1], 1),
        "rss_mb_at_end": round(end[1], 1),
        "rss_end_minutes": round(end[0], 2),
        "rss_peak_mb": round(max(rss for _, rss in points), 1),
        "rss_slope_mb_per_min": round(slope, 2),
    }


def machine() -> str:
    """CPU and core count, and the GPU the runs trained on, if any."""
    import torch

    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return f"{cpu}, {torch.cuda.get_device_name()}" if torch.cuda.is_available() else cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=18.0, help="training budget per run")
    parser.add_argument("--only", choices=sorted(CONFIGS), help="run one of the two")
    parser.add_argument("overrides", nargs="*", help="extra key=value config overrides")
    args = parser.parse_args()
    kinds = [args.only] if args.only else ["transformer", "mean"]
    image_run = ROOT / "runs/synthetic-tiny"  # the configs' init
    if not image_run.exists() and not any(o.startswith("init=") for o in args.overrides):
        raise SystemExit(
            f"the video configs start from the image run {image_run}, which does not exist; "
            "run `make train` first (or pass init= to train from scratch)"
        )
    report = {"bench": "video_temporal"}
    for kind in kinds:
        report[kind] = run(kind, args.minutes, args.overrides)
    report["settings"] = {
        "configs": {k: str(CONFIGS[k].relative_to(ROOT)) for k in kinds},
        "minutes": args.minutes,
        "overrides": args.overrides,
        "machine": machine(),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
