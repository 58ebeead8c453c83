"""Word-swap hard negative captions (NegCLIP) for the contrastive loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlpt.config import ConfigError, load_config
from vlpt.models import Tokenizer
from vlpt.objectives import ClipLoss, WordSwap, build_objectives

SHAPES = ["circle", "square", "triangle", "star"]
COLOURS = ["red", "blue", "green"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(context_length=32)


def _decode(tokenizer: Tokenizer, row: torch.Tensor) -> list[int]:
    return [t for t in row.tolist() if t not in (0, tokenizer.sot_id, tokenizer.eot_id)]


def test_each_negative_differs_in_one_word_of_the_same_group(tokenizer: Tokenizer) -> None:
    swap = WordSwap.from_words([SHAPES, COLOURS], tokenizer)
    groups = [set(tokenizer.token_ids(SHAPES)), set(tokenizer.token_ids(COLOURS))]
    captions = ["a red circle at the top", "two blue stars and a green square", "plain grey"]
    tokens = tokenizer(captions * 50)
    negatives, valid = swap(tokens, generator=torch.Generator().manual_seed(0))
    assert valid.tolist() == [True, True, False] * 50
    assert torch.equal(negatives[~valid], tokens[~valid])  # nothing to swap: left as it is
    for old, new in zip(tokens[valid], negatives[valid]):
        changed = (old != new).nonzero().flatten().tolist()
        assert len(changed) == 1
        a, b = int(old[changed[0]]), int(new[changed[0]])
        assert any(a in g and b in g for g in groups), "swapped within its group"
    # Every word of a caption is a candidate, and every other member a replacement.
    swapped_in = {int(n) for o, n in zip(tokens[valid].flatten(), negatives[valid].flatten())}
    assert set(tokenizer.token_ids(SHAPES + COLOURS)) - {tokenizer.sot_id, tokenizer.eot_id} <= (
        swapped_in
    )


def test_words_must_be_single_tokens_in_one_group(tokenizer: Tokenizer) -> None:
    with pytest.raises(ConfigError, match="'parallelogram' is 3 tokens"):
        WordSwap.from_words([["circle", "parallelogram"]], tokenizer)
    with pytest.raises(ConfigError, match="two word-swap groups"):
        WordSwap.from_words([["circle", "square"], ["square", "red"]], tokenizer)
    with pytest.raises(ConfigError, match="at least two words"):
        WordSwap.from_words([["circle"]], tokenizer)


class _TextTower(torch.nn.Module):
    """Stands in for the model: a caption's features are a fixed function of its tokens."""

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        table = torch.randn(50_000, 16, generator=g)
        return F.normalize(table[tokens].sum(dim=1), dim=-1)


def test_swapped_captions_join_the_image_to_text_candidates(tokenizer: Tokenizer) -> None:
    tower = _TextTower()
    tokens = tokenizer(["a red circle", "a blue square", "nothing here", "a green star"])
    text = tower.encode_text(tokens)
    image = F.normalize(text + 0.3 * torch.randn(text.shape, generator=torch.Generator()), dim=-1)
    outputs = {"image_features": image, "text_features": text, "logit_scale": torch.tensor(10.0)}
    swap = WordSwap.from_words([SHAPES, COLOURS], tokenizer)
    torch.manual_seed(0)  # the loss draws its swaps from the global generator: draw them again
    out = ClipLoss(word_swap=swap)(outputs, model=tower, batch={"text": tokens})
    torch.manual_seed(0)
    negatives, valid = swap(tokens)
    assert valid.tolist() == [True, True, False, True]
    swapped = (10.0 * image @ tower.encode_text(negatives).T).masked_fill(~valid, -math.inf)
    i2t = torch.cat([10.0 * image @ text.T, swapped], dim=1)
    labels = torch.arange(4)
    expected = (F.cross_entropy(i2t, labels) + F.cross_entropy(10.0 * text @ image.T, labels)) / 2
    torch.testing.assert_close(out["loss/contrastive"], expected)
    own = (10.0 * image * tower.encode_text(negatives)).sum(-1)
    beats = ((10.0 * (image * text).sum(-1) > own) & valid).sum() / valid.sum()
    torch.testing.assert_close(out["contrastive/acc_swap"], beats.float())


def test_config_builds_the_swap_and_refuses_it_for_siglip() -> None:
    cfg = load_config(None, ["model.name=tiny", 'loss.swap_negatives=[["circle", "square"]]'])
    (objective,) = build_objectives(cfg)
    assert isinstance(objective.word_swap, WordSwap)
    with pytest.raises(ConfigError, match="swap_negatives is an option of the clip loss"):
        load_config(None, ["loss.name=siglip", 'loss.swap_negatives=[["circle", "square"]]'])
