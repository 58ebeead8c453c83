"""Checkpoints: atomic folders, complete contents, safe loading, skipping cut-off folders."""

import json
import shutil

import pytest
import torch

from vlpt.config import RunConfig, dump_config
from vlpt.models import build_model
from vlpt.train import checkpoint as ckpt
from vlpt.train.optim import build_optimizer, lr_schedule


def _setup():
    torch.manual_seed(0)
    cfg = RunConfig()
    model = build_model("tiny")
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    loss = model(torch.randn(2, 3, 64, 64), torch.randint(1, 100, (2, 5)))["image_features"].sum()
    loss.backward()
    opt.step()
    return cfg, model, opt


def test_save_load_round_trip(tmp_path):
    cfg, model, opt = _setup()
    path = ckpt.save_checkpoint(
        tmp_path, 7, model, opt, {"step": 7, "samples": 14}, dump_config(cfg)
    )
    assert path.name == "step_00000007"
    assert sorted(p.name for p in path.iterdir()) == sorted(ckpt.REQUIRED_FILES)

    model2 = build_model("tiny")
    opt2 = build_optimizer(model2, cfg.train, torch.device("cpu"))
    state = ckpt.load_checkpoint(path, model2, opt2)
    assert state["step"] == 7
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(
        opt.state_dict()["state"][0]["exp_avg"], opt2.state_dict()["state"][0]["exp_avg"]
    )
    assert json.loads((path / "version.json").read_text())["vlpt"]


def test_a_checkpoint_of_another_architecture_is_one_clear_error(tmp_path):
    cfg, model, opt = _setup()
    path = ckpt.save_checkpoint(
        tmp_path, 3, model, opt, {"step": 3, "samples": 6}, dump_config(cfg)
    )
    other = build_model("tiny-conv")  # the run folder now meets another model.name
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000003' holds another architecture"):
        ckpt.load_checkpoint(path, other, None)


def test_rng_state_is_restored(tmp_path):
    cfg, model, opt = _setup()
    torch.manual_seed(5)
    path = ckpt.save_checkpoint(
        tmp_path, 1, model, opt, {"step": 1, "samples": 0}, dump_config(cfg)
    )
    after_save = torch.rand(4)
    torch.manual_seed(999)
    ckpt.load_checkpoint(path, model, opt)
    assert torch.equal(torch.rand(4), after_save)


def test_keeps_only_recent(tmp_path):
    cfg, model, opt = _setup()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(
            tmp_path, step, model, opt, {"step": step, "samples": 0}, dump_config(cfg), keep=2
        )
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]


def test_resume_skips_cut_off_folders(tmp_path, capsys):
    cfg, model, opt = _setup()
    good = ckpt.save_checkpoint(
        tmp_path, 10, model, opt, {"step": 10, "samples": 0}, dump_config(cfg)
    )
    # A kill mid-write leaves a temp folder...
    (tmp_path / ".tmp-step_00000020-abc").mkdir()
    # ...and a folder copied by hand may be cut off: truncated weights, missing files.
    cut = tmp_path / "step_00000030"
    shutil.copytree(good, cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 3])
    partial = tmp_path / "step_00000040"
    partial.mkdir()
    (partial / "state.json").write_text("{}")

    assert ckpt.find_resume_checkpoint(tmp_path) == good
    assert not (tmp_path / ".tmp-step_00000020-abc").exists()
    out = capsys.readouterr().out
    assert "step_00000040" in out and "step_00000030" in out
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.load_weights(cut)
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.load_checkpoint(partial, model, opt)


def test_load_trained_model_from_run_folder(tmp_path):
    cfg, model, opt = _setup()
    ckpt.save_checkpoint(
        tmp_path / "checkpoints", 3, model, opt, {"step": 3, "samples": 0}, dump_config(cfg)
    )
    loaded, loaded_cfg = ckpt.load_trained_model(tmp_path)
    assert loaded_cfg.model.name == "tiny"
    assert torch.equal(loaded.visual.conv1.weight, model.visual.conv1.weight)
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        ckpt.load_trained_model(tmp_path / "checkpoints")


def test_schedule_warmup_then_cosine():
    cfg = RunConfig().train.model_copy(
        update={"max_steps": 100, "warmup_steps": 10, "lr": 1.0, "min_lr_ratio": 0.1}
    )
    lrs = lr_schedule(cfg)
    assert len(lrs) == 100
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_weight_decay_groups():
    cfg = RunConfig()
    model = build_model("tiny")
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert "logit_scale" in {names[id(p)] for p in no_decay["params"]}
