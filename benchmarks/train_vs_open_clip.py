"""vlpt's trainer side by side with open_clip's own trainer (`open_clip_train`): same shards, same
model, same hyperparameters, one JSON line.

    .venv/bin/python benchmarks/train_vs_open_clip.py [--minutes 10] [--quick]

Three measurements, every training run a subprocess of its own, never two at a time:

1. Throughput. `--steps` (60) optimiser steps on each side with identical settings (vlpt's `tiny`
   registered with open_clip as `vlpt-tiny`, the 20 synthetic train shards resampled, batch 256,
   1 dataloader worker, bf16 autocast, 2 threads, same lr / warmup / weight decay / AdamW betas /
   gradient clipping, no evaluation). Steady-state samples/s = samples / seconds over the steps
   after the first `--discard` (10): vlpt's from the `samples_per_s` windows in metrics.jsonl,
   open_clip's from its per-step log lines (`--log-every-n-steps 1`, `Batch (t): .., N/s`).
2. Time to quality. Each side trains for at most `--minutes` of training wall-clock (the default
   schedule (max_steps) of configs/pretrain/synthetic-tiny.yaml, plus `--vlpt-set` / `--open-clip-args`
   for each side's best settings), and val text->image R@1 (multi-caption protocol, 1,000 items)
   is measured with vlpt's evaluator on both: vlpt evaluates in the loop every `--eval-every`
   steps (excluded from its `minutes`); open_clip saves a checkpoint per short epoch of
   `--eval-every` steps, stamped with the summed wall-clock of its `train_one_epoch` calls, and
   the checkpoints are evaluated after its run (`build_model("tiny", pretrained=epoch_N.pt)`).
   The time at which R@1 first reaches `--target` (0.70) is interpolated linearly between
   evaluations (from (0 min, 0) before the first one).
3. Model FLOP utilisation: nominal training FLOPs per sample (`flops_per_sample`, full-length
   captions) x samples/s / the measured bf16 matmul peak (benchmarks/matmul_peak.py). vlpt cuts
   each batch to its longest caption, so its real text FLOPs are lower
   (`vlpt_trimmed_gflops_per_sample`); both MFUs use the nominal figure, so their ratio is the
   throughput ratio.

Prints ONE JSON line on stdout; progress goes to stderr. Total wall-clock is about
2 x `--minutes` (race) + 2 x `--steps` steps (throughput) + evaluation of ~10 checkpoints.
`--quick` shrinks everything (a smoke test of the script, its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAIN_SHARDS = "data/synthetic/train/{00000..00019}.tar"
VAL = "data/synthetic/val"
CONFIG = "configs/pretrain/synthetic-tiny.yaml"
ARCH = "tiny"  # the architecture both sides train: open_clip can build it (the default config's
# `tiny-conv` has a conv stem open_clip lacks, so the race pins `model.name=tiny` on both sides)
# The default config trains with FLIP's grid dropout; the race and throughput compare both
# trainers on whole images, on the 560-step schedule they were first raced with.
WHOLE_IMAGES = ["model.patch_dropout=0", "model.unmasked_tuning=0", "train.max_steps=560"]
OPEN_CLIP_NAME = "vlpt-tiny"  # vlpt's `tiny` JSON, registered with open_clip under this name
WORKER_FLAG = "_open_clip_worker"


def log(message: str) -> None:
    print(
        f"[train_vs_open_clip {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True
    )


# ---------------------------------------------------------------------------------------------
# The open_clip side: a small wrapper around `open_clip_train.main.main`, run as a subprocess.


class _BudgetSpent(Exception):
    """Raised by the epoch timer when the training budget is used up (the run ends cleanly)."""


def open_clip_worker(argv: list[str]) -> None:
    """`train_vs_open_clip.py _open_clip_worker CONFIG_DIR TIMING_JSONL BUDGET_S OPEN_CLIP_ARGS...`

    Registers CONFIG_DIR's model JSON with open_clip, makes open_clip_train read webdataset 1.0
    shards, times every `train_one_epoch` call (appending one line per epoch to TIMING_JSONL) and
    starts no new epoch once BUDGET_S seconds of training are spent (0 = no budget).
    """
    config_dir, timing_path, budget_s, oc_argv = argv[0], Path(argv[1]), float(argv[2]), argv[3:]
    import open_clip
    import open_clip_train.data as oc_data
    import open_clip_train.main as oc_main
    import torch
    from webdataset.tariterators import tar_file_expander, url_opener

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    open_clip.add_model_config(config_dir)

    # The patch. webdataset 1.0's `tar_file_expander` yields an end-of-shard marker, an empty
    # dict `{}` (its `eof_value` default), after the last file of every shard, so that samples
    # of different shards are never merged. open_clip_train 3.3's `group_by_keys_nothrow`
    # predates it and reads `filesample["fname"]` of every item: the marker raises
    # `KeyError: 'fname'` in the dataloader worker at the end of the first shard and the run
    # dies. Its `handler` never sees that error (it is raised in the grouper's own generator,
    # not in a stage that consults the handler). The fix asks the expander for no marker
    # (`eof_value=None`, webdataset's own switch), i.e. the pre-1.0 stream; open_clip's grouper
    # already starts a new sample whenever the key changes, and keys are unique across these
    # shards, so the samples are exactly the same. Nothing else of open_clip_train is changed:
    # same pipeline, shuffle buffers, decoding, batching and training step.
    def tarfile_to_samples_nothrow(src, handler=oc_data.log_and_continue):
        streams = url_opener(src, handler=handler)
        files = tar_file_expander(streams, handler=handler, eof_value=None)
        return oc_data.group_by_keys_nothrow(files, handler=handler)

    oc_data.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow

    # Instrumentation only: wall-clock of each epoch (data loading + training steps; the
    # checkpoint written between epochs is outside it, as vlpt's evaluation is outside its time).
    train_one_epoch = oc_main.train_one_epoch
    spent = 0.0

    def timed_train_one_epoch(model, data, loss, epoch, *args, **kwargs):
        nonlocal spent
        if budget_s > 0 and spent >= budget_s:
            raise _BudgetSpent
        start = time.perf_counter()
        train_one_epoch(model, data, loss, epoch, *args, **kwargs)
        seconds = time.perf_counter() - start
        spent += seconds
        with timing_path.open("a") as f:
            f.write(
                json.dumps({"epoch": epoch + 1, "seconds": seconds, "train_seconds": spent}) + "\n"
            )

    oc_main.train_one_epoch = timed_train_one_epoch
    try:
        rc = oc_main.main(oc_argv)
    except _BudgetSpent:
        rc = 0
    sys.exit(0 if rc is None else rc)


def write_open_clip_config(directory: Path) -> None:
    """vlpt's `tiny` architecture as open_clip's `vlpt-tiny.json` (without vlpt's extra keys)."""
    from vlpt.models.registry import get_model_config

    cfg = {
        k: v
        for k, v in get_model_config(ARCH).items()
        if k in ("embed_dim", "vision_cfg", "text_cfg")
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{OPEN_CLIP_NAME}.json").write_text(json.dumps(cfg))


def open_clip_args(
    cfg: Any, *, steps_per_epoch: int, epochs: int, log_every: int, logs: Path, name: str
) -> list[str]:
    """open_clip_train flags that mirror a resolved vlpt RunConfig (same hyperparameters)."""
    t = cfg.train
    args = [
        "--model", OPEN_CLIP_NAME,
        "--train-data", TRAIN_SHARDS,
        "--dataset-type", "webdataset",
        "--dataset-resampled",  # vlpt resamples shards with replacement too
        "--train-num-samples", str(steps_per_epoch * t.batch_size),
        "--batch-size", str(t.batch_size),
        "--workers", str(cfg.data.workers),
        "--precision", "amp_bf16" if t.precision == "bf16" else "fp32",
        "--device", "cpu",
        "--lr", str(t.lr),
        "--warmup", str(t.warmup_steps),
        "--wd", str(t.weight_decay),
        "--beta1", str(t.betas[0]),
        "--beta2", str(t.betas[1]),
        "--eps", str(t.eps),
        "--epochs", str(epochs),
        "--save-frequency", "1",
        "--log-every-n-steps", str(log_every),
        "--seed", str(t.seed),
        "--logs", str(logs),
        "--name", name,
    ]  # fmt: skip
    if t.grad_clip > 0:
        args += ["--grad-clip-norm", str(t.grad_clip)]
    if cfg.model.patch_dropout > 0:
        if cfg.model.patch_dropout_pattern != "random":
            raise SystemExit(
                "open_clip's patch dropout is random only: race with model.patch_dropout_pattern="
                "random, or without patch dropout"
            )
        args += ["--force-patch-dropout", str(cfg.model.patch_dropout)]
    low, high = cfg.data.crop_scale  # the same random-resized-crop area range (1, 1: no crop)
    args += ["--aug-cfg", f"scale=({low},{high})"]
    return args


def run_open_clip(
    work: Path, name: str, oc_argv: list[str], budget_s: float, threads: int
) -> tuple[Path, Path, Path]:
    """Run open_clip_train; returns (its out.log, the epoch timing file, its checkpoint folder)."""
    config_dir, timing = work / "open_clip_models", work / f"{name}_epochs.jsonl"
    write_open_clip_config(config_dir)
    run_dir = Path(oc_argv[oc_argv.index("--logs") + 1]) / name
    shutil.rmtree(run_dir, ignore_errors=True)  # open_clip refuses to reuse an experiment name
    timing.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        WORKER_FLAG,
        str(config_dir),
        str(timing),
        str(budget_s),
        *oc_argv,
    ]
    log(f"open_clip run '{name}': {shlex.join(cmd)}")
    _run(cmd, work / f"{name}.console.log", threads)
    return run_dir / "out.log", timing, run_dir / "checkpoints"


_OC_STEP = re.compile(
    r"Train Epoch: (\d+) \[\s*(\d+)/(\d+).*?Batch \(t\): ([\d.]+), ([\d.eE+-]+)/s"
)


def open_clip_throughput(out_log: Path, batch_size: int, discard: int) -> tuple[float, int]:
    """Samples/s over the logged steps after the first `discard` (log every step: one line each)."""
    samples = seconds = 0.0
    for line in out_log.read_text().splitlines():
        m = _OC_STEP.search(line)
        if not m:
            continue
        step = int(m.group(2)) // batch_size  # 1-based step within epoch 0
        if step > discard:
            samples += batch_size
            seconds += batch_size / float(m.group(5))
    if not samples:
        raise RuntimeError(f"no open_clip step lines after step {discard} in {out_log}")
    return samples / seconds, int(samples // batch_size)


# ---------------------------------------------------------------------------------------------
# The vlpt side: `vlpt pretrain` as a subprocess, read back from metrics.jsonl.


def run_vlpt(work: Path, name: str, overrides: list[str], threads: int) -> tuple[list[dict], dict]:
    """Run `vlpt pretrain CONFIG overrides`; returns (metrics.jsonl records, final report)."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl is appended to: start clean
    cmd = [
        sys.executable,
        "-m",
        "vlpt.cli",
        "pretrain",
        CONFIG,
        *overrides,
        f"output_dir={out}",
        "resume=",
        "train.progress=false",
    ]
    log(f"vlpt run '{name}': {shlex.join(cmd)}")
    console = work / f"{name}.console.log"
    _run(cmd, console, threads)
    records = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    report: dict = {}
    for line in reversed(console.read_text().splitlines()):
        if line.startswith("{"):
            report = json.loads(line)
            break
    return records, report


def vlpt_throughput(records: list[dict], discard: int, batch_size: int) -> tuple[float, int]:
    """Samples/s over the metric windows that start after step `discard`."""
    samples = seconds = 0.0
    prev_step, prev_samples = 0, 0
    for r in records:
        if "samples_per_s" not in r:
            continue
        n = r["samples"] - prev_samples
        if prev_step >= discard:
            samples += n
            seconds += n / r["samples_per_s"]
        prev_step, prev_samples = r["step"], r["samples"]
    if not samples:
        raise RuntimeError(f"no vlpt metric windows after step {discard}")
    return samples / seconds, int(samples // batch_size)


def vlpt_eval_points(records: list[dict], report: dict) -> list[tuple[float, float, int]]:
    """(training minutes, val t2i R@1, step) of every evaluation in a vlpt run."""
    minutes = {r["step"]: r["minutes"] for r in records if "minutes" in r}
    if report:
        minutes.setdefault(report["step"], report["train_minutes"])
    points = []
    for r in records:
        if "eval/val/t2i_r1" in r and r["step"] in minutes:
            points.append((minutes[r["step"]], r["eval/val/t2i_r1"], r["step"]))
    return points


# ---------------------------------------------------------------------------------------------
# Shared helpers.


def _run(cmd: list[str], console: Path, threads: int) -> None:
    env = dict(
        os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1"
    )
    with console.open("w") as f:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, check=False
        )
    if proc.returncode != 0:
        tail = "\n".join(console.read_text().splitlines()[-30:])
        raise RuntimeError(
            f"{cmd[2:4]} exited with {proc.returncode}; last lines of {console}:\n{tail}"
        )


def evaluate_checkpoint(path: Path, cfg: Any, max_items: int) -> float:
    """Val text->image R@1 of an open_clip checkpoint, the way vlpt evaluates in its loop."""
    from vlpt.config import Source
    from vlpt.eval import evaluate_retrieval
    from vlpt.models import build_model, get_tokenizer

    model = build_model(ARCH, pretrained=str(path))
    metrics = evaluate_retrieval(
        model,
        get_tokenizer(ARCH),
        [Source(url=VAL)],
        batch_size=cfg.eval.batch_size,
        max_items=max_items,
        precision=cfg.train.precision,
    )
    return float(metrics["t2i_r1"])


def minutes_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """First time R@1 reaches `target`, linear between evaluations (from (0, 0)); None if never."""
    prev_t, prev_r = 0.0, 0.0
    for t, r in sorted(points):
        if r >= target:
            return t if r <= prev_r else prev_t + (target - prev_r) / (r - prev_r) * (t - prev_t)
        prev_t, prev_r = t, r
    return None


def best_within(points: list[tuple[float, float, int]], minutes: float) -> float | None:
    """Best R@1 of the evaluations inside the budget, give or take one training step (vlpt stops
    on the step that crosses it; open_clip's last epoch may cross it by up to an epoch and then
    does not count)."""
    if not points:
        return None
    t_last, _, step_last = max(points)
    step_minutes = t_last / max(step_last, 1)
    inside = [r for t, r, _ in points if t <= minutes + 1.5 * step_minutes]
    return max(inside) if inside else None


def trimmed_context_length(tokenizer: Any, batch_size: int, n_batches: int = 8) -> int:
    """Mean over val batches of the longest caption's token count (what vlpt's text tower sees).

    On the synthetic captions (mean ~21 tokens, a few cut at 40) a batch of 256 nearly always
    holds one caption of the full 40 tokens, so trimming saves little there at this batch size."""
    from vlpt.config import Source
    from vlpt.data.loader import iter_eval_batches

    lengths, captions, rng = [], [], random.Random(0)
    batches = iter_eval_batches(
        [Source(url=VAL)],
        image_size=64,
        mean=(0, 0, 0),
        std=(1, 1, 1),
        batch_size=250,
        max_items=2000,
    )
    for batch in batches:
        captions += [
            rng.choice(item) for item in batch["captions"]
        ]  # one random line per image, as in training
    for i in range(0, min(len(captions), n_batches * batch_size), batch_size):
        lengths.append(tokenizer(captions[i : i + batch_size]).shape[1])
    return round(sum(lengths) / len(lengths)) if lengths else tokenizer.context_length


def _ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    return round(a / b, digits) if a is not None and b else None


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def _other_trainers() -> list[str]:
    """Command lines of training processes running beside this benchmark (for the record)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if int(cmdline.parent.name) == os.getpid():
                continue
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if ("vlpt" in text and "pretrain" in text) or "open_clip_train" in text or "pytest" in text:
            found.append(text[:160])
    return found


# ---------------------------------------------------------------------------------------------


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--minutes",
        type=float,
        default=10.0,
        help="training budget per side for the time-to-R@1 race",
    )
    parser.add_argument(
        "--steps", type=int, default=60, help="throughput: optimiser steps per side"
    )
    parser.add_argument(
        "--discard", type=int, default=10, help="throughput: first steps left out (warm-up)"
    )
    parser.add_argument("--target", type=float, default=0.70, help="val text->image R@1 to reach")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=40,
        help="race: steps between evaluations (= open_clip epoch)",
    )
    parser.add_argument("--eval-items", type=int, default=1000, help="val items evaluated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--vlpt-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="race: extra vlpt config override (repeatable), e.g. model.patch_dropout=0.5",
    )
    parser.add_argument(
        "--open-clip-args", default="", help="race: extra open_clip_train flags, one string"
    )
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--no-race", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="tiny budget: checks that the script works"
    )
    parser.add_argument(
        "--work-dir", default="", help="keep runs here (default: a temporary folder, removed)"
    )
    return parser.parse_args()


