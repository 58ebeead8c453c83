"""Model registry and parity with the open_clip models vlpt wraps."""

import json
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from vlpt.models import (
    UnknownModelError,
    VisionLanguageModel,
    WeightsError,
    build_model,
    get_model_config,
    get_tokenizer,
    list_models,
)


def test_registry_has_the_documented_sizes():
    assert {"tiny", "small", "base", "large"} <= set(list_models())


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_and_runs(name):
    with torch.device("meta"):
        model = build_model(name)
    cfg = get_model_config(name)
    images = torch.zeros(2, 3, model.image_size, model.image_size, device="meta")
    tokens = torch.ones(2, model.context_length, dtype=torch.long, device="meta")
    out = model(images, tokens)
    assert out["image_features"].shape == (2, cfg["embed_dim"])
    assert out["text_features"].shape == (2, cfg["embed_dim"])


def test_tiny_size_matches_the_documented_budget():
    n = sum(p.numel() for p in build_model("tiny").parameters())
    assert 12e6 < n < 14.5e6


def test_unknown_model_is_one_clear_error():
    with pytest.raises(UnknownModelError, match="'vit-huge-9000' is not registered"):
        build_model("vit-huge-9000")


def _open_clip_twin(name):
    cfg = get_model_config(name)
    cfg.pop("description")
    return open_clip.model.CustomTextCLIP(**cfg)


def test_parity_with_open_clip_towers():
    torch.manual_seed(0)
    ref = _open_clip_twin("tiny").eval()
    model = build_model("tiny").eval()
    missing, unexpected = model.load_state_dict(ref.state_dict(), strict=False)
    assert unexpected == [] and missing == ["logit_bias"]
    tok = get_tokenizer("tiny")
    tokens = tok(
        ["a small red circle at the top left", "a large blue square below a tiny green star", "x"]
    )
    full = tok(
        ["a small red circle at the top left", "a large blue square below a tiny green star", "x"],
        pad_to_context=True,
    )
    assert tokens.shape[1] < full.shape[1]
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), ref.encode_image(images, normalize=True)
        )
        # vlpt trims padding before the text tower; the result must not change.
        torch.testing.assert_close(
            model.encode_text(tokens), ref.encode_text(full, normalize=True), atol=1e-5, rtol=1e-5
        )


def test_tokenizer_matches_open_clip():
    ours = get_tokenizer("tiny")
    ref = open_clip.tokenizer.SimpleTokenizer(context_length=40)
    texts = ["A Small red circle, top-left!", "word " * 60, ""]
    assert torch.equal(ours(texts, pad_to_context=True), ref(texts))
    assert ours(texts).shape == (3, 40) and ours(["a b", ""]).shape == (2, 4)
    assert ours.decode(ours(["a small red circle"])[0]) == "a small red circle"


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_loads_open_clip_checkpoint_files(tmp_path, fmt):
    torch.manual_seed(1)
    ref = open_clip.model.CLIP(
        **{k: v for k, v in get_model_config("tiny").items() if k != "description"}
    )
    path = tmp_path / f"ckpt.{fmt}"
    if fmt == "pt":  # the layout open_clip's trainer writes
        torch.save(
            {"epoch": 1, "state_dict": {"module." + k: v for k, v in ref.state_dict().items()}},
            path,
        )
    else:
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = build_model("tiny", pretrained=str(path)).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), ref.eval().encode_image(images, normalize=True)
        )


def test_bad_weight_files_are_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        build_model("tiny", pretrained=str(tmp_path / "none.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not be read"):
        build_model("tiny", pretrained=str(junk))
    other = tmp_path / "small.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(1)}, str(other))
    with pytest.raises(WeightsError, match="does not fit"):
        build_model("tiny", pretrained=str(other))


def test_custom_architecture_file(tmp_path):
    cfg = get_model_config("tiny")
    cfg["text_cfg"]["layers"] = 1
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(cfg))
    assert len(build_model(str(path)).text.transformer.resblocks) == 1


def test_conv_stem_replaces_the_patchify_conv():
    model = build_model("tiny-conv").eval()
    assert not isinstance(model.visual.conv1, torch.nn.Conv2d)
    with torch.no_grad():
        assert model.encode_image(torch.randn(2, 3, 64, 64)).shape == (2, 192)
    # Patch embeddings on the patchify conv's scale, not drowned by the position embedding
    # (PyTorch's default init gave std ~0.05 and ~100 wasted steps at the start of training).
    torch.manual_seed(0)
    assert 0.3 < model.visual.conv1(torch.randn(8, 3, 64, 64)).std() < 1.5
    cfg = get_model_config("tiny-conv")
    cfg["vision_cfg"]["stem_channels"] = [32, 64]  # patch 8 needs three halvings
    with pytest.raises(ValueError, match="one entry per halving"):
        VisionLanguageModel(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])


