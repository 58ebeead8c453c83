"""FLIP's patch dropout: which tokens each pattern keeps, and the inputs it refuses."""

from __future__ import annotations

import pytest
import torch
from conftest import MICRO_MODEL

from vlpt.config import ConfigError, load_config
from vlpt.models import build_model
from vlpt.models.patch_dropout import PatchDropout
from vlpt.train.build import model_from_config


def _numbered_tokens(batch: int, rows: int, cols: int) -> torch.Tensor:
    """(B, 1 + rows*cols, 2) tokens whose features are their own index (CLS = 0, patch p = p+1),
    so that what a dropout keeps can be read off its output."""
    index = torch.arange(1 + rows * cols, dtype=torch.float32)
    return index[None, :, None].expand(batch, -1, 2).clone()


def _kept(dropout: PatchDropout, batch: int, rows: int, cols: int) -> list[list[int]]:
    """Each sample's kept patch indices (row-major over the grid), the CLS token checked first."""
    out = dropout.train()(_numbered_tokens(batch, rows, cols))
    assert (out[:, 0] == 0).all(), "the CLS token is always kept, first"
    return [sorted(int(v) - 1 for v in row[1:, 0]) for row in out]


def test_random_dropout_keeps_a_fresh_subset_of_distinct_patches_per_image():
    torch.manual_seed(0)
    kept = _kept(PatchDropout(0.5), 64, 4, 4)
    assert all(len(k) == 8 and len(set(k)) == 8 for k in kept)
    assert len({tuple(k) for k in kept}) > 50  # C(16, 8) = 12870 subsets: near-all distinct
    counts = torch.bincount(torch.tensor(kept).flatten(), minlength=16)
    assert counts.min() > 16 and counts.max() < 48  # each patch kept ~half the time (32 of 64)


def test_grid_at_half_keeps_one_checkerboard_phase_so_every_dropped_patch_has_a_kept_neighbour():
    torch.manual_seed(0)
    rows, cols = 4, 6
    kept = _kept(PatchDropout(0.5, "grid", (rows, cols)), 32, rows, cols)
    black = sorted(p for p in range(rows * cols) if (p // cols + p % cols) % 2 == 0)
    white = sorted(set(range(rows * cols)) - set(black))
    assert {tuple(k) for k in kept} == {tuple(black), tuple(white)}  # both phases, nothing else
    for k in kept:
        for p in set(range(rows * cols)) - set(k):
            r, c = divmod(p, cols)
            neighbours = {(r + dr) * cols + c + dc for dr, dc in ((0, 1), (1, 0), (0, -1), (-1, 0))}
            neighbours = {n for n in neighbours if 0 <= n < rows * cols and abs(n % cols - c) <= 1}
            assert neighbours & set(k)


def test_grid_at_three_quarters_keeps_one_patch_in_every_two_by_two_block():
    torch.manual_seed(0)
    kept = _kept(PatchDropout(0.75, "grid", (4, 4)), 64, 4, 4)
    phases = set()
    for k in kept:
        blocks = [(p // 4 // 2, p % 4 // 2) for p in k]
        assert sorted(blocks) == [(0, 0), (0, 1), (1, 0), (1, 1)]  # one per block
        offsets = {(p // 4 % 2, p % 4 % 2) for p in k}
        assert len(offsets) == 1  # the same offset in each block
        phases |= offsets
    assert phases == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_dropout_is_the_identity_in_eval_mode():
    x = torch.randn(3, 17, 8)
    for dropout in (PatchDropout(0.5), PatchDropout(0.5, "grid", (4, 4))):
        assert dropout.eval()(x) is x


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0.6, "grid", (4, 4)), "0.5 \\(a checkerboard\\) or 1 - 1/k\\^2"),
        ((0.5, "grid", (3, 3)), "even number of patches"),
        ((0.75, "grid", (3, 4)), "divisible by 2"),
        ((0.5, "grid", None), "grid's \\(rows, cols\\)"),
        ((0.5, "blocks", (4, 4)), "pattern must be one of"),
        ((1.0, "random", None), "must be in \\(0, 1\\)"),
    ],
)
def test_impossible_patterns_are_refused_with_the_reason(args, message):
    with pytest.raises(ValueError, match=message):
        PatchDropout(*args)


def test_grid_refuses_tokens_of_another_grid():
    with pytest.raises(ValueError, match="built for 16 patches, got 24"):
        PatchDropout(0.5, "grid", (4, 4)).train()(torch.randn(2, 25, 8))


def test_config_refuses_a_grid_ratio_no_pattern_keeps():
    with pytest.raises(ConfigError, match="patch_dropout=0.6 with the grid pattern"):
        load_config(None, ["model.patch_dropout=0.6", "model.patch_dropout_pattern=grid"])
    cfg = load_config(None, ["model.patch_dropout=0.75", "model.patch_dropout_pattern=grid"])
    assert cfg.model.patch_dropout_pattern == "grid"
    load_config(None, ["model.patch_dropout=0.6"])  # random dropout takes any ratio


def test_model_keeps_its_pattern_through_the_unmasked_phase_and_trains_on_images_and_clips():
    torch.manual_seed(0)
    model = build_model(MICRO_MODEL, patch_dropout=0.5, patch_dropout_pattern="grid")
    model.set_patch_dropout(0.0)  # the unmasked tuning phase
    assert isinstance(model.visual.patch_dropout, torch.nn.Identity)
    model.set_patch_dropout(0.5)  # back on (a resumed run): the pattern it was built with
    dropout = model.visual.patch_dropout
    assert isinstance(dropout, PatchDropout) and dropout.pattern == "grid"
    model.train()
    for images in (torch.randn(4, 3, 32, 32), torch.randn(2, 3, 3, 32, 32)):  # images, clips
        features, tokens = model.encode_image_with_tokens(images)
        frames = images.shape[1] if images.dim() == 5 else 1
        assert tokens.shape[1] == frames * (1 + 8)  # CLS + half of each frame's 4 x 4 patches
        assert features.shape == (images.shape[0], 64) and features.isfinite().all()
        features.sum().backward()
    assert model.visual.conv1.weight.grad.abs().sum() > 0
    # Evaluation sees every patch: the features of a model with the dropout off.
    images = torch.randn(2, 3, 32, 32)
    evaluated = model.eval().encode_image(images)
    model.set_patch_dropout(0.0)
    assert torch.allclose(evaluated, model.train().encode_image(images), atol=1e-6)


def test_a_grid_the_model_cannot_hold_is_a_config_error_naming_the_keys():
    # 0.889 (one patch per 3 x 3 block) is a grid ratio, but micro's patch grid is 4 x 4.
    cfg = load_config(
        None,
        [
            f"model.name={MICRO_MODEL}",
            "model.patch_dropout=0.889",
            "model.patch_dropout_pattern=grid",
        ],
    )
    with pytest.raises(ConfigError, match="model.patch_dropout=0.889 .*divisible by 3"):
        model_from_config(cfg.model)


def test_grid_indices_follow_the_tokens_to_their_device():
    # The meta device stands in for CUDA: phases built on the CPU move to the tokens' device.
    dropout = PatchDropout(0.5, "grid", (4, 4)).train()
    out = dropout(torch.empty(2, 17, 8, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 9, 8)
    assert dropout._phases.device.type == "meta"