def measure_throughput(
    args: argparse.Namespace, work: Path, tp_cfg: Any, tp_overrides: list[str]
) -> dict[str, Any]:
    """Samples/s of both trainers at identical settings (steady state, warm-up steps left out)."""
    batch = tp_cfg.train.batch_size
    records, _ = run_vlpt(work, "vlpt_throughput", tp_overrides, args.threads)
    vlpt_sps, vlpt_n = vlpt_throughput(records, args.discard, batch)
    log(f"vlpt: {vlpt_sps:.1f} samples/s over {vlpt_n} steps")
    oc_argv = open_clip_args(
        tp_cfg,
        steps_per_epoch=args.steps,
        epochs=1,
        log_every=1,
        logs=work / "open_clip_logs",
        name="open_clip_throughput",
    )
    out_log, _, ckpts = run_open_clip(work, "open_clip_throughput", oc_argv, 0.0, args.threads)
    oc_sps, oc_n = open_clip_throughput(out_log, batch, args.discard)
    for ckpt in ckpts.glob("*.pt"):
        ckpt.unlink()
    log(f"open_clip: {oc_sps:.1f} samples/s over {oc_n} steps")
    return dict(
        vlpt_samples_per_s=round(vlpt_sps, 1),
        open_clip_samples_per_s=round(oc_sps, 1),
        throughput_ratio=_ratio(vlpt_sps, oc_sps),
    )