@pytest.mark.parametrize("kind", ["mean", "transformer"])
def test_clips_go_through_the_temporal_module(kind):
    torch.manual_seed(0)
    model = build_model("tiny", temporal=kind).eval()
    if model.temporal is not None and model.temporal.position is not None:
        torch.nn.init.normal_(model.temporal.position, std=1.0)  # as initialised; explicit
    clips = torch.randn(2, 4, 3, 64, 64)
    with torch.no_grad():
        forward, backward = model.encode_image(clips), model.encode_image(clips.flip(1))
        still = model.encode_image(clips[:, 0])  # an image is a one-frame clip
        one_frame = model.encode_image(clips[:, :1])
    assert forward.shape == (2, 192)
    torch.testing.assert_close(still, one_frame)
    if kind == "mean":
        torch.testing.assert_close(forward, backward)  # order-blind by construction
    else:
        assert (forward - backward).abs().max() > 1e-3


def test_image_model_mean_pools_clips_and_rejects_long_clips():
    model = build_model("tiny").eval()
    assert model.temporal is None
    clips = torch.randn(1, 3, 3, 64, 64)
    with torch.no_grad():
        frames = torch.stack(
            [model.encode_image(clips[:, t], normalize=False) for t in range(3)], 1
        )
        torch.testing.assert_close(
            model.encode_image(clips), torch.nn.functional.normalize(frames.mean(1), dim=-1)
        )
    long_clip = build_model("tiny", temporal="transformer").eval()
    with pytest.raises(ValueError, match="longer than the temporal module"):
        long_clip.encode_image(torch.randn(1, 33, 3, 64, 64))


def test_temporal_shift_mixes_neighbouring_frames_inside_the_tower():
    torch.manual_seed(0)
    shifted = build_model("tiny", temporal="transformer", temporal_shift=0.5).eval()
    plain = build_model("tiny", temporal="transformer").eval()
    # Hooks, not wrappers: the same parameters under the same names.
    assert shifted.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(shifted.state_dict())
    clips = torch.randn(2, 4, 3, 64, 64)
    still = clips[:, :1].expand(-1, 4, -1, -1, -1)
    with torch.no_grad():
        # An image, and a clip in which nothing moves, are what the unshifted tower sees.
        torch.testing.assert_close(
            shifted.encode_image(clips[:, 0]), plain.encode_image(clips[:, 0])
        )
        torch.testing.assert_close(shifted.encode_image(still), plain.encode_image(still))
        # With motion the frames' features differ, and the reversal is a pass of its own.
        frames, _ = shifted._encode_frames(clips, with_tokens=False)
        plain_frames, _ = plain._encode_frames(clips, with_tokens=False)
        assert (frames - plain_frames).abs().max() > 1e-3
        forward, backward = shifted.encode_clip_both_ways(clips)
        torch.testing.assert_close(forward, shifted.encode_image(clips))
        torch.testing.assert_close(backward, shifted.encode_image(clips.flip(1)))
        # Outside a clip pass the hooks are idle: frames encoded one by one are plain images.
        torch.testing.assert_close(
            shifted.encode_image(clips[:, 2]), plain.encode_image(clips[:, 2])
        )


def test_shift_frames_takes_channels_from_the_previous_and_next_frame():
    from vlpt.models.temporal import shift_frames

    x = torch.arange(3.0)[None, :, None, None].expand(1, 3, 1, 6).flatten(0, 1)  # frame t = t
    out = shift_frames(x, frames=3, fold=2).unflatten(0, (1, 3))[0, :, 0]
    assert out.tolist() == [
        [0, 0, 1, 1, 0, 0],  # first frame: no previous one, itself
        [0, 0, 2, 2, 1, 1],
        [1, 1, 2, 2, 2, 2],  # last frame: no next one, itself
    ]


@pytest.mark.parametrize(
    ("kind", "shift", "message"),
    [("mean", 0.25, "needs kind 'transformer'"), ("transformer", 1.0, r"in \[0, 1\)")],
)
def test_bad_temporal_shift_is_one_clear_error(kind, shift, message):
    with pytest.raises(ValueError, match=message):
        build_model("tiny", temporal=kind, temporal_shift=shift)


def test_temporal_shift_refuses_patch_dropout():
    with pytest.raises(ValueError, match="mix unrelated patches"):
        build_model("tiny", temporal="transformer", temporal_shift=0.5, patch_dropout=0.5)


def test_temporal_shift_refuses_gradient_checkpointing():
    model = build_model("tiny", temporal="transformer", temporal_shift=0.5)
    with pytest.raises(ValueError, match="would not see the clip's frames"):
        model.set_grad_checkpointing(True)


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ("model.patch_dropout=0.5", "cannot be combined with model.patch_dropout"),
        ("model.grad_checkpointing=true", "cannot be combined with model.grad_checkpointing"),
        ("model.temporal=mean", "needs model.temporal=transformer"),
    ],
)
def test_config_refuses_temporal_shift_with_what_it_cannot_work_with(other, message):
    from vlpt.config import ConfigError, load_config

    config = str(Path(__file__).parents[1] / "configs/pretrain/synthetic-video-tiny.yaml")
    with pytest.raises(ConfigError, match=message):
        load_config(config, [other])
