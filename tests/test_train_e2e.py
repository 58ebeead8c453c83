"""End to end: `vlpt pretrain` on generated shards, resume after a kill, and torchrun with 2 ranks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MICRO_MODEL, ROOT, run_overrides

from vlpt.cli import main

CONFIG = str(ROOT / "configs/pretrain/synthetic-tiny.yaml")
BIN = Path(sys.executable).parent


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_pretrain_learns_and_reports(synth_world, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "pretrain",
            CONFIG,
            *run_overrides(
                synth_world,
                out,
                "train.max_steps=150",
                "train.batch_size=64",
                "train.log_every=5",
                "train.ckpt_every=75",
                "train.lr=1e-3",
            ),
        ]
    )
    assert code == 0
    final = json.loads(
        capsys.readouterr().out.strip().splitlines()[-1]
    )  # contract: last line is JSON
    assert final["step"] == 150 and final["samples"] == 150 * 64
    assert {"val/t2i_r1", "val/i2t_r10", "test/t2i_r1", "val/n_items"} <= set(final)
    assert final["val/n_items"] == 100
    # 100 val images: chance R@1 is 0.01, R@10 0.1; a trained model is well above.
    assert final["val/t2i_r10"] > 0.5, final
    losses = [m["loss"] for m in _metrics(out) if "loss" in m]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000075",
        "step_00000150",
    ]
    assert (out / "config.yaml").is_file() and any((out / "tb").iterdir())

    # Contract: `vlpt eval retrieval --json` prints one JSON object with these keys.
    assert (
        main(
            [
                "eval",
                "retrieval",
                "--checkpoint",
                str(out),
                "--data",
                str(synth_world / "val"),
                "--json",
            ]
        )
        == 0
    )
    evaluated = json.loads(capsys.readouterr().out)
    keys = {"t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "n_items", "n_captions"}
    assert keys <= set(evaluated) and evaluated["n_items"] == 100 and evaluated["n_captions"] == 500
    assert abs(evaluated["t2i_r10"] - final["val/t2i_r10"]) < 0.05  # fp32 here, bf16 in the loop


def test_dry_run_prints_the_plan(synth_world, tmp_path, capsys):
    assert (
        main(
            [
                "pretrain",
                CONFIG,
                *run_overrides(synth_world, tmp_path / "r"),
                "--dry-run",
                "--world-size",
                "8",
            ]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (
        plan["global_batch"] == 8 * 32
        and plan["parameters_M"] > 0
        and plan["gflops_per_sample"] > 0
    )
    assert [s["split"] for s in plan["sources"]] == ["train", "val", "test"]
    assert plan["sources"][0]["first_shard_samples"] == 200
    assert not (tmp_path / "r").exists()  # a dry run writes nothing


def test_missing_source_is_one_sentence(tmp_path, capsys):
    code = main(
        ["pretrain", CONFIG, f"data.train={tmp_path}/nothing/{{000..009}}.tar", "--dry-run"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("vlpt: error:") and "nothing" in err


def _run(args: list[str], env=None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def test_resume_after_kill_continues_the_same_curve(synth_world, tmp_path):
    common = [
        "train.max_steps=24",
        "train.log_every=1",
        "train.ckpt_every=8",
        "eval.max_items=20",
        "data.val=[]",
        "data.test=[]",
    ]
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    ref = _run(
        [str(BIN / "vlpt"), "pretrain", CONFIG, *run_overrides(synth_world, ref_out, *common)]
    )
    assert ref.wait(timeout=300) == 0, ref.stdout.read()

    # Kill the second run as soon as its step-16 checkpoint exists, mid-way to step 24.
    cut = _run(
        [str(BIN / "vlpt"), "pretrain", CONFIG, *run_overrides(synth_world, cut_out, *common)]
    )
    deadline = time.time() + 300
    while (
        not (cut_out / "checkpoints/step_00000016").exists()
        and time.time() < deadline
        and cut.poll() is None
    ):
        time.sleep(0.05)
    cut.send_signal(signal.SIGKILL)
    cut.wait()
    assert not (cut_out / "checkpoints/step_00000024").exists(), (
        "the run finished before it could be killed"
    )

    resumed = _run(
        [
            str(BIN / "vlpt"),
            "pretrain",
            CONFIG,
            *run_overrides(synth_world, cut_out, *common, "resume=auto"),
        ]
    )
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output and "step_00000016" in output

    ref_loss = {m["step"]: m["loss"] for m in _metrics(ref_out) if "loss" in m}
    cut_loss = {}
    for m in _metrics(cut_out):  # later lines (after the resume) win for repeated steps
        if "loss" in m:
            cut_loss[m["step"]] = m["loss"]
    assert set(cut_loss) == set(ref_loss) == set(range(1, 25))
    for step in range(17, 25):
        assert abs(cut_loss[step] - ref_loss[step]) < 1e-5, (step, cut_loss[step], ref_loss[step])


def test_torchrun_two_ranks(synth_world, tmp_path):
    out = tmp_path / "ddp"
    args = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "vlpt.cli",
        "pretrain",
        CONFIG,
    ]
    args += run_overrides(
        synth_world,
        out,
        "train.max_steps=6",
        "train.ckpt_every=3",
        "train.batch_size=16",
        "eval.max_items=50",
    )
    proc = _run(args, env={"OMP_NUM_THREADS": "1"})
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    final = json.loads(output.strip().splitlines()[-1])
    assert final["step"] == 6 and final["samples"] == 6 * 16 * 2  # both ranks' samples count
    assert final["val/n_items"] == 50


@pytest.mark.parametrize(
    "extra",
    [["loss.name=siglip"], ["model.patch_dropout=0.5", "train.accum_steps=2"]],
    ids=["siglip", "flip-accum"],
)
def test_other_objective_and_options_learn(synth_world, tmp_path, capsys, extra):
    args = run_overrides(
        synth_world,
        tmp_path / "r",
        "train.batch_size=64",
        "train.max_steps=100",
        "train.lr=1e-3",
        "data.test=[]",
        *extra,
    )
    assert main(["pretrain", CONFIG, *args]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["val/t2i_r10"] > 0.3, final  # chance is 0.1


def test_checkpoint_keeps_its_architecture(synth_world, tmp_path, capsys):
    # model.name is a path that is gone when the checkpoint is evaluated.
    arch = tmp_path / "my-arch.json"
    arch.write_text(Path(MICRO_MODEL).read_text())
    out = tmp_path / "run"
    run = run_overrides(synth_world, out, "train.max_steps=2", f"model.name={arch}")
    assert main(["pretrain", CONFIG, *run]) == 0
    arch.unlink()
    capsys.readouterr()
    args = ["--checkpoint", str(out), "--data", str(synth_world / "val"), "--json"]
    assert main(["eval", "retrieval", *args]) == 0
    assert json.loads(capsys.readouterr().out)["n_items"] == 100