def open_clip_race_points(
    args: argparse.Namespace, work: Path, race_cfg: Any, race_cfg_steps: int
) -> list[tuple[float, float, int]]:
    """open_clip_train in `--eval-every`-step epochs within the budget; (minutes, R@1, step) per epoch,
    each checkpoint scored by vlpt's evaluator and then deleted."""
    epochs = math.ceil(race_cfg_steps / args.eval_every)
    oc_argv = open_clip_args(
        race_cfg,
        steps_per_epoch=args.eval_every,
        epochs=epochs,
        log_every=10,
        logs=work / "open_clip_logs",
        name="open_clip_race",
    )
    oc_argv += shlex.split(args.open_clip_args)
    _, timing, ckpts = run_open_clip(
        work, "open_clip_race", oc_argv, 60 * args.minutes, args.threads
    )
    epoch_minutes = {
        e["epoch"]: e["train_seconds"] / 60
        for e in map(json.loads, timing.read_text().splitlines())
    }
    o_points = []
    for epoch, minutes in sorted(epoch_minutes.items()):
        path = ckpts / f"epoch_{epoch}.pt"
        r1 = evaluate_checkpoint(path, race_cfg, args.eval_items)
        path.unlink()
        o_points.append((minutes, r1, epoch * args.eval_every))
        log(f"open_clip epoch {epoch}: {minutes:.2f} min, R@1 {r1:.3f}")

    return o_points


