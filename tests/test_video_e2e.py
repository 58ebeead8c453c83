"""Video end to end: clips + images in one run, temporal-order and action evaluation, the CLI."""

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_overrides

from vlpt.cli import main
from vlpt.data.synthetic import write_video_dataset
from vlpt.eval import EvalEmbeddings, temporal_metrics
from vlpt.eval.temporal import order_accuracy

CONFIG = str(ROOT / "configs/pretrain/synthetic-video-tiny.yaml")


@pytest.fixture(scope="module")
def clip_world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clips")
    write_video_dataset(
        out, seed=1, n_train=120, n_val=30, n_test=20, size=32, num_frames=8, shard_size=60,
        workers=1, progress=False,
    )  # fmt: skip
    return out


def test_order_accuracy_counts_ties_as_half():
    right = torch.tensor([1.0, 0.0, 0.5, 0.2])
    wrong = torch.tensor([0.0, 1.0, 0.5, 0.2])
    assert order_accuracy(right, wrong) == pytest.approx(0.5)
    assert order_accuracy(right[:1], wrong[:1]) == 1.0


def test_temporal_metrics_on_hand_made_embeddings():
    # Two clips, two captions each; clip 1 has no reversed captions (an image-like item).
    e = torch.eye(4)
    emb = EvalEmbeddings(
        image=torch.stack([e[0], e[1]]),
        text=torch.stack([e[0], e[0], e[1], e[1]]),
        text_to_image=torch.tensor([0, 0, 1, 1]),
        reversed_rows=torch.tensor([0]),
        image_reversed=torch.stack([e[2]]),  # reversed clip 0 matches none of its captions
        text_reversed=torch.stack([e[3], e[0]]),  # 1st pair: true wins; 2nd: a tie
        reversed_text_rows=torch.tensor([0, 1]),
    )
    metrics = temporal_metrics(emb)
    assert metrics["temporal_text_acc"] == pytest.approx(0.75)
    assert metrics["temporal_video_acc"] == 1.0
    assert metrics["temporal_n_items"] == 1 and metrics["temporal_n_pairs"] == 2
    with pytest.raises(ValueError, match="reversed_captions"):
        temporal_metrics(EvalEmbeddings(torch.eye(2), torch.eye(2), torch.tensor([0, 1])))


@pytest.fixture(scope="module")
def image_run(synth_world, tmp_path_factory) -> Path:
    """The micro model after a few image steps: what the video config starts from (`init`)."""
    out = tmp_path_factory.mktemp("image_run")
    config = str(ROOT / "configs/pretrain/synthetic-tiny.yaml")
    overrides = run_overrides(synth_world, out, "train.max_steps=2", "eval.max_items=20")
    assert main(["pretrain", config, *overrides]) == 0
    return out


def _video_run(
    world: Path, clips: Path, out: Path, *extra: str, init: Path | str = ""
) -> list[str]:
    return [
        "pretrain",
        CONFIG,
        f"init={init}",
        *run_overrides(world, out, *extra),
        f"data.train=[{{url: {clips / 'train'}, weight: 0.7}}, {{url: {world / 'train'}, weight: 0.3}}]",
        f"data.val={clips / 'val'}",
        f"data.test={clips / 'test'}",
        "data.num_frames=4",
        "train.batch_size=16",
        "eval.max_items=0",
    ]


def test_video_pretrain_from_the_image_run_and_temporal_eval(
    synth_world, clip_world, image_run, tmp_path, capsys
):
    out = tmp_path / "run"
    steps = ("train.max_steps=12", "train.ckpt_every=12")
    assert main(_video_run(synth_world, clip_world, out, *steps, init=image_run)) == 0
    printed = capsys.readouterr().out
    # The towers come from the image run; the temporal module is new.
    assert "freshly initialised: temporal" in printed
    final = json.loads(printed.strip().splitlines()[-1])
    assert final["step"] == 12
    for split in ("val", "test"):
        assert 0.0 <= final[f"{split}/temporal_text_acc"] <= 1.0
        assert 0.0 <= final[f"{split}/temporal_video_acc"] <= 1.0
        assert final[f"{split}/n_items"] == {"val": 30, "test": 20}[split]
    assert final["val/zeroshot_action_n"] > 0

    # Contract: `vlpt eval temporal --json` prints one object with these keys.
    args = ["--checkpoint", str(out), "--data", str(clip_world / "val"), "--json"]
    assert main(["eval", "temporal", *args]) == 0
    temporal = json.loads(capsys.readouterr().out)
    assert {"temporal_text_acc", "temporal_video_acc", "n_items"} <= set(temporal)
    assert temporal["n_items"] == 30
    # The breakdown by action covers every pair, and its weighted mean is the overall accuracy.
    groups = temporal["by_action"].values()
    assert sum(g["n_pairs"] for g in groups) == temporal["n_pairs"]
    for key in ("text", "video"):
        mean = sum(g[f"{key}_acc"] * g["n_pairs"] for g in groups) / temporal["n_pairs"]
        assert abs(mean - temporal[f"temporal_{key}_acc"]) < 1e-3
    assert "two events" in temporal["by_action"] and len(temporal["by_action"]) > 2
    assert main(["eval", "temporal", *args[:-1]]) == 0  # the table for people
    table = capsys.readouterr().out
    assert "by_action" in table and "two events" in table and "video_acc" in table
    # Retrieval works on clip shards with the image keys.
    assert main(["eval", "retrieval", *args]) == 0
    retrieval = json.loads(capsys.readouterr().out)
    assert retrieval["n_items"] == 30 and retrieval["n_captions"] == 150
    assert main(["eval", "zeroshot", "--task", "action", *args]) == 0
    assert "zeroshot_action_n" in json.loads(capsys.readouterr().out)


