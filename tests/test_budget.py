"""Fitting the run to `train.max_minutes`: the step arithmetic, and a run on a slowed-down loop."""

import json

import pytest
from conftest import ROOT, run_overrides

from vlpt.cli import main
from vlpt.config import load_config
from vlpt.train import loop
from vlpt.train.budget import CALIBRATION_STEPS, WARM_STEPS, StepBudget, planned_steps

CONFIG = str(ROOT / "configs/pretrain/synthetic-tiny.yaml")


def _cfg(*overrides: str):
    """The default config on whole images (FLIP's tuning steps have a test of their own)."""
    return load_config(CONFIG, ["resume=", "model.patch_dropout=0", *overrides])


def _first_fit_step(budget: StepBudget, seconds_per_step: float, start: int = 0) -> int:
    step = start
    while True:
        step += 1
        if budget.observe(step, (step - start) * seconds_per_step):
            return step
        assert step < start + 1000, "the first fit never became due"


def test_first_fit_after_the_calibration_window_at_the_measured_speed():
    budget = StepBudget(_cfg("train.max_steps=1000", "train.max_minutes=1"), start_step=0)
    step = _first_fit_step(budget, 2.0)
    assert step == WARM_STEPS + CALIBRATION_STEPS
    # 2 s/step, 50 s used of 60: 95% of the 10 s left holds 4 more steps.
    assert budget.fit(step, step * 2.0, 1000) == step + 4
    assert budget.seconds_per_step == pytest.approx(2.0)


def test_fits_stay_under_the_cap_and_later_fits_use_the_latest_speed():
    budget = StepBudget(_cfg("train.max_steps=100", "train.max_minutes=10"), start_step=0)
    step = _first_fit_step(budget, 1.0)
    assert budget.fit(step, float(step), 100) == 100  # 600 s hold far more than 100 steps
    assert budget.due_after_checkpoint()
    # The machine slows to 10 s/step: at step 50 (25 + 25 x 10 s = 275 s), 325 s are left.
    assert budget.fit(50, 275.0, 100) == 50 + int(0.95 * 325 / 10)


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def seconds(self) -> float:
        return self.now


def _fit_after(cfg, budget, state, clock, step, after_checkpoint=False):
    state.step = step
    return loop._fit_to_time(
        cfg, budget, state, clock, after_checkpoint, loop.DistInfo(), loop.NullLogger()
    )


def test_flip_tuning_steps_are_priced_at_their_slower_speed():
    cfg = load_config(
        CONFIG,
        ["resume=", "model.patch_dropout=0.5", "model.unmasked_tuning=0.2", "train.max_steps=1000"],
    )
    budget = StepBudget(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_minutes": 100 / 60})}),
        start_step=0,
    )
    step = _first_fit_step(budget, 1.0)  # masked steps of 1 s: 25 s used of 100
    # 95% of 75 s = 71.25 masked-step units. Whole-image arithmetic would plan 25 + 71 = 96
    # steps; 87 steps end their last 18 unmasked (steps 70-86 at 1.5 s): 45 + 17 x 1.5 = 70.5
    # units after step 25 (88 steps would need 71.5).
    assert budget.fit(step, 25.0, 1000) == 87
    # A window over steps 25-79 of that plan holds 10 tuning steps: 45 + 10 x 1.5 = 60 units,
    # so 60 s is a masked step of 1 s again.
    budget.fit(80, 85.0, 1000, planned=87)
    assert budget.seconds_per_step == pytest.approx(1.0)


def test_a_later_fit_raises_the_count_again_up_to_the_configured_one():
    cfg = _cfg("train.max_steps=1000", "train.max_minutes=10", "train.ckpt_every=100")
    budget, clock = StepBudget(cfg, start_step=0), _FakeClock()
    state = loop.TrainState(max_steps=1000, configured_max_steps=1000)
    for step in range(1, WARM_STEPS + CALIBRATION_STEPS):  # slow first steps: 2 s each
        clock.now = 2.0 * step
        assert _fit_after(cfg, budget, state, clock, step) is None
    clock.now = 2.0 * (WARM_STEPS + CALIBRATION_STEPS)
    cfg = _fit_after(cfg, budget, state, clock, WARM_STEPS + CALIBRATION_STEPS)
    assert cfg is not None and cfg.train.max_steps == state.max_steps < 300
    # Then 0.5 s/step: the fit after the checkpoint at step 100 raises the count, to <= 1000.
    clock.now += 0.5 * (101 - WARM_STEPS - CALIBRATION_STEPS)
    raised = _fit_after(cfg, budget, state, clock, 101, after_checkpoint=True)
    assert raised is not None and cfg.train.max_steps < raised.train.max_steps <= 1000
    assert state.max_steps == raised.train.max_steps
    # Not between checkpoints, and not when the count would not change.
    assert _fit_after(raised, budget, state, clock, 102) is None


def test_a_raise_never_sends_the_run_back_to_an_earlier_curriculum_stage():
    world = "data/synthetic/train"
    cfg = _cfg(
        "train.max_steps=1000",
        "train.max_minutes=10",
        f"data.train=[{{url: {world}}}, {{url: {world}, start: 0.5}}]",
    )
    budget, clock = StepBudget(cfg, start_step=0), _FakeClock()
    state = loop.TrainState(max_steps=200, configured_max_steps=1000)
    cfg = loop.with_max_steps(cfg, 200)  # fitted earlier; the second source joined at step 100
    for step in range(1, WARM_STEPS + CALIBRATION_STEPS + 1):
        budget.observe(step, 0.0)
    budget.fitted = True
    clock.now = 1.0  # machine far faster than planned: 1000 steps would fit
    assert _fit_after(cfg, budget, state, clock, 151, after_checkpoint=True) is None
    assert state.max_steps == 200


