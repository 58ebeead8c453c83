"""FLIP: val text->image R@1 against training minutes at 0%, 50% and 75% patch dropout.

    .venv/bin/python benchmarks/flip_curve.py [--minutes 10] [--unmasked-tuning 0.05] [--quick]
    .venv/bin/python benchmarks/flip_curve.py --speed-only --model base --batch-size 16 --calib-steps 9

For each dropout ratio, one after the other (never two runs at a time):
1. Calibrate: `--calib-steps` steps of `configs/pretrain/synthetic-tiny.yaml` at that ratio give
   its samples/s.
2. Race: a run whose `train.max_steps` is what that rate does in `--minutes`, so its cosine
   schedule ends on time at every ratio (`train.max_minutes` stops it if the machine slows
   down), evaluated on val every sixth of the way. Training minutes exclude evaluation.

Writes a PNG of the curves (`--png`, default benchmarks/results/flip_curve.png) and prints one
JSON line: per ratio samples/s (from the race's own metric windows), steps, final and best R@1
and the curve; `speedup_50` / `speedup_75` (samples/s over the 0% run's), `r1_gap_50` (final
R@1 at 50% minus at 0%) and `r1_gap_equal_minutes_50` ([minute, gap]: both curves interpolated
at the last minute both runs reached, as each run ends a little off its plan); `RATIO:grid`
runs add keys such as `r1_gap_50_grid`. The issue's targets: speedup_50 >= 1.6 and an R@1 gap
>= 0 at equal wall-clock.
With `--unmasked-tuning`, the tuning steps go at the unmasked speed: the dropout runs' steps are
sized from the 0% calibration too (list 0 first), their race samples/s mixes both phases, and
`speedup_calibrated_50` compares the calibrations alone (the dropout speed itself).
`--quick` shrinks everything (checks that the script works; its numbers mean nothing).

`--speed-only` runs only the calibrations and reports samples/s and the speedups (`--repeats N`:
N rounds in alternating order, A B B A ..., each round's speedup and their median), for any
`--model` (e.g. `base`, ViT-B/16 at 224 px, where the image tower is most of a step, as in
FLIP's setting; at the tiny size the text tower and the conv stem, which see every patch, cap
what dropping patches can save).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from vlpt.models.patch_dropout import PATTERNS

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/pretrain/synthetic-tiny.yaml"


def log(message: str) -> None:
    print(f"[flip_curve] {message}", file=sys.stderr, flush=True)


def run_pretrain(work: Path, name: str, overrides: list[str], threads: int) -> list[dict]:
    """`vlpt pretrain CONFIG overrides` as a subprocess; returns its metrics.jsonl records."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "vlpt.cli", "pretrain", CONFIG, *overrides]
    cmd += [f"output_dir={out}", "resume=", "train.progress=false", f"train.threads={threads}"]
    log(f"{name}: {shlex.join(cmd)}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    console = work / f"{name}.log"
    with console.open("w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"run '{name}' failed; see {console}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def samples_per_second(records: list[dict], discard_steps: int) -> float:
    """Training samples/s over the metric windows after the first `discard_steps` steps."""
    samples = seconds = 0.0
    previous_step, previous_samples = 0, 0
    for r in records:
        if "samples_per_s" not in r:
            continue
        n = r["samples"] - previous_samples
        if previous_step >= discard_steps:
            samples, seconds = samples + n, seconds + n / r["samples_per_s"]
        previous_step, previous_samples = r["step"], r["samples"]
    if not samples:
        raise RuntimeError(f"no metric window after step {discard_steps}")
    return samples / seconds


def eval_curve(records: list[dict]) -> list[tuple[float, float]]:
    """(training minutes, val t2i R@1) of every evaluation of a run."""
    return [(r["minutes"], r["eval/val/t2i_r1"]) for r in records if "eval/val/t2i_r1" in r]


Setting = tuple[float, str]  # (dropout ratio, model.patch_dropout_pattern)


def parse_setting(spec: str) -> Setting:
    """`0.5` (FLIP's random patches) or `0.5:grid` (see model.patch_dropout_pattern)."""
    ratio, _, pattern = spec.partition(":")
    if pattern and pattern not in PATTERNS:
        raise SystemExit(f"--ratios: unknown pattern {pattern!r} in {spec!r} (one of {PATTERNS})")
    return float(ratio), pattern or "random"


def run_name(setting: Setting) -> str:
    ratio, pattern = setting
    return f"drop{int(round(ratio * 100)):02d}" + ("" if pattern == "random" else f"-{pattern}")


def dropout_overrides(setting: Setting, unmasked_tuning: float = 0.0) -> list[str]:
    """The setting's dropout; the unmasked tuning phase only where asked for (the default
    config has one of its own)."""
    ratio, pattern = setting
    return [
        f"model.patch_dropout={ratio}",
        f"model.patch_dropout_pattern={pattern}",
        f"model.unmasked_tuning={unmasked_tuning if ratio > 0 else 0}",
    ]


def calibrate(args: argparse.Namespace, work: Path, setting: Setting, common: list[str]) -> float:
    """Training samples/s of a `--calib-steps` run at this dropout setting."""
    calib = run_pretrain(
        work,
        f"{run_name(setting)}-calibrate",
        [
            *common,
            *dropout_overrides(setting),
            f"train.max_steps={args.calib_steps}",
            "data.val=[]",
            "train.log_every=1",
        ],
        args.threads,
    )
    return samples_per_second(calib, discard_steps=args.calib_steps // 3)


def race(
    args: argparse.Namespace, work: Path, setting: Setting, common: list[str], unmasked_rate: float
) -> dict:
    """Calibrate, then train for `args.minutes` at this dropout ratio; the run's summary.

    `unmasked_rate` (samples/s at 0%, 0 if not measured) sizes the steps of a run with an
    unmasked tuning phase: those steps see every patch and go at the unmasked speed.
    """
    name, (ratio, pattern) = run_name(setting), setting
    dropout = dropout_overrides(setting, args.unmasked_tuning)
    rate = calibrate(args, work, setting, common)
    seconds_per_sample = 1 / rate
    if ratio > 0 and 0 < args.unmasked_tuning < 1 and unmasked_rate > 0:
        f = args.unmasked_tuning
        seconds_per_sample = (1 - f) / rate + f / unmasked_rate
    steps = max(6, int(args.minutes * 60 / seconds_per_sample / args.batch_size))
    records = run_pretrain(
        work,
        name,
        [
            *common,
            *dropout,
            f"train.max_steps={steps}",
            f"train.max_minutes={args.minutes * 1.1}",
            f"train.eval_every={max(1, steps // 6)}",
            f"train.ckpt_every={steps}",
        ],
        args.threads,
    )
    curve = eval_curve(records)
    return {
        "patch_dropout": ratio,
        "pattern": pattern,
        "calibrated_samples_per_s": round(rate, 1),
        "samples_per_s": round(samples_per_second(records, discard_steps=min(30, steps // 3)), 1),
        "steps": max(r["step"] for r in records),
        "final_r1": round(curve[-1][1], 4),
        "best_r1": round(max(r1 for _, r1 in curve), 4),
        "curve": [[round(m, 2), round(r1, 4)] for m, r1 in curve],
    }


def speed_only(
    args: argparse.Namespace, work: Path, settings: list[Setting], common: list[str]
) -> dict:
    """The calibrations alone: samples/s per ratio and each one's speedup over the first.
    With `--repeats N` the ratios run N times, every other round in reverse (A B B A A B ...),
    so that the machine's drift falls on both sides; each round gives its own speedups, and
    the reported ones are their medians (the samples/s: medians too)."""
    rounds: list[dict[str, float]] = []
    for i in range(args.repeats):
        order = settings if i % 2 == 0 else settings[::-1]
        rounds.append({run_name(s): calibrate(args, work, s, common) for s in order})
    names = [run_name(s) for s in settings]
    speedups = {r: [rates[r] / rates[names[0]] for rates in rounds] for r in names}
    result = {
        "benchmark": "flip_speed",
        "model": args.model or "config default",
        "batch_size": args.batch_size,
        "steps": args.calib_steps,
        "threads": args.threads,
        "repeats": args.repeats,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "samples_per_s": {
            r: round(statistics.median(rates[r] for rates in rounds), 2) for r in names
        },
        "speedup": {r: round(statistics.median(v), 3) for r, v in speedups.items()},
    }
    if args.repeats > 1:
        result["speedup_rounds"] = {r: [round(x, 3) for x in v] for r, v in speedups.items()}
    return result


def r1_at(curve: list[list[float]], minute: float) -> float:
    """A curve's R@1 at `minute`, linear between its evaluations (0 before the first)."""
    points = [(0.0, 0.0), *((m, r1) for m, r1 in curve)]
    for (m0, r0), (m1, r1) in zip(points, points[1:], strict=False):
        if m0 <= minute <= m1:
            return r0 + (r1 - r0) * (minute - m0) / (m1 - m0) if m1 > m0 else r1
    return points[-1][1]


def plot(runs: list[dict], path: Path, title: str, tuning: float = 0.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for run in runs:
        minutes, r1 = zip(*run["curve"])
        pattern = "" if run["pattern"] == "random" else f" {run['pattern']}"
        label = (
            f"{run['patch_dropout']:.0%}{pattern} dropout ({run['samples_per_s']:.0f} samples/s)"
        )
        if tuning and run["patch_dropout"] > 0:
            label += f", unmasked tuning {tuning:g}"
        ax.plot(minutes, r1, marker="o", label=label)
    ax.set_xlabel("training minutes")
    ax.set_ylabel("val text->image R@1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training minutes per ratio")
    parser.add_argument(
        "--ratios",
        default="0,0.5,0.75",
        help="patch dropout ratios to race; RATIO:grid for model.patch_dropout_pattern=grid",
    )
    parser.add_argument(
        "--unmasked-tuning",
        type=float,
        default=0.0,
        help="model.unmasked_tuning of the dropout runs (fraction or steps; 0 = none)",
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calib-steps", type=int, default=30)
    parser.add_argument("--data", default="data/synthetic", help="synthetic world folder")
    parser.add_argument("--png", default="benchmarks/results/flip_curve.png")
    parser.add_argument("--work-dir", default="", help="keep runs here (default: a temp folder)")
    parser.add_argument("--quick", action="store_true", help="tiny budget: checks the script")
    parser.add_argument("--model", default="", help="model.name (default: the config's tiny-conv)")
    parser.add_argument(
        "--speed-only", action="store_true", help="only the calibrations: samples/s per ratio"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="--speed-only rounds, alternating the order of the ratios; medians reported",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def main() -> None:
    args = _parse_args()
    common = [
        f"data.train={args.data}/train",
        f"data.val={args.data}/val",
        "data.test=[]",
        "eval.zeroshot=[]",
        f"train.batch_size={args.batch_size}",
        "train.log_every=10",
    ]
    if args.model:
        common.append(f"model.name={args.model}")
    if args.quick:
        args.minutes, args.calib_steps = 0.25, 6
        common += ["eval.max_items=100", "train.warmup_steps=2", "train.log_every=2"]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="flip-curve-"))
    work.mkdir(parents=True, exist_ok=True)
    settings = [parse_setting(r) for r in args.ratios.split(",")]
    names = [run_name(s) for s in settings]
    if len(set(names)) < len(names):
        raise SystemExit(f"--ratios names a setting twice: {args.ratios}")
    result = (
        speed_only(args, work, settings, common)
        if args.speed_only
        else curve_result(args, work, settings, common)
    )
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


def curve_result(
    args: argparse.Namespace, work: Path, settings: list[Setting], common: list[str]
) -> dict:
    """Race every ratio, plot the curves, and summarise them with the speedups and R@1 gaps."""
    runs: list[dict] = []
    for setting in settings:  # list 0 first: its speed sizes the unmasked tuning phases
        unmasked = next((r["calibrated_samples_per_s"] for r in runs if r["patch_dropout"] == 0), 0)
        runs.append(race(args, work, setting, common, unmasked))
    by_name = {run_name((run["patch_dropout"], run["pattern"])): run for run in runs}
    base = by_name.get("drop00")
    png = REPO / args.png
    model = args.model or "tiny-conv"
    title = f"FLIP on the synthetic world, {model}, {args.minutes:g} min per run"
    plot(runs, png, title, args.unmasked_tuning)
    result = {
        "benchmark": "flip_curve",
        "minutes": args.minutes,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "unmasked_tuning": args.unmasked_tuning,
        "quick": args.quick,
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "png": str(png.relative_to(REPO)) if png.is_relative_to(REPO) else str(png),
        "runs": runs,
    }
    if base is not None:
        for name, run in by_name.items():
            if run is base:
                continue
            key = name.removeprefix("drop").replace("-", "_")  # 50, 75, 50_grid
            result[f"speedup_{key}"] = round(run["samples_per_s"] / base["samples_per_s"], 3)
            result[f"speedup_calibrated_{key}"] = round(
                run["calibrated_samples_per_s"] / base["calibrated_samples_per_s"], 3
            )
            result[f"r1_gap_{key}"] = round(run["final_r1"] - base["final_r1"], 4)
            # Runs end a little apart (each is sized from its own calibration): the gap at the
            # minute both reached, each curve interpolated there.
            minute = min(run["curve"][-1][0], base["curve"][-1][0])
            result[f"r1_gap_equal_minutes_{key}"] = [
                minute,
                round(r1_at(run["curve"], minute) - r1_at(base["curve"], minute), 4),
            ]
    return result


if __name__ == "__main__":
    main()
