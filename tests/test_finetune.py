"""Fine-tuning: the caption decoder in the model, the caption objective, `vlpt finetune` from a
pretraining checkpoint (frozen towers, layer-wise LR decay) and its bad inputs."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import MICRO_MODEL, ROOT, run_overrides
from safetensors.torch import load_file

from vlpt.cli import main
from vlpt.config import ConfigError, load_config
from vlpt.models import build_model, caption_images, get_tokenizer
from vlpt.models.generation import generate
from vlpt.objectives import Captioning, ModelWithObjectives, build_objectives
from vlpt.train.checkpoint import load_trained_model
from vlpt.train.finetune import load_init_weights
from vlpt.train.optim import build_optimizer, set_lr

MICRO_CAPTION = str(ROOT / "tests/fixtures/micro-caption.json")
CAPTION_CONFIG = str(ROOT / "configs/finetune/synthetic-caption-tiny.yaml")
RETRIEVAL_CONFIG = str(ROOT / "configs/finetune/synthetic-retrieval-tiny.yaml")
CAPTIONS = ["a small red circle at the top", "a big blue star", "a green cross on the left"]


def _caption_cfg(*overrides: str):
    keys = ["objectives.caption.enabled=true", "loss.weight=0"]
    return load_config(None, [f"model.name={MICRO_CAPTION}", *keys, *overrides])


# ---- the decoder in the model ------------------------------------------------------------------


def test_registered_caption_model_has_a_decoder_sized_from_its_towers():
    with torch.device("meta"):
        model = build_model("tiny-conv-caption")
    assert model.heads()["decoder"] is model.decoder
    cfg = model.caption_decoder().cfg
    assert (cfg.visual_width, cfg.vocab_size, cfg.context_length) == (192, 49408, 40)


def test_caption_images_from_pixels_and_a_model_without_decoder():
    torch.manual_seed(0)
    model, tokenizer = build_model(MICRO_CAPTION).eval(), get_tokenizer(MICRO_CAPTION)
    texts = caption_images(model, tokenizer, torch.randn(2, 3, 32, 32), max_new_tokens=4)
    clips = caption_images(model, tokenizer, torch.randn(2, 3, 3, 32, 32), max_new_tokens=4)
    assert len(texts) == len(clips) == 2 and all(isinstance(t, str) for t in texts + clips)
    with pytest.raises(ValueError, match=r"no caption decoder \(decoder_cfg\)"):
        caption_images(build_model(MICRO_MODEL), tokenizer, torch.randn(1, 3, 32, 32))


# ---- the caption objective ---------------------------------------------------------------------


def test_caption_loss_falls_on_a_tiny_batch_and_only_the_caption_path_trains():
    torch.manual_seed(0)
    model = build_model(MICRO_CAPTION)
    trainer = ModelWithObjectives(model, build_objectives(_caption_cfg(), model))
    assert [type(o) for o in trainer.objectives] == [Captioning]
    batch = {"image": torch.randn(3, 3, 32, 32), "text": get_tokenizer(MICRO_MODEL)(CAPTIONS)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        terms = trainer(batch)
        optimizer.zero_grad()
        terms["loss/caption"].backward()
        optimizer.step()
        losses.append(terms["loss/caption"].item())
    assert "text_features" not in model(batch["image"], None)  # the text tower was skipped
    assert losses[-1] < 0.1 * losses[0] and terms["caption/token_acc"] > 0.95
    # Contrastive off: its parameters are frozen, every trainable one got a gradient (DDP-safe).
    assert not any(p.requires_grad for p in model.text.parameters())
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_coca_contrastive_and_caption_in_one_pass_on_clips():
    model = build_model(MICRO_CAPTION)
    trainer = ModelWithObjectives(model, build_objectives(_caption_cfg("loss.weight=1"), model))
    tokens = get_tokenizer(MICRO_MODEL)(CAPTIONS)
    terms = trainer({"image": torch.randn(3, 2, 3, 32, 32), "text": tokens})
    assert {"loss/contrastive", "loss/caption", "caption/token_acc"} <= set(terms)
    assert trainer.needs == {"features", "visual_tokens"}


def test_caption_objective_on_a_model_without_decoder_is_one_clear_error():
    cfg = load_config(None, [f"model.name={MICRO_MODEL}", "objectives.caption.enabled=true"])
    with pytest.raises(ConfigError, match=r"objectives\.caption.*caption decoder.*decoder_cfg"):
        build_objectives(cfg, build_model(MICRO_MODEL))
    with pytest.raises(ConfigError, match="nothing to train"):
        build_objectives(load_config(None, ["loss.weight=0"]))


# ---- layer-wise learning-rate decay ------------------------------------------------------------


def test_layer_decay_puts_each_blocks_rate_on_its_parameters():
    model = build_model(MICRO_CAPTION)  # towers of 2 blocks: ids 0 (embeddings), 1, 2, 3 (top)
    cfg = load_config(None, ["train.lr=1.0"]).train
    optimizer = build_optimizer(model, cfg, torch.device("cpu"), layer_decay=0.5)
    set_lr(optimizer, 0.1)
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    expected = {
        "visual.conv1.weight": 0.1 * 0.5**3,
        "visual.positional_embedding": 0.1 * 0.5**3,
        "visual.transformer.resblocks.0.mlp.c_fc.weight": 0.1 * 0.5**2,
        "visual.transformer.resblocks.1.attn.in_proj_weight": 0.1 * 0.5,
        "visual.proj": 0.1,
        "text.token_embedding.weight": 0.1 * 0.5**3,
        "text.transformer.resblocks.1.ln_1.weight": 0.1 * 0.5,
        "text.text_projection": 0.1,
        "decoder.blocks.0.mlp_fc.weight": 0.1,
        "logit_scale": 0.1,
    }
    for name, lr in expected.items():
        assert rate[id(params[name])] == pytest.approx(lr), name
    plain = build_optimizer(model, cfg, torch.device("cpu"))  # pretraining: one pair of groups
    assert len(plain.param_groups) == 2


def test_lr_scale_multiplies_rates_by_longest_prefix_on_top_of_layer_decay():
    model = build_model(MICRO_CAPTION)
    overrides = [
        "train.lr=1.0",
        "train.lr_scale={decoder: 3.0, decoder.blocks.0: 5.0, visual: 2.0}",
    ]
    cfg = load_config(None, overrides).train
    assert cfg.lr_scale == {"decoder": 3.0, "decoder.blocks.0": 5.0, "visual": 2.0}
    optimizer = build_optimizer(model, cfg, torch.device("cpu"), layer_decay=0.5)
    set_lr(optimizer, 0.1)
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    expected = {
        "decoder.blocks.0.mlp_fc.weight": 0.1 * 5.0,  # the longer prefix wins
        "decoder.ln_final.weight": 0.1 * 3.0,
        "decoder.token_embedding.weight": 0.1 * 3.0,
        "visual.conv1.weight": 0.1 * 0.5**3 * 2.0,  # times the layer-decay scale
        "visual.proj": 0.1 * 2.0,
        "text.text_projection": 0.1,  # no prefix: the scheduled rate
        "logit_scale": 0.1,
    }
    for name, lr in expected.items():
        assert rate[id(params[name])] == pytest.approx(lr), name
    # "decoder.block" is not a whole component of "decoder.blocks.0...": it names nothing
    for bad in ("{fusion: 2.0}", "{decoder.block: 2.0}"):
        typo = load_config(None, [f"train.lr_scale={bad}"]).train
        with pytest.raises(ConfigError, match=r"train\.lr_scale.*names no trainable parameter"):
            build_optimizer(model, typo, torch.device("cpu"))
    with pytest.raises(
        ConfigError, match=r"train\.lr_scale\.visual = 0.0 must be > 0.*finetune\.freeze"
    ):
        load_config(None, ["train.lr_scale={visual: 0}"])


# ---- vlpt finetune -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(synth_world, tmp_path_factory) -> Path:
    """A micro-model pretraining checkpoint (contrastive only, a few steps)."""
    out = tmp_path_factory.mktemp("pretrain")
    overrides = ["train.max_steps=4", "train.batch_size=16", "data.val=[]", "data.test=[]"]
    config = str(ROOT / "configs/pretrain/synthetic-tiny.yaml")
    assert main(["pretrain", config, *run_overrides(synth_world, out, *overrides)]) == 0
    return out / "checkpoints/step_00000004"


def _finetune_overrides(world: Path, out: Path, init: Path, *extra: str) -> list[str]:
    return run_overrides(
        world,
        out,
        f"init={init}",
        f"model.name={MICRO_CAPTION}",
        "finetune.decoder_init=",  # a contrastive init has no fusion encoder to start from
        "train.max_steps=3",
        "train.batch_size=16",
        "eval.max_items=10",
        "data.test=[]",
        *extra,
    )


def test_caption_finetune_from_a_pretraining_checkpoint_with_frozen_vision(
    synth_world, pretrained, tmp_path, capsys
):
    out = tmp_path / "caption"
    args = _finetune_overrides(synth_world, out, pretrained, "finetune.freeze=[vision]")
    assert main(["finetune", CAPTION_CONFIG, *args]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert any("freshly initialised: decoder" in line for line in printed)
    final = json.loads(printed[-1])
    assert final["step"] == 3 and {"val/caption/cider", "val/caption/bleu4"} <= set(final)
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").is_file()

    before, after = (
        load_file(pretrained / "model.safetensors"),
        load_file(out / "checkpoints/step_00000003/model.safetensors"),
    )
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("text."))
    model, cfg = load_trained_model(out)  # model.json carries the decoder
    assert model.decoder is not None and cfg.init == str(pretrained)
    assert torch.equal(
        model.decoder.blocks[0].mlp_fc.weight, after["decoder.blocks.0.mlp_fc.weight"]
    )


def test_caption_vocabulary_of_the_training_captions_is_saved_and_carried_on(
    synth_world, pretrained, tmp_path, capsys
):
    out = tmp_path / "caption-vocab"
    vocab = "objectives.caption.vocabulary=train"
    assert (
        main(
            ["finetune", CAPTION_CONFIG, *_finetune_overrides(synth_world, out, pretrained, vocab)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("vlpt: caption vocabulary:"))
    tokenizer = get_tokenizer(MICRO_CAPTION)
    words = {w for path in (synth_world / "train").glob("*.tar") for w in _caption_words(path)}
    expected = sorted(tokenizer.token_ids(sorted(words)) - {0})
    assert line.startswith(f"vlpt: caption vocabulary: {len(expected)} tokens")
    saved = load_file(out / "checkpoints/step_00000003/model.safetensors")["decoder.output_tokens"]
    assert saved.tolist() == expected

    model, _ = load_trained_model(out)  # built with the whole vocabulary, then the saved one
    _, visual = model.encode_image_with_tokens(torch.randn(4, 3, 32, 32))
    special = {"sot_id": tokenizer.sot_id, "eot_id": tokenizer.eot_id}
    tokens = generate(model.caption_decoder(), visual, max_new_tokens=8, **special)
    generated = set(tokens[:, 1:].flatten().tolist()) - {0}
    assert generated and generated <= set(expected)

    # A fine-tune from it keeps the vocabulary (vocabulary=model, the default).
    again = tmp_path / "again"
    assert main(["finetune", CAPTION_CONFIG, *_finetune_overrides(synth_world, again, out)]) == 0
    model, _ = load_trained_model(again)
    assert model.caption_decoder().output_tokens.tolist() == expected


def _caption_words(shard: Path) -> set[str]:
    with tarfile.open(shard) as tar:
        texts = [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")]
    return {word for text in texts for word in text.split()}


def test_retrieval_finetune_trains_the_towers_and_resumes(
    synth_world, pretrained, tmp_path, capsys
):
    out = tmp_path / "retrieval"
    args = _finetune_overrides(synth_world, out, pretrained, f"model.name={MICRO_MODEL}")
    args += ["eval.zeroshot=[]"]
    assert main(["finetune", RETRIEVAL_CONFIG, *args]) == 0
    before = load_file(pretrained / "model.safetensors")
    after = load_file(out / "checkpoints/step_00000003/model.safetensors")
    assert not torch.equal(before["visual.conv1.weight"], after["visual.conv1.weight"])
    assert not torch.equal(before["text.text_projection"], after["text.text_projection"])
    capsys.readouterr()
    assert main(["finetune", RETRIEVAL_CONFIG, *args, "train.max_steps=4"]) == 0  # resume=auto
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "step_00000003" in printed
    assert json.loads(printed.strip().splitlines()[-1])["step"] == 4

    # The same run folder with another model: one clear error, and the folder keeps its config.
    config = (out / "config.yaml").read_text()
    assert main(["finetune", CAPTION_CONFIG, *args, f"model.name={MICRO_CAPTION}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another architecture than this run's model" in err[0]
    assert (out / "config.yaml").read_text() == config


@pytest.mark.parametrize(
    ("init", "message"),
    [
        (None, "vlpt finetune needs init=CHECKPOINT"),
        ("nowhere/step_00000001", "init 'nowhere/step_00000001' does not exist"),
    ],
)
def test_finetune_without_usable_init_is_one_sentence(synth_world, tmp_path, capsys, init, message):
    args = run_overrides(synth_world, tmp_path / "run", f"model.name={MICRO_CAPTION}")
    if init is not None:
        args.append(f"init={init}")
    assert main(["finetune", CAPTION_CONFIG, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vlpt: error: {message}") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_init_into_another_architecture_names_the_tensor(pretrained):
    model = build_model("tiny")
    with pytest.raises(ValueError, match=r"does not fit model: 'visual\.[a-z_.0-9]+' has shape"):
        load_init_weights(model, pretrained)
    report = load_init_weights(build_model(MICRO_CAPTION), pretrained / "model.safetensors")
    assert report.fresh == ["decoder"] and report.ignored == []


def test_a_masked_run_starts_a_video_model_with_its_towers_only(tmp_path):
    """The video config's `init` is a masked run: towers load, its heads are left out."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    masked = build_model(str(ROOT / "tests/fixtures/micro-masked.json"))
    save_file(masked.state_dict(), tmp_path / "model.safetensors")
    video = build_model(MICRO_MODEL, temporal="transformer", temporal_shift=0.5)
    report = load_init_weights(video, tmp_path / "model.safetensors")
    assert report.fresh == ["temporal"] and report.ignored == ["fusion", "mae_decoder"]
    towers = {k: v for k, v in masked.state_dict().items() if k.split(".")[0] in ("visual", "text")}
    assert towers and all(torch.equal(video.state_dict()[k], v) for k, v in towers.items())


def test_finetune_dry_run_checks_init_then_prints_the_plan(
    synth_world, pretrained, tmp_path, capsys
):
    args = _finetune_overrides(synth_world, tmp_path / "plan", pretrained)
    assert main(["finetune", CAPTION_CONFIG, *args, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["model"] == MICRO_CAPTION and not (tmp_path / "plan").exists()