def test_later_fits_come_one_step_after_each_checkpoint_is_written(
    synth_world, tmp_path, monkeypatch
):
    """So the measured speed holds the checkpoint write and the data stream's restart."""
    calls = []
    real_fit = loop._fit_to_time

    def recording_fit(cfg, budget, state, clock, after_checkpoint, *rest):
        written = sorted(p.name for p in (tmp_path / "run/checkpoints").glob("step_*"))
        calls.append((state.step, after_checkpoint, written[-1:]))
        return real_fit(cfg, budget, state, clock, after_checkpoint, *rest)

    monkeypatch.setattr(loop, "_fit_to_time", recording_fit)
    overrides = ["train.max_steps=7", "train.ckpt_every=3", "train.max_minutes=30"]
    overrides += ["eval.max_items=20", "data.test=[]", "train.keep_checkpoints=5"]
    assert (
        main(["pretrain", CONFIG, *run_overrides(synth_world, tmp_path / "run", *overrides)]) == 0
    )
    assert [(step, written) for step, after, written in calls if after] == [
        (4, ["step_00000003"]),
        (7, ["step_00000006"]),
    ]
    assert [step for step, _, _ in calls] == list(range(1, 8))


def test_resumed_run_measures_from_its_own_first_steps():
    budget = StepBudget(_cfg("train.max_steps=1000", "train.max_minutes=60"), start_step=200)
    assert _first_fit_step(budget, 3.0, start=200) == 200 + WARM_STEPS + CALIBRATION_STEPS


@pytest.mark.parametrize("overrides", [["train.max_minutes=0"], ["train.fit_to_time=false"]])
def test_off_without_a_time_limit_or_when_switched_off(overrides):
    budget = StepBudget(_cfg("train.max_minutes=5", *overrides), start_step=0)
    assert not any(budget.observe(s, s * 100.0) for s in range(1, 200))
    assert not budget.due_after_checkpoint()


def test_resume_keeps_the_fitted_length_unless_max_steps_was_changed():
    saved = {"max_steps": 240, "configured_max_steps": 560}
    assert planned_steps(_cfg("train.max_steps=560"), saved) == 240
    assert planned_steps(_cfg("train.max_steps=800"), saved) == 800
    assert planned_steps(_cfg("train.max_steps=560"), {}) == 560  # an older checkpoint


def test_slow_run_fits_its_schedule_and_curriculum_to_the_time_limit(
    synth_world, tmp_path, capsys, monkeypatch
):
    real_step = loop.train_step

    def slow_step(*args, **kwargs):
        loop.time.sleep(0.1)  # every step takes >= 0.1 s: 400 steps need >= 40 s
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", slow_step)
    out = tmp_path / "run"
    world = synth_world / "train"
    args = [
        "pretrain",
        CONFIG,
        *run_overrides(
            synth_world,
            out,
            "train.max_steps=400",
            "train.max_minutes=0.4",  # 24 s: 5% of it covers the segment restart
            "train.ckpt_every=1000",
            "train.keep_checkpoints=10",
            "train.log_every=1",
            "train.lr=1e-3",
            "train.warmup_steps=2",
            "eval.max_items=20",
            "data.test=[]",
            # A second source that joins half-way: its start must move with the fitted length.
            f"data.train=[{{url: {world}}}, {{url: {world}, start: 0.5}}]",
        ),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "steps fit in train.max_minutes=0.4" in printed
    final = json.loads(printed.strip().splitlines()[-1])
    fitted = final["step"]
    assert WARM_STEPS + CALIBRATION_STEPS < fitted < 400
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fits = [(m["step"], m["max_steps"]) for m in metrics if "max_steps" in m]
    assert fits[-1][1] == fitted
    lrs = [m["lr"] for m in metrics if "lr" in m]
    assert lrs[-1] < 0.02 * max(lrs)  # the cosine ran to its end, not stopped mid-way
    # The half-way source started at the half of the length fitted by then (a data segment
    # with its checkpoint; the fit one step later may move the count a little), and the last
    # checkpoint remembers the final length.
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and checkpoints[1] == f"step_{fitted:08d}"
    boundary = int(checkpoints[0].removeprefix("step_"))
    length_then = [n for step, n in fits if step <= boundary][-1]
    assert boundary == (length_then + 1) // 2
    state = json.loads((out / f"checkpoints/step_{fitted:08d}/state.json").read_text())
    assert (state["max_steps"], state["configured_max_steps"]) == (fitted, 400)

    # Resuming the finished run keeps the fitted length: nothing left to train.
    assert main([*args, "resume=auto"]) == 0
    printed = capsys.readouterr().out
    assert f"{fitted} steps fitted to the time limit" in printed
    assert json.loads(printed.strip().splitlines()[-1])["step"] == fitted


def test_periodic_evaluation_skips_one_that_the_final_evaluation_follows_closely():
    train = load_config(None, ["train.eval_every=300", "train.max_steps=305"]).train
    assert [s for s in range(1, 305) if loop.periodic_eval_due(train, s)] == []
    train = load_config(None, ["train.eval_every=300", "train.max_steps=355"]).train
    assert [s for s in range(1, 355) if loop.periodic_eval_due(train, s)] == [300]
    train = load_config(None, ["train.eval_every=10", "train.max_steps=31"]).train
    assert [s for s in range(1, 31) if loop.periodic_eval_due(train, s)] == [10, 20, 30]
    never = load_config(None, ["train.eval_every=0", "train.max_steps=31"]).train
    assert not any(loop.periodic_eval_due(never, s) for s in range(1, 31))
