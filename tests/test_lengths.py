"""Captions in groups of similar length (`model.length_groups`): the text tower and the fusion
encoder give every caption what the whole padded batch gives it, and the same gradients."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import MICRO_MODEL, ROOT

from vlpt.config import ConfigError, load_config
from vlpt.models import build_model, get_tokenizer
from vlpt.models.lengths import by_length, caption_lengths
from vlpt.objectives import ModelWithObjectives, build_objectives
from vlpt.train.build import model_from_config

MICRO_MASKED = str(ROOT / "tests/fixtures/micro-masked.json")
CAPTIONS = [
    "a star",
    "a small red circle at the top left and a big blue star at the bottom right of the picture",
    "a green cross",
    "a big blue star in the middle",
    "two shapes: a tiny white diamond on the left and a purple square on the right",
    "a yellow triangle",
    "an orange square at the bottom",
]


def test_groups_call_each_length_slice_cut_to_its_longest_row_in_the_batch_order():
    lengths = torch.tensor([3, 9, 2, 5, 9, 1, 4])
    calls = []

    def fn(rows: torch.Tensor, cut: int) -> torch.Tensor:
        calls.append((sorted(rows.tolist()), cut))
        return rows[:, None, None].float().expand(-1, cut, 2) + 1  # row id + 1, every position

    out = by_length(fn, lengths, groups=3, total=10)
    assert out.shape == (7, 10, 2)
    assert [cut for _, cut in calls] == [3, 5, 9]  # sorted: [1 2 3] [4 5] [9 9]
    assert sorted(r for rows, _ in calls for r in rows) == list(range(7))
    for row, length in enumerate(lengths.tolist()):
        assert (out[row, :length] == row + 1).all()  # every row's own values, in its place
    cut_of = {r: cut for rows, cut in calls for r in rows}
    assert all((out[r, cut_of[r] :] == 0).all() for r in range(7))  # zeros past its group's cut
    single = by_length(fn, lengths, groups=1, total=10)
    assert (
        calls[-1] == (list(range(7)), 10)
        and (single[:, :, 0] == torch.arange(7)[:, None] + 1).all()
    )

    tokens = torch.tensor([[9, 5, 7, 0], [9, 7, 0, 0], [9, 5, 5, 5]])
    assert caption_lengths(tokens, eot_id=7).tolist() == [3, 2, 4]  # no end token: all of it


def test_text_tower_and_fusion_in_groups_match_the_padded_batch():
    torch.manual_seed(0)
    model = build_model(MICRO_MASKED).eval()
    tokens = get_tokenizer(MICRO_MODEL)(CAPTIONS)
    lengths = caption_lengths(tokens, model.eot_id)
    visual = torch.randn(len(CAPTIONS), 17, 64)
    results = {}
    for groups in (1, 3):
        model.set_length_groups(groups)
        with torch.no_grad():
            features, states = model.encode_text_with_states(tokens)
            fused = model.fuse(tokens, visual)
        results[groups] = features, states, fused
    torch.testing.assert_close(results[3][0], results[1][0], atol=1e-5, rtol=1e-5)
    for row, length in enumerate(lengths.tolist()):  # every state a caption has
        for part in (1, 2):
            torch.testing.assert_close(
                results[3][part][row, :length], results[1][part][row, :length], atol=1e-5, rtol=1e-5
            )


def test_every_objective_gets_the_same_gradients_in_groups():
    cfg = load_config(
        None,
        [f"model.name={MICRO_MASKED}"]
        + [f"objectives.{k}.enabled=true" for k in ("mlm", "itm", "mim")],
    )
    tokens = get_tokenizer(MICRO_MODEL)(CAPTIONS[:6])
    grads = {}
    for groups in (1, 4):
        torch.manual_seed(0)
        model = build_model(MICRO_MASKED)
        model.set_length_groups(groups)
        trainer = ModelWithObjectives(model, build_objectives(cfg, model))
        torch.manual_seed(1)  # the same masks, MAE patches and ITM negatives
        terms = trainer({"image": torch.randn(6, 3, 32, 32), "text": tokens})
        sum(v for k, v in terms.items() if k.startswith("loss/")).backward()
        grads[groups] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[1].keys() == grads[4].keys() and len(grads[1]) > 50
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[4][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_length_groups_come_from_the_config_and_must_be_positive():
    cfg = load_config(None, [f"model.name={MICRO_MASKED}", "model.length_groups=2"])
    model = model_from_config(cfg.model)
    assert model.length_groups == 2 and model.fusion.length_groups == 2
    assert build_model(MICRO_MASKED).length_groups == 4  # the default
    with pytest.raises(ConfigError, match=r"model\.length_groups"):
        load_config(None, ["model.length_groups=0"])


def test_a_tower_that_sees_its_padding_runs_as_one_group(tmp_path):
    cfg = json.loads((ROOT / "tests/fixtures/micro.json").read_text())
    cfg["text_cfg"] = {**cfg["text_cfg"], "no_causal_mask": True}  # bidirectional: not exact
    path = tmp_path / "bidirectional.json"
    path.write_text(json.dumps(cfg))
    torch.manual_seed(0)
    model = build_model(str(path)).eval()
    tokens = get_tokenizer(MICRO_MODEL)(CAPTIONS)
    with torch.no_grad():
        grouped = model.encode_text(tokens)  # the default 4 groups asked for
        model.set_length_groups(1)
        assert torch.equal(grouped, model.encode_text(tokens))