def race_to_target(
    args: argparse.Namespace, work: Path, common: list[str]
) -> tuple[dict[str, Any], int]:
    """Wall-clock to val R@1 >= target per side within `--minutes`, scored by one evaluator."""
    from vlpt.config import load_config

    result: dict[str, Any] = {}
    race_overrides = [
        *common,
        f"data.val={VAL}",
        f"train.max_minutes={args.minutes}",
        # the same schedule as open_clip's side, not one fitted to this machine's speed
        "train.fit_to_time=false",
        f"train.eval_every={args.eval_every}",
        # a metrics line (with `minutes`) at every evaluation step
        f"train.log_every={math.gcd(10, args.eval_every)}",
        f"eval.max_items={args.eval_items}",
        *args.vlpt_set,
    ]
    if args.quick:
        race_overrides.append(f"train.max_steps={3 * args.eval_every}")
    race_cfg = load_config(REPO / CONFIG, race_overrides)
    race_cfg_steps = race_cfg.train.max_steps
    # One checkpoint at the end only: a vlpt checkpoint also restarts its data stream.
    race_overrides.append(f"train.ckpt_every={race_cfg_steps}")
    records, report = run_vlpt(work, "vlpt_race", race_overrides, args.threads)
    v_points = vlpt_eval_points(records, report)
    log("vlpt R@1: " + ", ".join(f"{t:.2f} min {r:.3f}" for t, r, _ in v_points))
    # Same evaluator for both sides: vlpt's final weights through the open_clip path.
    final = sorted(
        (work / "vlpt_race" / "checkpoints").glob("step_*/model.safetensors"),
        key=lambda p: int(p.parent.name.split("_")[-1]),
    )
    if final:
        result["vlpt_final_r1_offline_check"] = round(
            evaluate_checkpoint(final[-1], race_cfg, args.eval_items), 4
        )

    o_points = open_clip_race_points(args, work, race_cfg, race_cfg_steps)

    v_tr = [(t, r) for t, r, _ in v_points]
    o_tr = [(t, r) for t, r, _ in o_points]
    v_time, o_time = (
        minutes_to_reach(v_tr, args.target),
        minutes_to_reach(o_tr, args.target),
    )
    tag = f"{round(100 * args.target):03d}"
    result.update(
        {
            f"vlpt_minutes_to_r1_{tag}": _round(v_time, 2),
            f"open_clip_minutes_to_r1_{tag}": _round(o_time, 2),
            "time_ratio": _ratio(v_time, o_time),
            "vlpt_best_r1": _round(best_within(v_points, args.minutes), 4),
            "open_clip_best_r1": _round(best_within(o_points, args.minutes), 4),
            "vlpt_r1_curve": [[round(t, 2), round(r, 4), s] for t, r, s in v_points],
            "open_clip_r1_curve": [[round(t, 2), round(r, 4), s] for t, r, s in o_points],
        }
    )
    if v_time is None or o_time is None:
        result["race_note"] = (
            f"R@1 {args.target} not reached within {args.minutes} min by: "
            + ", ".join(n for n, t in (("vlpt", v_time), ("open_clip", o_time)) if t is None)
        )
    return result, race_cfg_steps


