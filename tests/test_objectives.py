"""Contrastive objectives: parity with open_clip's losses (value and gradients), one process."""

from __future__ import annotations

import math

import open_clip.loss
import pytest
import torch
import torch.nn.functional as F

from vlpt.config import ConfigError, load_config
from vlpt.objectives import ClipLoss, SigLipLoss, all_gather_with_grad, build_objectives


def _inputs(batch: int = 16, dim: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random normalised features and temperature/bias leaves that record gradients."""
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).requires_grad_()
    return {
        "image_features": image,
        "text_features": text,
        "logit_scale": torch.tensor(math.log(10.0)).exp().detach().requires_grad_(),
        "logit_bias": torch.tensor(-5.0, requires_grad=True),
    }


def _value_and_grads(loss: torch.Tensor, inputs: dict[str, torch.Tensor], keys: list[str]):
    grads = torch.autograd.grad(loss, [inputs[k] for k in keys])
    return loss.detach(), grads


@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_matches_open_clip(local_loss: bool) -> None:
    keys = ["image_features", "text_features", "logit_scale"]
    ours_in, ref_in = _inputs(), _inputs()
    ours = ClipLoss(local_loss=local_loss)(ours_in)["loss/contrastive"]
    ref = open_clip.loss.ClipLoss(local_loss=local_loss)(*[ref_in[k] for k in keys])
    ours_v, ours_g = _value_and_grads(ours, ours_in, keys)
    ref_v, ref_g = _value_and_grads(ref, ref_in, keys)
    torch.testing.assert_close(ours_v, ref_v, rtol=1e-6, atol=0)
    for a, b in zip(ours_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_siglip_loss_matches_open_clip() -> None:
    keys = ["image_features", "text_features", "logit_scale", "logit_bias"]
    ours_in, ref_in = _inputs(), _inputs()
    ours = SigLipLoss()(ours_in)["loss/contrastive"]
    ref = open_clip.loss.SigLipLoss()(*[ref_in[k] for k in keys])
    ours_v, ours_g = _value_and_grads(ours, ours_in, keys)
    ref_v, ref_g = _value_and_grads(ref, ref_in, keys)
    torch.testing.assert_close(ours_v, ref_v, rtol=1e-6, atol=0)
    for a, b in zip(ours_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("objective", [ClipLoss(weight=0.5), SigLipLoss(weight=0.5)])
def test_weight_scales_loss_and_metrics_are_detached(objective: torch.nn.Module) -> None:
    out = objective(_inputs())
    unweighted = type(objective)()(_inputs())["loss/contrastive"]
    torch.testing.assert_close(out["loss/contrastive"], 0.5 * unweighted)
    assert out["loss/contrastive"].requires_grad
    metrics = {k: v for k, v in out.items() if not k.startswith("loss/")}
    assert "contrastive/logit_scale" in metrics and "contrastive/acc_i2t" in metrics
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())


def test_aligned_pairs_give_perfect_accuracy_and_small_loss() -> None:
    inputs = _inputs(batch=8, dim=64)
    inputs["text_features"] = inputs["image_features"].detach().clone()
    inputs["logit_scale"] = torch.tensor(100.0)
    out = ClipLoss()(inputs)
    assert out["contrastive/acc_i2t"] == 1.0 and out["contrastive/acc_t2i"] == 1.0
    assert out["loss/contrastive"] < 0.1


def test_bf16_autocast_inputs_give_fp32_loss() -> None:
    inputs = _inputs()
    reference = ClipLoss()(inputs)["loss/contrastive"]
    low = dict(inputs, image_features=inputs["image_features"].bfloat16())
    low["text_features"] = inputs["text_features"].bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ClipLoss()(low)["loss/contrastive"]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=2e-2, atol=0)


def test_labels_are_cached_per_device_size_and_offset() -> None:
    loss = ClipLoss()
    a = loss.labels(torch.device("cpu"), 4, 0)
    assert loss.labels(torch.device("cpu"), 4, 0) is a
    assert loss.labels(torch.device("cpu"), 4, 8).tolist() == [8, 9, 10, 11]
    signs = SigLipLoss().signs(torch.device("cpu"), 2, 6, 2)
    assert signs.tolist() == [[-1, -1, 1, -1, -1, -1], [-1, -1, -1, 1, -1, -1]]


def test_gather_is_identity_in_one_process() -> None:
    x = torch.randn(3, 4)
    assert all_gather_with_grad(x) is x


@pytest.mark.parametrize(("name", "cls"), [("clip", ClipLoss), ("siglip", SigLipLoss)])
def test_build_objectives_from_config(name: str, cls: type) -> None:
    local = ["loss.local_loss=true"] if name == "clip" else []
    cfg = load_config(None, [f"loss.name={name}", "loss.weight=2.0", *local])
    (objective,) = build_objectives(cfg)
    assert isinstance(objective, cls) and objective.weight == 2.0
    if name == "clip":
        assert objective.local_loss


@pytest.mark.parametrize("option", ["local_loss=true", "reversed_negatives=true"])
def test_clip_only_options_are_refused_for_siglip(option: str) -> None:
    with pytest.raises(ConfigError, match=f"loss.{option.split('=')[0]} is an option of the clip"):
        load_config(None, ["loss.name=siglip", f"loss.{option}"])
