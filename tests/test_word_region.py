"""Word-region alignment: each listed word against the batch's images by its best patch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import MICRO_MODEL

from vlpt.config import ConfigError, load_config
from vlpt.models import build_model, get_tokenizer
from vlpt.objectives import ModelWithObjectives, WordRegionAlignment, build_objectives

CAPTIONS = [
    "a red circle on the left",
    "a blue square and a red star",
    "a green circle",
    "nothing listed here",
]
WORDS = ["red", "circle", "square"]


def _setup(config_overrides: list[str] | None = None):
    cfg = load_config(
        None,
        [
            f"model.name={MICRO_MODEL}",
            "objectives.word_region.enabled=true",
            f"objectives.word_region.words=[{', '.join(WORDS)}]",
            *(config_overrides or []),
        ],
    )
    torch.manual_seed(0)
    model = build_model(MICRO_MODEL)
    tokenizer = get_tokenizer(MICRO_MODEL)
    objectives = build_objectives(cfg, model)
    size = model.image_size
    batch = {"image": torch.randn(len(CAPTIONS), 3, size, size), "text": tokenizer(CAPTIONS)}
    return cfg, model, tokenizer, objectives, batch


def test_loss_is_each_word_against_images_that_do_not_name_it() -> None:
    _, model, tokenizer, objectives, batch = _setup()
    region = next(o for o in objectives if isinstance(o, WordRegionAlignment))
    terms = ModelWithObjectives(model, objectives)(batch)

    # By hand, one occurrence at a time.
    with torch.no_grad():
        outputs = model(batch["image"], batch["text"], needs=region.needs)
    ids = {w: tokenizer.token_ids([w]) - {tokenizer.sot_id, tokenizer.eot_id} for w in WORDS}
    losses = []
    for i in range(len(CAPTIONS)):
        for pos, token in enumerate(batch["text"][i].tolist()):
            word = next((w for w, t in ids.items() if token in t), None)
            if word is None:
                continue
            t = F.normalize(model.project_text_states(outputs["text_states"][i, pos]), dim=-1)
            scores = []
            for j, other in enumerate(CAPTIONS):
                if j != i and word in other.split():
                    continue  # names the word too: not a negative
                v = F.normalize(
                    model.project_visual_tokens(outputs["visual_tokens"][j, 1:]), dim=-1
                )
                scores.append(((v @ t).max() / region.temperature, j == i))
            logits = torch.stack([s for s, _ in scores])
            target = next(k for k, (_, own) in enumerate(scores) if own)
            losses.append(F.cross_entropy(logits[None], torch.tensor([target])))
    assert len(losses) == 5  # red, circle | square, red | circle
    expected = torch.stack(losses).mean()
    torch.testing.assert_close(terms["loss/word_region"].detach(), expected, atol=1e-4, rtol=1e-4)
    assert terms["word_region/words"].item() == 5


def test_gradient_reaches_both_towers_and_no_new_parameters() -> None:
    _, model, _, objectives, batch = _setup(["loss.weight=0"])
    assert sum(p.numel() for p in objectives.parameters()) == 0
    terms = ModelWithObjectives(model, objectives)(batch)
    terms["loss/word_region"].backward()
    assert model.visual.transformer.resblocks[0].mlp.c_fc.weight.grad.abs().sum() > 0
    assert model.text.transformer.resblocks[0].mlp.c_fc.weight.grad.abs().sum() > 0
    assert model.visual.proj.grad.abs().sum() > 0


def test_a_batch_without_listed_words_gives_zero_loss() -> None:
    _, model, tokenizer, objectives, batch = _setup(["loss.weight=0"])
    batch["text"] = tokenizer(["nothing listed here", "nor here"] * 2)
    terms = ModelWithObjectives(model, objectives)(batch)
    assert terms["loss/word_region"].item() == 0.0 and terms["word_region/words"].item() == 0
    terms["loss/word_region"].backward()  # a graph, not a constant: backward works


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objectives.word_region.enabled=true"], "no words"),
        (["objectives.word_region.temperature=0"], "> 0"),
    ],
)
def test_bad_config_is_one_clear_error(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"model.name={MICRO_MODEL}", *overrides])


def test_words_alone_are_scored_by_their_own_text_embedding() -> None:
    _, model, tokenizer, objectives, batch = _setup(["objectives.word_region.in_context=false"])
    region = next(o for o in objectives if isinstance(o, WordRegionAlignment))
    terms = ModelWithObjectives(model, objectives)(batch)
    with torch.no_grad():
        outputs = model(batch["image"], batch["text"], needs=region.needs)
        alone = {w: model.encode_text(tokenizer([w]))[0] for w in WORDS}
    patches = F.normalize(model.project_visual_tokens(outputs["visual_tokens"][:, 1:]), dim=-1)
    losses = []
    for i, caption in enumerate(CAPTIONS):
        for word in (w for w in caption.split() if w in WORDS):
            allowed = [j for j, other in enumerate(CAPTIONS) if j == i or word not in other.split()]
            logits = torch.stack([(patches[j] @ alone[word]).max() for j in allowed])
            target = torch.tensor([allowed.index(i)])
            losses.append(F.cross_entropy(logits[None] / region.temperature, target))
    expected = torch.stack(losses).mean()
    torch.testing.assert_close(terms["loss/word_region"].detach(), expected, atol=1e-4, rtol=1e-4)


def test_a_clip_of_copies_aligns_as_its_image_does() -> None:
    # Every frame's patches are candidates, no frame's CLS token: a clip of three copies of an
    # image has the image's patches (three times) and so the image's loss.
    _, model, _, objectives, batch = _setup(["loss.weight=0"])
    model.eval()  # no patch dropout or other randomness between the two passes
    clips = {"image": batch["image"][:, None].expand(-1, 3, -1, -1, -1), "text": batch["text"]}
    with torch.no_grad():
        image = ModelWithObjectives(model, objectives)(batch)["loss/word_region"]
        clip = ModelWithObjectives(model, objectives)(clips)["loss/word_region"]
    torch.testing.assert_close(clip, image, atol=1e-4, rtol=1e-4)