def run_settings(
    args: argparse.Namespace,
    base_cfg: Any,
    tp_cfg: Any,
    race_cfg_steps: int | None,
    trimmed_len: int,
    load_start: float,
    others: list[str],
) -> dict[str, Any]:
    """What was compared, and under which conditions (recorded with every result)."""
    import open_clip
    import torch
    import webdataset

    return {
        "model": f"{base_cfg.model.name} (open_clip: {OPEN_CLIP_NAME})",
        "train_shards": TRAIN_SHARDS,
        "val": VAL,
        "batch_size": tp_cfg.train.batch_size,
        "workers": tp_cfg.data.workers,
        "threads": args.threads,
        "precision": "bf16 autocast (open_clip: amp_bf16)",
        "lr": tp_cfg.train.lr,
        "warmup_steps": tp_cfg.train.warmup_steps,
        "weight_decay": tp_cfg.train.weight_decay,
        "betas": list(tp_cfg.train.betas),
        "eps": tp_cfg.train.eps,
        "grad_clip": tp_cfg.train.grad_clip,
        "throughput_steps": args.steps,
        "throughput_discarded_steps": args.discard,
        "race_budget_minutes": args.minutes,
        "race_eval_every_steps": args.eval_every,
        "race_schedule_steps": None if args.no_race else race_cfg_steps,
        "race_vlpt_overrides": args.vlpt_set,
        "race_open_clip_args": args.open_clip_args,
        "eval_items": args.eval_items,
        "target_r1": args.target,
        "trimmed_context_length": trimmed_len,
        "quick": args.quick,
        "load_avg_1min_start": round(load_start, 2),
        "load_avg_1min_end": round(os.getloadavg()[0], 2),
        "other_processes": others,
        "other_processes_end": _other_trainers(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "webdataset": getattr(webdataset, "__version__", "?"),
        "cpu_count": os.cpu_count(),
    }


def measure_flops(args: argparse.Namespace, base_cfg: Any) -> tuple[float, float, int, float]:
    """GFLOP per training sample (nominal and at vlpt's trimmed caption length), the trimmed
    length, and the machine's bf16 matmul peak in GFLOP/s."""
    import torch
    from matmul_peak import peak_gflops

    from vlpt.models import build_model, get_tokenizer
    from vlpt.train.plan import flops_per_sample

    model = build_model(base_cfg.model.name)
    gflops = flops_per_sample(model, model.image_size, model.context_length) / 1e9
    tokenizer = get_tokenizer(base_cfg.model.name)
    trimmed_len = trimmed_context_length(tokenizer, base_cfg.train.batch_size)
    trimmed_gflops = flops_per_sample(model, model.image_size, trimmed_len) / 1e9
    del model
    peak = peak_gflops(torch.bfloat16, 1024, seconds=1.0 if args.quick else 3.0)
    log(
        f"{gflops:.3f} GFLOP per training sample (nominal; {trimmed_gflops:.3f} at vlpt's trimmed caption length "
        f"{trimmed_len}), bf16 matmul peak {peak:.0f} GFLOP/s"
    )
    return gflops, trimmed_gflops, trimmed_len, peak


def main() -> None:
    args = _parse_args()
    if args.quick:
        args.minutes, args.steps, args.discard, args.eval_every, args.eval_items = 0.4, 8, 4, 4, 200
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    from vlpt.config import load_config

    others = _other_trainers()
    load_start = os.getloadavg()[0]
    if others:
        log(
            f"note: {len(others)} other training/test process(es) share the CPU; numbers will be noisy"
        )
    with tempfile.TemporaryDirectory(prefix="train_vs_open_clip_") as tmp:
        work = Path(args.work_dir).resolve() if args.work_dir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        log(f"runs in {work}")

        # 3. FLOPs and the machine's peak, measured first, before any subprocess exists.
        base_cfg = load_config(
            REPO / CONFIG, [f"model.name={ARCH}", *WHOLE_IMAGES, f"train.threads={args.threads}"]
        )
        gflops, trimmed_gflops, trimmed_len, peak = measure_flops(args, base_cfg)

        result: dict[str, Any] = {"bench": "train_vs_open_clip"}

        # 1. Throughput at identical settings.
        common = [
            f"model.name={ARCH}",
            *WHOLE_IMAGES,
            f"train.threads={args.threads}",
            "data.val=[]",
            "data.test=[]",
            "eval.zeroshot=[]",
        ]
        tp_overrides = [
            *common,
            f"train.max_steps={args.steps}",
            "train.max_minutes=0",
            "train.eval_every=0",
            f"train.ckpt_every={args.steps}",
            f"train.log_every={max(1, args.discard)}",
        ]
        tp_cfg = load_config(REPO / CONFIG, tp_overrides)
        if not args.no_throughput:
            result.update(measure_throughput(args, work, tp_cfg, tp_overrides))

        # 2. Wall-clock to val R@1 >= target, each side within `--minutes` of training.
        race_cfg_steps = None
        if not args.no_race:
            race_result, race_cfg_steps = race_to_target(args, work, common)
            result.update(race_result)

        # 3. MFU on the same nominal FLOPs.
        result.update(
            gflops_per_sample=round(gflops, 4),
            vlpt_trimmed_gflops_per_sample=round(trimmed_gflops, 4),
            bf16_peak_gflops=round(peak, 1),
        )
        if "vlpt_samples_per_s" in result:
            result["vlpt_mfu"] = round(gflops * result["vlpt_samples_per_s"] / peak, 4)
            result["open_clip_mfu"] = round(gflops * result["open_clip_samples_per_s"] / peak, 4)

        result["settings"] = run_settings(
            args, base_cfg, tp_cfg, race_cfg_steps, trimmed_len, load_start, others
        )
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == WORKER_FLAG:
        open_clip_worker(sys.argv[2:])
    else:
        main()
