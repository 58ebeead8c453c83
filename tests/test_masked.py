"""Masked objectives: masking statistics, MAE patches, ITM negatives, re-ranking, config switches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import MICRO_MODEL, ROOT

import vlpt.eval.rerank as rerank
from vlpt.config import ConfigError, load_config
from vlpt.eval.masked import VisualEvalSet, _all_attributes_masked, _one_attribute_masked
from vlpt.eval.rerank import itm_hard_negative_metrics, rerank_top_k
from vlpt.models import build_model
from vlpt.models.mae import mae_loss, patchify, random_patch_mask, unpatchify
from vlpt.objectives import (
    ClipLoss,
    ImageTextMatching,
    MaskedImageModeling,
    MaskedLanguageModeling,
    ModelWithObjectives,
    build_objectives,
    mask_tokens,
    sample_hard_negatives,
)
from vlpt.objectives.mlm import IGNORE
from vlpt.train.loop import _patch_dropout_at

MICRO_MASKED = str(ROOT / "tests/fixtures/micro-masked.json")
VOCAB, SOT, EOT = 49408, 49406, 49407


def _captions(n: int, words: int, generator: torch.Generator) -> torch.Tensor:
    """(n, words + 2 + 3) tokens: SOT, random words, EOT, three pads."""
    body = torch.randint(1, SOT, (n, words), generator=generator)
    sot, eot = torch.full((n, 1), SOT), torch.full((n, 1), EOT)
    return torch.cat([sot, body, eot, torch.zeros(n, 3, dtype=torch.long)], dim=1)


def test_mlm_masking_is_bert_80_10_10_over_words_only():
    g = torch.Generator().manual_seed(0)
    tokens = _captions(2000, 30, g)
    inputs, labels = mask_tokens(tokens, ratio=0.15, vocab_size=VOCAB, generator=g)
    selected = labels != IGNORE
    assert not selected[:, 0].any() and not selected[:, 31:].any()  # never SOT, EOT or padding
    assert abs(selected[:, 1:31].float().mean().item() - 0.15) < 0.01
    assert torch.equal(labels[selected], tokens[selected])
    assert torch.equal(inputs[~selected], tokens[~selected])  # unselected tokens untouched
    n = selected.sum().item()
    masked = (inputs[selected] == VOCAB).sum().item() / n
    kept = (inputs[selected] == tokens[selected]).sum().item() / n
    assert (
        abs(masked - 0.8) < 0.02 and abs(kept - 0.1) < 0.02 and abs(1 - masked - kept - 0.1) < 0.02
    )
    assert (
        inputs[selected & (inputs != VOCAB)].max() < SOT
    )  # random tokens are words, never specials


def test_focus_words_are_selected_at_their_own_ratio_from_the_config():
    g = torch.Generator().manual_seed(0)
    tokens = _captions(2000, 30, g)
    focus = torch.tensor([101, 202])
    tokens[:, 1:31:3] = 101  # every third word a focus token
    _, labels = mask_tokens(
        tokens, ratio=0.15, vocab_size=VOCAB, generator=g, focus=focus, focus_ratio=0.6
    )
    selected, is_focus = labels != IGNORE, tokens == 101
    assert abs(selected[is_focus].float().mean().item() - 0.6) < 0.02
    other = ~is_focus & (tokens > 0) & (tokens < SOT)
    assert abs(selected[other].float().mean().item() - 0.15) < 0.01

    cfg = _cfg(
        "objectives.mlm.enabled=true",
        'objectives.mlm.focus_words=["circle", "star", "red"]',
        "objectives.mlm.focus_ratio=0.4",
    )
    (mlm,) = [o for o in build_objectives(cfg) if isinstance(o, MaskedLanguageModeling)]
    from vlpt.models import get_tokenizer

    words = get_tokenizer(MICRO_MODEL)(["circle star red"])[0, 1:4]
    assert sorted(mlm.focus.tolist()) == sorted(words.tolist()) and mlm.focus_ratio == 0.4
    with pytest.raises(ConfigError, match=r"objectives\.mlm\.focus_ratio"):
        _cfg("objectives.mlm.focus_ratio=1")


def test_short_captions_get_one_masked_token_and_empty_ones_are_counted():
    tokens = torch.tensor([[SOT, 736, EOT, 0], [SOT, EOT, 0, 0]])
    _, labels = mask_tokens(tokens, ratio=0.15, vocab_size=VOCAB)
    assert (labels[0] != IGNORE).tolist() == [False, True, False, False]
    assert (labels[1] == IGNORE).all()
    model = build_model(MICRO_MASKED)
    batch = {"image": torch.randn(2, 3, 32, 32), "text": tokens[1:].repeat(2, 1)}
    out = model(batch["image"], batch["text"], needs=frozenset({"visual_tokens"}))
    terms = MaskedLanguageModeling()(out, model=model, batch=batch)
    assert terms["loss/mlm"].item() == 0.0 and terms["mlm/unmaskable"].item() == 2


def test_attribute_probes_mask_one_word_per_copy_or_all_at_once():
    tokens = torch.tensor([[7, 1, 2, 3, 9, 0], [7, 2, 9, 0, 0, 0]])  # 7 start, 9 end
    is_attribute = torch.isin(tokens, torch.tensor([1, 3, 2]))
    inputs, labels, row = _one_attribute_masked(tokens, is_attribute, mask_id=99)
    assert row.tolist() == [0, 0, 0, 1]
    assert inputs.tolist() == [
        [7, 99, 2, 3, 9, 0],
        [7, 1, 99, 3, 9, 0],
        [7, 1, 2, 99, 9, 0],
        [7, 99, 9, 0, 0, 0],
    ]
    assert labels[labels != IGNORE].tolist() == [1, 2, 3, 2]
    assert ((labels != IGNORE).sum(dim=1) == 1).all()
    inputs, labels, row = _all_attributes_masked(tokens, is_attribute, mask_id=99)
    assert inputs.tolist() == [[7, 99, 99, 99, 9, 0], [7, 99, 9, 0, 0, 0]]
    assert labels[labels != IGNORE].tolist() == [1, 2, 3, 2] and row.tolist() == [0, 1]


def test_tube_masking_hides_the_same_patches_in_every_frame():
    keep, mask = random_patch_mask(batch=3, n_patches=16, ratio=0.75, frames=4)
    assert keep.shape == (12, 4) and mask.shape == (12, 16)
    assert (mask.sum(1) == 12).all()
    for clip in range(3):
        frames = mask[clip * 4 : (clip + 1) * 4]
        assert (frames == frames[0]).all()
    assert not (mask[0] == mask[4]).all()  # different clips, different masks
    assert torch.equal(mask.gather(1, keep), torch.zeros_like(keep, dtype=torch.bool))


def test_patchify_round_trip_and_loss_on_masked_patches_only():
    images = torch.randn(2, 3, 32, 32)
    patches = patchify(images, 8)
    assert patches.shape == (2, 16, 192)
    assert torch.equal(unpatchify(patches, 8), images)
    assert torch.equal(patches[0, 1], images[0, :, 0:8, 8:16].permute(1, 2, 0).reshape(-1))
    _, mask = random_patch_mask(2, 16, 0.75)
    pred = torch.where(mask[..., None], patches, patches + 5.0)  # wrong only where visible
    assert mae_loss(pred, patches, mask).item() == 0.0


def test_hard_negatives_follow_similarity_and_skip_positives_and_duplicates():
    similarity = torch.tensor(
        [[10.0, 9.0, 0.0, 0.0], [0.0, 10.0, 0.0, 9.5], [0.0, 0.0, 10.0, 0.0], [9.0, 9.0, 9.0, 9.0]]
    )
    positive = torch.arange(4)
    exclude = torch.zeros(4, 4, dtype=torch.bool)
    exclude[1, 3] = True  # row 1's most similar other caption is a duplicate of its own
    g = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [sample_hard_negatives(similarity, positive, exclude, g) for _ in range(300)]
    )
    assert not (draws == positive).any() and not (draws[:, 1] == 3).any()
    assert (draws[:, 0] == 1).float().mean() > 0.95  # the high-similarity wrong caption
    assert set(draws[:, 3].tolist()) == {0, 1, 2}  # equal similarity: any non-positive


def test_rerank_reorders_only_the_top_k():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    reranked, top = rerank_top_k(scores, 3, lambda q, c: c.float())  # ITM prefers later items
    order = reranked[0].argsort(descending=True).tolist()
    assert sorted(top[0].tolist()) == [0, 1, 2]
    assert order == [2, 1, 0, 3, 4, 5]  # top 3 reversed by the ITM scores, the rest as before


def test_rerank_keeps_small_itm_differences_under_bf16_scores():
    # Scores as bf16 autocast makes them, ITM scores that differ by 0.01: the order must hold
    # (a fixed offset of 1e4 in bf16 once made every re-scored candidate tie).
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]], dtype=torch.bfloat16)
    reranked, _ = rerank_top_k(scores, 3, lambda q, c: -20 + 0.01 * c.float())
    assert reranked.dtype == torch.float32
    assert reranked[0].argsort(descending=True).tolist() == [0, 1, 2, 3, 4, 5]
    reranked, _ = rerank_top_k(scores, 3, lambda q, c: 20 - 0.5 * c.float())
    assert reranked[0].argsort(descending=True).tolist() == [0, 1, 2, 3, 4, 5]
    reranked, _ = rerank_top_k(scores, 3, lambda q, c: 0.5 * c.float())
    assert reranked[0].argsort(descending=True).tolist() == [2, 1, 0, 3, 4, 5]


def test_itm_metrics_split_matches_and_hardest_negatives(monkeypatch):
    # Four captions of three images; each caption's hardest negative is the most similar other
    # image. A stand-in head scores (image, caption) pairs from a table.
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0.5, 0], [0, 1, 0.6], [0.7, 0, 1], [0.9, 1, 0]])
    owner = torch.tensor([0, 1, 2, 1])
    data = VisualEvalSet(image, text, owner, torch.zeros(3, 2, 4), ["a", "b", "c", "d"])
    own = {(0, 0): 2.0, (1, 1): -1.0, (2, 2): 3.0, (1, 3): 0.5}  # (image, caption): score
    hardest = {(1, 0): -2.0, (2, 1): 0.5, (0, 2): 1.0, (0, 3): -0.5}
    table = own | hardest

    def scores(model, visual_tokens, tokens, items, captions, batch_size=256):
        return torch.tensor([table[(i, c)] for i, c in zip(items.tolist(), captions.tolist())])

    monkeypatch.setattr(rerank, "itm_scores", scores)
    metrics = itm_hard_negative_metrics(
        build_model(MICRO_MASKED), lambda c: torch.zeros(len(c), 5), data
    )
    assert metrics["itm_acc_match"] == 3 / 4  # image 1 with caption 1 rejected
    assert metrics["itm_acc_negative"] == 2 / 4  # (2, 1) and (0, 2) accepted
    assert metrics["itm_acc"] == 5 / 8
    assert metrics["itm_pair_acc"] == 3 / 4  # caption 1: -1.0 < 0.5


def _cfg(*overrides: str):
    return load_config(None, [f"model.name={MICRO_MASKED}", *overrides])


def test_objectives_switch_on_from_the_config_and_unused_heads_freeze():
    model = build_model(MICRO_MASKED)
    objectives = build_objectives(
        _cfg("objectives.mlm.enabled=true", "objectives.mim.weight=2"), model
    )
    assert [type(o) for o in objectives] == [ClipLoss, MaskedLanguageModeling]
    trainer = ModelWithObjectives(model, objectives)
    assert trainer.needs == {"features", "visual_tokens"}
    assert not any(p.requires_grad for p in model.fusion.itm_head.parameters())
    assert not any(p.requires_grad for p in model.mae_decoder.parameters())
    assert all(p.requires_grad for p in model.fusion.mlm_head.parameters())
    every = _cfg(*(f"objectives.{k}.enabled=true" for k in ("mlm", "itm", "mim")))
    kinds = [type(o) for o in build_objectives(every, build_model(MICRO_MASKED))]
    assert kinds == [ClipLoss, MaskedLanguageModeling, ImageTextMatching, MaskedImageModeling]


def test_all_objectives_train_together_and_every_trained_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = build_model(MICRO_MASKED)
    every = _cfg(*(f"objectives.{k}.enabled=true" for k in ("mlm", "itm", "mim")))
    trainer = ModelWithObjectives(model, build_objectives(every, model))
    from vlpt.models import get_tokenizer

    tokens = get_tokenizer(MICRO_MODEL)(
        ["a small red circle at the top", "a big blue star", "a green cross"]
    )
    terms = trainer({"image": torch.randn(3, 3, 32, 32), "text": tokens})
    assert {"loss/contrastive", "loss/mlm", "loss/itm", "loss/mim"} <= set(terms)
    sum(v for k, v in terms.items() if k.startswith("loss/")).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == ["logit_bias"]  # only SigLIP reads it; the loop freezes it for CLIP


def test_itm_scores_each_image_against_its_word_swapped_caption_too():
    torch.manual_seed(0)
    model = build_model(MICRO_MASKED)
    shapes = 'loss.swap_negatives=[["circle", "star", "cross"]]'
    cfg = _cfg("objectives.itm.enabled=true", "objectives.itm.swap_negatives=true", shapes)
    trainer = ModelWithObjectives(model, build_objectives(cfg, model))
    (itm,) = [o for o in trainer.objectives if isinstance(o, ImageTextMatching)]
    assert itm.word_swap is not None
    from vlpt.models import get_tokenizer

    captions = ["a small red circle at the top", "a big blue star", "a green square"]
    fused_batches: list[int] = []
    model.fuse = _recording(model.fuse, fused_batches)
    terms = trainer(
        {"image": torch.randn(3, 3, 32, 32), "text": get_tokenizer(MICRO_MODEL)(captions)}
    )
    assert fused_batches == [9, 2]  # 3 pairs x (true, two negatives); 2 captions have a shape
    assert 0 <= float(terms["itm/acc_swap"]) <= 1
    terms["loss/itm"].backward()
    assert all(p.grad is not None for p in model.fusion.itm_head.parameters())
    with pytest.raises(ConfigError, match="loss.swap_negatives, which is empty"):
        _cfg("objectives.itm.enabled=true", "objectives.itm.swap_negatives=true")


def _recording(fuse, sizes: list[int]):
    def wrapped(tokens, visual, states=None):
        sizes.append(len(tokens))
        return fuse(tokens, visual, states)

    return wrapped


def test_enabling_an_objective_without_its_head_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"objectives\.mlm.*micro\.json.*fusion"):
        build_objectives(
            load_config(None, [f"model.name={MICRO_MODEL}", "objectives.mlm.enabled=true"]),
            build_model(MICRO_MODEL),
        )
    with pytest.raises(ConfigError, match=r"objectives\.mim.*MAE decoder"):
        build_objectives(
            load_config(None, [f"model.name={MICRO_MODEL}", "objectives.mim.enabled=true"]),
            build_model(MICRO_MODEL),
        )


@pytest.mark.parametrize("key", ["objectives.mlm.mask_ratio", "objectives.mim.mask_ratio"])
@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_mask_ratio_outside_the_open_unit_interval_is_rejected(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [f"{key}={value}"])


def test_flip_unmasked_tuning_phase():
    cfg = load_config(
        None, ["model.patch_dropout=0.5", "model.unmasked_tuning=0.1", "train.max_steps=100"]
    )
    assert [_patch_dropout_at(cfg, s) for s in (0, 89, 90, 99)] == [0.5, 0.5, 0.0, 0.0]
    cfg = load_config(
        None, ["model.patch_dropout=0.5", "model.unmasked_tuning=5", "train.max_steps=100"]
    )
    assert [_patch_dropout_at(cfg, s) for s in (94, 95)] == [0.5, 0.0]
    assert _patch_dropout_at(load_config(None, ["model.patch_dropout=0.5"]), 999) == 0.5


def test_clips_give_frame_tokens_and_tube_masked_reconstruction():
    model = build_model(MICRO_MASKED)
    clips = torch.randn(2, 3, 3, 32, 32)
    features, tokens = model.encode_image_with_tokens(clips)
    assert features.shape == (2, 64) and tokens.shape == (2, 3 * 17, 64)
    assert torch.allclose(features, model.encode_image(clips), atol=1e-5)
    terms = MaskedImageModeling()({}, model=model, batch={"image": clips})
    assert terms["loss/mim"].isfinite()


def _token_embedding_model(tmp_path) -> str:
    """MICRO_MASKED with the fusion encoder on bare token embeddings (`text_states` false)."""
    cfg = json.loads(Path(MICRO_MASKED).read_text())
    cfg["fusion_cfg"]["text_states"] = False
    path = tmp_path / "micro-masked-embeddings.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_fusion_on_text_states_reads_the_text_tower_and_the_shared_states_agree(tmp_path):
    torch.manual_seed(0)
    model = build_model(MICRO_MASKED).eval()
    assert model.fusion.positional_embedding is None  # the text tower's positions serve
    tokens = _captions(3, 6, torch.Generator().manual_seed(0))
    visual = torch.randn(3, 17, 64)
    _, states = model.encode_text_with_states(tokens)
    fused = model.fuse(tokens, visual)
    # ITM passes the states the contrastive pass computed: the same as computing them here.
    assert torch.allclose(fused, model.fuse(tokens, visual, states), atol=1e-5)
    with torch.no_grad():  # a change inside the text tower reaches the fused states...
        model.text.transformer.resblocks[0].mlp.c_fc.bias.add_(1.0)
    assert not torch.allclose(fused, model.fuse(tokens, visual), atol=1e-3)
    plain = build_model(_token_embedding_model(tmp_path)).eval()  # ...not of the other layout
    before = plain.fuse(tokens, visual)
    with torch.no_grad():
        plain.text.transformer.resblocks[0].mlp.c_fc.bias.add_(1.0)
    assert torch.equal(before, plain.fuse(tokens, visual))


def test_summary_first_puts_the_end_token_state_where_the_itm_head_reads():
    from vlpt.models.fusion import FusionConfig, FusionEncoder

    torch.manual_seed(0)
    cfg = {"width": 64, "layers": 0, "heads": 2, "visual_width": 64, "text_states": True}
    plain, summary = FusionEncoder(cfg), FusionEncoder({**cfg, "summary_first": True})
    summary.load_state_dict(plain.state_dict())
    tokens = _captions(3, 6, torch.Generator().manual_seed(0))
    tokens[1, 5:] = torch.tensor([EOT, 0, 0, 0, 0, 0])  # a shorter caption: its own end token
    states, visual = torch.randn(3, tokens.shape[1], 64), torch.randn(3, 17, 64)
    embedding = torch.nn.Embedding(VOCAB, 64)
    expected = states.clone()
    expected[:, 0] = states[[0, 1, 2], [7, 5, 7]]  # each caption's end-token state
    real = torch.arange(tokens.shape[1]) <= torch.tensor([7, 5, 7])[:, None]  # up to the end token
    got = summary(tokens, visual, embedding, states)
    assert torch.allclose(got[real], plain.ln_final(expected)[real])
    assert torch.allclose(
        plain(tokens, visual, embedding, states)[real], plain.ln_final(states)[real]
    )
    with pytest.raises(ValueError, match="summary_first needs fusion_cfg.text_states"):
        FusionConfig(summary_first=True)


@pytest.mark.parametrize("contrastive", [True, False])
def test_fusion_on_text_states_trains_the_text_tower_with_or_without_contrastive(contrastive):
    torch.manual_seed(0)
    name = MICRO_MASKED
    model = build_model(name)
    switches = ["objectives.mlm.enabled=true", "objectives.itm.enabled=true"]
    if not contrastive:
        switches = ["loss.weight=0", "objectives.mlm.enabled=true"]
    cfg = load_config(None, [f"model.name={name}", *switches])
    trainer = ModelWithObjectives(model, build_objectives(cfg, model))
    from vlpt.models import get_tokenizer

    tokens = get_tokenizer(MICRO_MODEL)(["a small red circle at the top", "a big blue star"])
    terms = trainer({"image": torch.randn(2, 3, 32, 32), "text": tokens})
    sum(v for k, v in terms.items() if k.startswith("loss/")).backward()
    block = model.text.transformer.resblocks[-1].attn.in_proj_weight
    assert block.requires_grad and block.grad is not None and block.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == ["logit_bias"] if contrastive else missing == []
    if not contrastive:  # the projection to the embedding space is no input of the fusion
        assert not model.text.text_projection.requires_grad