def test_mean_pooling_cannot_tell_a_clip_from_its_reversal(
    synth_world, clip_world, image_run, tmp_path, capsys
):
    out = tmp_path / "run"
    run = _video_run(
        synth_world,
        clip_world,
        out,
        "train.max_steps=4",
        "model.temporal=mean",
        "model.temporal_shift=0",
        init=image_run,
    )
    assert main(run) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["val/temporal_video_acc"] == pytest.approx(0.5, abs=1e-6)  # exact ties


def test_frames_curriculum_changes_clip_length_at_a_segment_boundary(
    synth_world, clip_world, tmp_path, capsys
):
    out = tmp_path / "run"
    run = _video_run(
        synth_world,
        clip_world,
        out,
        "train.max_steps=6",
        "train.ckpt_every=100",
        "data.frames_curriculum=[[0, 1], [0.5, 3]]",
        "train.log_every=1",
    )
    assert main(run) == 0
    # The stage change at step 3 ends a data segment with a checkpoint, so resume reproduces it.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000003",
        "step_00000006",
    ]
    from vlpt.config import load_config
    from vlpt.train.loop import frames_at

    cfg = load_config(CONFIG, run[2:])
    assert [frames_at(cfg, s) for s in range(6)] == [1, 1, 1, 3, 3, 3]


def test_images_first_then_clips_from_the_source_start(synth_world, clip_world, tmp_path, capsys):
    out = tmp_path / "run"
    run = [
        *_video_run(synth_world, clip_world, out, "train.max_steps=6", "train.ckpt_every=100"),
        f"data.train=[{{url: {clip_world / 'train'}, weight: 0.7, start: 0.5}}, "
        f"{{url: {synth_world / 'train'}, weight: 0.3}}]",
    ]
    assert main(run) == 0
    # Joining the mix at step 3 ends a data segment with a checkpoint, like a frames stage.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000003",
        "step_00000006",
    ]
    from vlpt.config import load_config
    from vlpt.data import build_train_loader
    from vlpt.models import get_tokenizer
    from vlpt.train.loop import data_at

    cfg = load_config(CONFIG, run[2:])
    clips, images = str(clip_world / "train"), str(synth_world / "train")
    urls = [[s.url for s in data_at(cfg, step).train] for step in (0, 2, 3, 5)]
    assert urls == [[images], [images], [clips, images], [clips, images]]
    first_stage = data_at(cfg, 0).model_copy(update={"workers": 0})
    loader = iter(
        build_train_loader(
            first_stage,
            image_size=32,
            mean=(0.5,) * 3,
            std=(0.5,) * 3,
            tokenizer=get_tokenizer("tiny"),
            batch_size=8,
        )  # fmt: skip
    )
    assert all(next(loader)["image"].ndim == 4 for _ in range(5))  # still images only


def test_a_mix_where_no_source_starts_at_zero_is_one_clear_error(capsys):
    bad = "data.train=[{url: data/a, start: 0.2}, {url: data/b, start: 0.5}]"
    assert main(["pretrain", CONFIG, bad, "--dry-run"]) != 0
    assert "start at 0" in capsys.readouterr().err


@pytest.mark.parametrize("stages", ["[[0.5, 2], [0.2, 4]]", "[[0, 0]]", "[[1.5, 2]]"])
def test_bad_frames_curriculum_is_one_clear_error(stages, capsys):
    assert main(["pretrain", CONFIG, f"data.frames_curriculum={stages}", "--dry-run"]) != 0
    assert "frames_curriculum" in capsys.readouterr().err


def test_reversed_clips_are_extra_negatives_for_captions():
    from vlpt.objectives import ClipLoss

    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    clips = torch.nn.functional.normalize(text + 0.1 * torch.randn(4, 8), dim=-1)
    outputs = {"image_features": clips, "text_features": text, "logit_scale": torch.tensor(10.0)}
    plain = ClipLoss()(outputs)
    assert ClipLoss(reversed_negatives=True).needs == {"features", "reversed_features"}
    # An order-blind model: the reversed clip equals the clip, so the caption cannot prefer it.
    blind = ClipLoss(reversed_negatives=True)({**outputs, "reversed_features": clips})
    assert blind["contrastive/acc_order"] == 0.0
    assert blind["loss/contrastive"] > plain["loss/contrastive"]
    # Reversals far from the caption: order is right and the loss barely moves.
    away = ClipLoss(reversed_negatives=True)({**outputs, "reversed_features": -clips})
    assert away["contrastive/acc_order"] == 1.0
    assert float(away["loss/contrastive"]) == pytest.approx(
        float(plain["loss/contrastive"]), rel=0.05
    )
