"""The training loop: one loop for every objective mix, on CPU, one GPU or many (torchrun).

Reads top to bottom: set up -> (resume) -> for each data segment: step, log, evaluate,
checkpoint -> final evaluation. The loop sums the `loss/*` terms its objectives return and
knows none of them by name.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from vlpt.config import DataConfig, RunConfig, TrainConfig, dump_config
from vlpt.data import build_train_loader
from vlpt.models import VisionLanguageModel, get_model_config, get_tokenizer
from vlpt.objectives import ModelWithObjectives, build_objectives
from vlpt.train import checkpoint as ckpt
from vlpt.train.budget import StepBudget, planned_steps, tuning_start, with_max_steps
from vlpt.train.build import model_from_config, set_output_vocabularies
from vlpt.train.distributed import DistInfo, all_reduce_sum, cleanup, init_distributed
from vlpt.train.evaluation import evaluate_run
from vlpt.train.finetune import describe_init, freeze_towers, load_init_weights
from vlpt.train.metrics import Clock, MetricsLogger, NullLogger, Window, release_free_heap
from vlpt.train.optim import build_optimizer, lr_schedule, set_lr
from vlpt.train.parallel import wrap_model


@dataclass
class TrainState:
    """What a checkpoint must remember besides weights and optimiser."""

    step: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    skips: Counter = field(default_factory=Counter)
    max_steps: int = 0
    """The run's length: `train.max_steps`, or fewer when fitted to `train.max_minutes`."""
    configured_max_steps: int = 0
    """`train.max_steps` as configured (a resumed run keeps the fitted length only if equal)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "samples": self.samples,
            "train_seconds": self.train_seconds,
            "skips": dict(self.skips),
            "max_steps": self.max_steps,
            "configured_max_steps": self.configured_max_steps,
        }


def compute_context(cfg: RunConfig, device: torch.device) -> contextlib.ExitStack:
    """bf16 autocast on CPU and CUDA (never fp16 on CPU: it is ~50x slower there), with the
    attention kernel that `train.attention` picks."""
    stack = contextlib.ExitStack()
    stack.enter_context(
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    )
    backends = attention_backends(cfg.train.attention, device)
    if backends:
        stack.enter_context(sdpa_kernel(backends))
    return stack


def attention_backends(choice: str, device: torch.device) -> list[SDPBackend]:
    """SDPA backends for a `train.attention` value ([] = leave torch's choice alone).

    On CPU the flash kernel's backward is ~3x slower than plain matmul + softmax for the short
    sequences of a ViT (65 tokens) or a caption (~25), measured in benchmarks/attention_kernels.py.
    """
    if choice == "auto":
        return [SDPBackend.MATH] if device.type == "cpu" else []
    named = {
        "math": SDPBackend.MATH,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    return [named[choice]] if choice in named else []


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[dict[str, torch.Tensor]],
    cfg: RunConfig,
    device: torch.device,
) -> dict[str, float]:
    """Forward, backward and update on `accum_steps` micro-batches; returns detached metrics.

    `model` is the `ModelWithObjectives` (possibly compiled / DDP-wrapped): given a batch it
    returns the weighted `loss/*` terms, which are summed here, and metrics."""
    optimizer.zero_grad(set_to_none=True)
    logged: defaultdict[str, float] = defaultdict(float)
    n = len(micro_batches)
    for i, batch in enumerate(micro_batches):
        inputs = {
            "image": batch["image"].to(device, non_blocking=True),  # (B, 3, H, W) / (B, T, 3, H, W)
            "text": batch["text"].to(device, non_blocking=True),  # (B, L)
        }
        # Gradients are all-reduced only on the last micro-batch of the step.
        last = i == n - 1
        sync = (
            model.no_sync()
            if isinstance(model, DistributedDataParallel) and not last
            else contextlib.nullcontext()
        )
        with sync:
            # Objectives compute their losses in fp32 themselves (autocast off inside).
            with compute_context(cfg, device):
                terms = model(inputs)
            loss = torch.stack([v for k, v in terms.items() if k.startswith("loss/")]).sum()
            (loss / n).backward()
        for key, value in terms.items():
            logged[key] += float(value.detach()) / n
        logged["loss"] += float(loss.detach()) / n
    if cfg.train.grad_clip > 0:
        logged["grad_norm"] = float(
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        )
    optimizer.step()
    return dict(logged)


def _out_of_time(clock: Clock, cfg: RunConfig, dist_info: DistInfo) -> bool:
    """All ranks agree on stopping (rank 0's clock decides), so DDP never waits forever."""
    if cfg.train.max_minutes <= 0:
        return False
    return _from_rank0(float(clock.seconds() >= 60 * cfg.train.max_minutes), dist_info) > 0


def _from_rank0(value: float, dist_info: DistInfo) -> float:
    """Rank 0's value on every rank: decisions from the clock (whose readings differ a little
    between ranks) must be the same everywhere, or DDP waits forever."""
    if not dist_info.distributed:
        return value
    return all_reduce_sum({"v": value if dist_info.is_main else 0.0}, dist_info.device)["v"]


def _segment_seed(cfg: RunConfig, step: int, rank: int) -> int:
    # The data stream restarts at every checkpoint boundary from a seed derived from the step,
    # so a resumed run reads exactly what the killed run would have read next.
    return (cfg.data.seed * 1_000_003 + step) * 1009 + rank


def _build(
    cfg: RunConfig, dist_info: DistInfo
) -> tuple[VisionLanguageModel, Any, ModelWithObjectives, torch.optim.Optimizer]:
    torch.manual_seed(cfg.train.seed)
    model = model_from_config(cfg.model)
    if cfg.init:  # fine-tuning: trained weights; a resumed checkpoint overwrites them later
        report = load_init_weights(model, cfg.init, cfg.finetune.decoder_init)
        if dist_info.is_main:
            print(describe_init(cfg.init, report))
    freeze_towers(model, cfg.finetune.freeze)
    if cfg.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    # Only SigLIP uses the logit bias; a parameter without gradient would stall DDP's reducer.
    model.logit_bias.requires_grad_(cfg.loss.name == "siglip")
    model.to(dist_info.device)
    tokenizer = get_tokenizer(cfg.model.name)
    objectives = build_objectives(cfg, model).to(dist_info.device)
    vocabularies = set_output_vocabularies(model, cfg, tokenizer)  # (a resumed run: its own)
    if dist_info.is_main:
        print(*vocabularies, sep="\n", end="\n" if vocabularies else "")
    trainer = ModelWithObjectives(model, objectives)  # freezes the heads no objective trains
    optimizer = build_optimizer(model, cfg.train, dist_info.device, cfg.finetune.layer_decay)
    return model, tokenizer, trainer, optimizer


def frames_at(cfg: RunConfig, step: int) -> int:
    """Frames per clip at `step`: the last `data.frames_curriculum` stage that has started, or
    `data.num_frames`."""
    frames = cfg.data.num_frames
    for fraction, stage_frames in cfg.data.frames_curriculum:
        if step >= fraction * cfg.train.max_steps:
            frames = stage_frames
    return frames


def stage_at(cfg: RunConfig, step: int) -> tuple[int, tuple[bool, ...]]:
    """The curriculum stage `step` is in: frames per clip (`frames_at`) and which training
    sources have started (`Source.start`). A change of stage ends a data segment (with a
    checkpoint), so resuming reproduces it."""
    started = tuple(step >= s.start * cfg.train.max_steps for s in cfg.data.train)
    return frames_at(cfg, step), started


def data_at(cfg: RunConfig, step: int) -> DataConfig:
    """The data of `step`'s curriculum stage (`stage_at`)."""
    frames, started = stage_at(cfg, step)
    train = [source for source, on in zip(cfg.data.train, started, strict=True) if on]
    return cfg.data.model_copy(update={"num_frames": frames, "train": train})


def _patch_dropout_at(cfg: RunConfig, step: int) -> float:
    """FLIP: the patch dropout of a step; 0 in the unmasked tuning phase at the end."""
    unmasked = step >= tuning_start(cfg.model.unmasked_tuning, cfg.train.max_steps)
    return 0.0 if unmasked else cfg.model.patch_dropout


def pretrain(cfg: RunConfig) -> dict[str, Any]:
    """Train as the config says; returns (and prints, as the last line) the final evaluation."""
    dist_info = init_distributed()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    model, tokenizer, trainer, optimizer = _build(cfg, dist_info)
    state = _resume(cfg, ckpt_root, model, optimizer, dist_info)
    # Only now: a run folder whose checkpoint does not fit this model keeps its config.
    _prepare_run_folder(cfg, dist_info)
    cfg = with_max_steps(cfg, state.max_steps)  # a resumed run keeps its fitted length
    train_model = wrap_model(trainer, cfg, dist_info)
    patch_dropout = cfg.model.patch_dropout
    schedule = lr_schedule(cfg.train)
    budget = StepBudget(cfg, state.step)
    logger = _make_logger(cfg, out, dist_info)
    show_bar = cfg.train.progress and dist_info.is_main
    bar = tqdm(
        total=cfg.train.max_steps, initial=state.step, disable=not show_bar, dynamic_ncols=True
    )

    clock, window = Clock(state.train_seconds), Window()
    done = state.step >= cfg.train.max_steps
    after_checkpoint = False  # the segment began at a checkpoint this run wrote
    while not done:
        batches = iter(_segment_loader(cfg, model, tokenizer, dist_info, state.step))
        segment_stage = stage_at(cfg, state.step)
        while True:
            micro = [next(batches) for _ in range(cfg.train.accum_steps)]
            set_lr(optimizer, schedule[state.step])
            if _patch_dropout_at(cfg, state.step) != patch_dropout:
                patch_dropout = _patch_dropout_at(cfg, state.step)
                model.set_patch_dropout(patch_dropout)
            metrics = train_step(train_model, optimizer, micro, cfg, dist_info.device)
            n_samples = sum(len(b["text"]) for b in micro) * dist_info.world_size
            state.step += 1
            state.samples += n_samples
            for b in micro:
                state.skips.update(b.get("skips", {}))
            window.add(metrics, n_samples)
            bar.update(1)

            # Later fits come one step after a checkpoint, so that the checkpoint write and
            # the segment's restart are in the measured speed (they recur at every checkpoint).
            fitted = _fit_to_time(cfg, budget, state, clock, after_checkpoint, dist_info, logger)
            after_checkpoint = False
            if fitted is not None:
                cfg, schedule = fitted, lr_schedule(fitted.train)
                bar.total = cfg.train.max_steps
                bar.refresh()

            if state.step % cfg.train.log_every == 0 or state.step == cfg.train.max_steps:
                _log_window(window, logger, bar, state, lr=schedule[state.step - 1], clock=clock)
                window = Window()

            done = state.step >= cfg.train.max_steps or _out_of_time(clock, cfg, dist_info)
            if not done and periodic_eval_due(cfg.train, state.step):
                paused = time.monotonic()
                _evaluate_and_log(
                    model, tokenizer, cfg, dist_info, logger, state, ("val",), clock.seconds() / 60
                )
                clock.exclude(time.monotonic() - paused)  # evaluation time is not training time
                window.clock.exclude(time.monotonic() - paused)
            # The next step's curriculum stage (frames, sources) differs from this segment's.
            new_stage = stage_at(cfg, state.step) != segment_stage
            at_checkpoint = state.step % cfg.train.ckpt_every == 0
            if done or at_checkpoint or new_stage:  # (a stage change writes a checkpoint too)
                after_checkpoint = not done
                state.train_seconds = clock.seconds()
                _save(cfg, ckpt_root, model, optimizer, state, dist_info)
                break  # a new data segment starts here (see _segment_seed)
    bar.close()

    result = _final_report(model, tokenizer, cfg, dist_info, logger, state)
    logger.close()
    cleanup()
    return result


def periodic_eval_due(train: TrainConfig, step: int) -> bool:
    """An `eval_every` evaluation after `step`, unless the run ends within a tenth of that
    interval: the final evaluation follows in a few steps (a schedule fitted to the time can
    end just past a multiple of `eval_every`; each evaluation of a masked run takes minutes)."""
    every = train.eval_every
    if not every or step % every:
        return False
    return train.max_steps - step >= max(1, every // 10)


def _log_window(
    window: Window,
    logger: MetricsLogger | NullLogger,
    bar: tqdm,
    state: TrainState,
    *,
    lr: float,
    clock: Clock,
) -> None:
    """One metrics line: the window's averages and throughput, the LR, samples and minutes."""
    record = window.summary()
    record.update(lr=lr, samples=state.samples, minutes=clock.seconds() / 60)
    logger.log(state.step, record)
    bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")


def _prepare_run_folder(cfg: RunConfig, dist_info: DistInfo) -> None:
    """OUTPUT_DIR with the resolved config and the code version written into it."""
    out = Path(cfg.output_dir)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(dump_config(cfg))
        (out / "version.json").write_text(json.dumps(ckpt.code_version()))


def _make_logger(cfg: RunConfig, out: Path, dist_info: DistInfo) -> MetricsLogger | NullLogger:
    if not dist_info.is_main:
        return NullLogger()
    config = cfg.model_dump(mode="json")
    return MetricsLogger(
        out, tensorboard=cfg.train.tensorboard, wandb=cfg.train.wandb, config=config
    )


def _segment_loader(
    cfg: RunConfig, model: VisionLanguageModel, tokenizer: Any, dist_info: DistInfo, step: int
):
    """The data stream of the segment that starts at `step` (its stage: `data_at(step)`)."""
    release_free_heap()  # before the workers fork: they inherit (and would dirty) the free heap
    return build_train_loader(
        data_at(cfg, step),
        image_size=model.image_size,
        mean=model.image_mean,
        std=model.image_std,
        tokenizer=tokenizer,
        batch_size=cfg.train.batch_size,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        seed=_segment_seed(cfg, step, dist_info.rank),
    )


def _resume(
    cfg: RunConfig,
    ckpt_root: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dist_info: DistInfo,
) -> TrainState:
    fresh = TrainState(max_steps=cfg.train.max_steps, configured_max_steps=cfg.train.max_steps)
    if not cfg.resume:
        return fresh
    path = ckpt.find_resume_checkpoint(ckpt_root) if cfg.resume == "auto" else Path(cfg.resume)
    if path is None:
        if dist_info.is_main:
            start = f"from {cfg.init}" if cfg.init else "from scratch"
            print(
                f"vlpt: resume=auto found no checkpoint in {ckpt_root}; starting at step 0 {start}"
            )
        return fresh
    saved = ckpt.load_checkpoint(path, model, optimizer)
    max_steps = planned_steps(cfg, saved)
    if dist_info.is_main:
        fitted = (
            f", {max_steps} steps fitted to the time limit" if max_steps < fresh.max_steps else ""
        )
        print(f"vlpt: resumed from {path} (step {saved['step']}{fitted})")
    return TrainState(
        saved["step"],
        saved["samples"],
        saved["train_seconds"],
        Counter(saved.get("skips", {})),
        max_steps=max_steps,
        configured_max_steps=cfg.train.max_steps,
    )


def _fit_to_time(
    cfg: RunConfig,
    budget: StepBudget,
    state: TrainState,
    clock: Clock,
    after_checkpoint: bool,
    dist_info: DistInfo,
    logger: MetricsLogger | NullLogger,
) -> RunConfig | None:
    """The run with `max_steps` fitted to the time left (`StepBudget`), when a fit is due after
    this step (the first fit, or `after_checkpoint`: this step was the first one after a
    checkpoint) and changes the count; None otherwise. Records the new length in `state`.

    A fit may lower the count, or raise it again up to the configured `train.max_steps` when
    the machine turned out faster than first measured (the learning rate then steps up a
    little: the cosine's progress fraction goes down). A raise that would send this step back
    to an earlier curriculum stage or out of the unmasked tuning phase is not made."""
    seconds = clock.seconds()
    checkpoint_fit = after_checkpoint and budget.due_after_checkpoint()
    if not (budget.observe(state.step, seconds) or checkpoint_fit):
        return None
    cap = state.configured_max_steps or cfg.train.max_steps
    fitted = int(_from_rank0(budget.fit(state.step, seconds, cap, cfg.train.max_steps), dist_info))
    if fitted == cfg.train.max_steps:
        return None
    refitted = with_max_steps(cfg, fitted)
    if fitted > cfg.train.max_steps and (
        stage_at(refitted, state.step) != stage_at(cfg, state.step)
        or _patch_dropout_at(refitted, state.step) != _patch_dropout_at(cfg, state.step)
    ):
        return None
    if dist_info.is_main:
        tqdm.write(
            f"vlpt: {budget.seconds_per_step:.2f} s/step at step {state.step}: {fitted} of "
            f"{cap} steps fit in train.max_minutes={cfg.train.max_minutes:g}; "
            f"the schedule now ends at step {fitted}"
        )
    logger.log(state.step, {"max_steps": fitted})
    state.max_steps = fitted
    return refitted


def _save(
    cfg: RunConfig,
    ckpt_root: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    dist_info: DistInfo,
) -> None:
    if dist_info.is_main:
        ckpt.save_checkpoint(
            ckpt_root,
            state.step,
            model,
            optimizer,
            state.to_json(),
            dump_config(cfg),
            cfg.train.keep_checkpoints,
            architecture=get_model_config(cfg.model.name),
        )
    if dist_info.distributed:
        torch.distributed.barrier()


def _evaluate_and_log(
    model, tokenizer, cfg, dist_info, logger, state, splits, minutes: float
) -> dict[str, Any]:
    """Evaluate on rank 0 (the others wait); the record carries the training minutes so far."""
    results: dict[str, Any] = {}
    if dist_info.is_main:
        model.eval()
        with torch.no_grad():
            results = evaluate_run(
                model, tokenizer, cfg, dist_info.device, splits=splits, step=state.step
            )
        model.train()
        logger.log(state.step, {"minutes": minutes, **{f"eval/{k}": v for k, v in results.items()}})
    if dist_info.distributed:
        torch.distributed.barrier()
    return results


def _final_report(model, tokenizer, cfg, dist_info, logger, state) -> dict[str, Any]:
    skips = Counter(
        {k: int(v) for k, v in all_reduce_sum(dict(state.skips), dist_info.device).items()}
    )
    minutes = state.train_seconds / 60
    results = _evaluate_and_log(
        model, tokenizer, cfg, dist_info, logger, state, ("val", "test"), minutes
    )
    report = {
        "step": state.step,
        "samples": state.samples,
        "train_minutes": round(state.train_seconds / 60, 3),
        **results,
        "skipped": dict(skips),
    }
    if dist_info.is_main:
        if skips:
            print(
                "vlpt: skipped samples: " + ", ".join(f"{k}={v}" for k, v in sorted(skips.items()))
            )
        print(json.dumps(report))
    return report
