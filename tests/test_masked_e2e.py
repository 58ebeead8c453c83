"""End to end: `vlpt pretrain configs/pretrain/synthetic-tiny-masked.yaml`, then `vlpt eval mlm`
and `vlpt eval retrieval --rerank-k`, and the errors a user can run into."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, run_overrides
from safetensors.torch import load_file

from vlpt.cli import main

CONFIG = str(ROOT / "configs/pretrain/synthetic-tiny-masked.yaml")
MICRO_MASKED = str(ROOT / "tests/fixtures/micro-masked.json")
RETRIEVAL_KEYS = {
    "t2i_r1",
    "t2i_r5",
    "t2i_r10",
    "i2t_r1",
    "i2t_r5",
    "i2t_r10",
    "n_items",
    "n_captions",
}


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_masked_pretraining_runs_and_its_heads_evaluate(synth_world, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = run_overrides(
        synth_world,
        out,
        f"model.name={MICRO_MASKED}",
        "train.max_steps=16",
        "train.eval_every=8",
        "train.ckpt_every=16",
        "train.log_every=4",
        "eval.max_items=60",
        "eval.rerank_k=4",
        "resume=",
        "init=",  # the config starts from the image run; this test trains from scratch
    )
    assert main(["pretrain", CONFIG, *overrides]) == 0
    printed = capsys.readouterr().out
    final = json.loads(printed.strip().splitlines()[-1])
    # The shipped config predicts over the training captions' tokens, saved with the weights.
    line = next(x for x in printed.splitlines() if x.startswith("vlpt: MLM vocabulary:"))
    saved = load_file(out / "checkpoints/step_00000016/model.safetensors")
    vocabulary = saved["fusion.mlm_head.output_tokens"]
    assert line.startswith(f"vlpt: MLM vocabulary: {len(vocabulary)} tokens")
    assert 20 < len(vocabulary) < 200 and torch.equal(vocabulary, vocabulary.unique())
    for key in ("mlm_acc", "mlm_attr_acc", "mlm_attr_acc_shuffled", "itm_acc", "mim_loss"):
        assert 0 <= final[f"val/{key}"] < float("inf"), key
    itm = [final[f"val/itm_acc{k}"] for k in ("", "_match", "_negative")]
    assert itm[0] == pytest.approx((itm[1] + itm[2]) / 2) and 0 <= final["val/itm_pair_acc"] <= 1
    assert {f"val/rerank/{k}" for k in RETRIEVAL_KEYS if "_r" in k} <= set(final)
    assert sorted(p.name for p in (out / "mim").iterdir()) == [
        "val_step_00000008.png",
        "val_step_00000016.png",
    ]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {"loss/contrastive", "loss/mlm", "loss/itm", "loss/mim", "loss/word_region"}
    assert losses | {"itm/acc", "word_region/acc"} <= set(logged[0])
    assert logged[0]["word_region/words"] > 0  # the shipped words occur in synthetic captions

    # Contract: `vlpt eval mlm --json`.
    data = str(synth_world / "val")
    assert main(["eval", "mlm", "--checkpoint", str(out), "--data", data, "--json"]) == 0
    mlm = json.loads(capsys.readouterr().out)
    assert {"mlm_acc", "mlm_attr_acc", "mlm_attr_acc_shuffled", "n_tokens"} <= set(mlm)
    assert {"mlm_attr_all_acc", "mlm_attr_all_acc_shuffled", "n_attr_tokens"} <= set(mlm)
    assert mlm["n_tokens"] > 100
    # Colours, shapes and positions split the attribute words: a weighted mean of the three.
    kinds = [mlm[f"mlm_attr_acc_{k}"] for k in ("colour", "shape", "position")]
    assert min(kinds) - 1e-9 <= mlm["mlm_attr_acc"] <= max(kinds) + 1e-9
    # Contract: `--rerank-k` gives the same keys as plain retrieval.
    assert main(["eval", "retrieval", "--checkpoint", str(out), "--data", data, "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    args = ["eval", "retrieval", "--checkpoint", str(out), "--data", data, "--json"]
    assert main([*args, "--rerank-k", "5"]) == 0
    reranked = json.loads(capsys.readouterr().out)
    assert set(reranked) == set(plain) and set(reranked) >= RETRIEVAL_KEYS
    assert reranked["t2i_r10"] == plain["t2i_r10"]  # re-ordering the top 5 leaves R@10 alone


def test_masked_objectives_on_a_model_without_heads_are_one_sentence(synth_world, tmp_path, capsys):
    out = tmp_path / "plain"
    overrides = run_overrides(synth_world, out, "objectives.itm.enabled=true", "resume=", "init=")
    assert (
        main(
            [
                "pretrain",
                CONFIG,
                *overrides,
                "model.name=" + str(ROOT / "tests/fixtures/micro.json"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        err.startswith("vlpt: error: config enables objectives.mlm")
        and "micro.json' has no fusion encoder" in err
    )
    assert len(err.strip().splitlines()) == 1

    plain = run_overrides(synth_world, out, "train.max_steps=2", "resume=", "init=")
    plain += ["objectives.mlm.enabled=false", "objectives.itm.enabled=false"]
    plain += ["objectives.mim.enabled=false", "eval.rerank_k=0"]
    assert main(["pretrain", CONFIG, *plain]) == 0  # run_overrides picks the head-less micro model
    capsys.readouterr()
    data = str(synth_world / "val")
    assert main(["eval", "mlm", "--checkpoint", str(out), "--data", data]) == 2
    assert "no fusion encoder" in capsys.readouterr().err
    assert (
        main(["eval", "retrieval", "--checkpoint", str(out), "--data", data, "--rerank-k", "3"])
        == 2
    )
    assert "--rerank-k needs" in capsys.readouterr().err
