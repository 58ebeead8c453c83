"""The caption decoder's output vocabulary: logits over a subset of the tokens, the loss and
generation over it, its life in checkpoints, and the vocabulary of a data set's captions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from vlpt.config import Source, load_config
from vlpt.data.samples import SkipCounter, caption_lines
from vlpt.data.shards import DataSourceError, expand_urls, read_shard
from vlpt.data.vocabulary import caption_vocabulary
from vlpt.models import build_model, get_tokenizer
from vlpt.models.decoder import CaptionDecoder
from vlpt.models.generation import generate
from vlpt.objectives import ModelWithObjectives, build_objectives

TINY = {"width": 32, "layers": 2, "heads": 2, "visual_width": 16, "context_length": 16}
MICRO_CAPTION = str(ROOT / "tests/fixtures/micro-caption.json")
SOT, EOT = 49406, 49407
VOCAB = [320, 1000, 2000, 500, SOT, EOT]


@pytest.fixture
def restricted() -> CaptionDecoder:
    torch.manual_seed(0)
    decoder = CaptionDecoder(TINY).eval()
    decoder.set_output_vocabulary(VOCAB)
    return decoder


def test_logits_over_the_vocabulary_are_the_full_logits_at_those_tokens(restricted):
    hidden = torch.randn(3, 5, TINY["width"])
    whole = CaptionDecoder(TINY)
    whole.load_state_dict(
        {k: v for k, v in restricted.state_dict().items() if k != "output_tokens"}
    )
    assert not whole.restricted and restricted.restricted
    ids = sorted(VOCAB)
    assert restricted.output_tokens.tolist() == ids
    sub, full = restricted.vocab_logits(hidden), whole.logits(hidden)
    torch.testing.assert_close(sub, full[..., ids])
    masked = restricted.logits(hidden)  # whole-vocabulary shape, -inf outside
    assert masked.shape == full.shape
    torch.testing.assert_close(masked[..., ids], sub)
    outside = torch.ones(masked.shape[-1], dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(masked[..., outside]).all()


def test_token_ids_map_to_columns_and_unknown_tokens_to_minus_one(restricted):
    tokens = torch.tensor([[SOT, 320, 1000, 777, EOT], [500, 0, 49405, 2000, 320]])
    ids = sorted(VOCAB)
    expected = [[ids.index(t) if t in ids else -1 for t in row] for row in tokens.tolist()]
    assert restricted.vocab_index(tokens).tolist() == expected
    restricted.set_output_vocabulary(None)  # the whole vocabulary again: ids are columns
    assert torch.equal(restricted.vocab_index(tokens), tokens)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_stays_in_the_vocabulary_with_and_without_cache(restricted, num_beams):
    visual = torch.randn(4, 5, TINY["visual_width"])
    options = {"sot_id": SOT, "eot_id": EOT, "max_new_tokens": 10, "num_beams": num_beams}
    cached = generate(restricted, visual, **options)
    uncached = generate(restricted, visual, use_cache=False, **options)
    assert torch.equal(cached, uncached)
    generated = set(cached[:, 1:].flatten().tolist()) - {0}
    assert generated and generated <= set(VOCAB) - {SOT}


def test_the_vocabulary_travels_in_the_state_dict(restricted):
    fresh = CaptionDecoder(TINY)  # built with the whole vocabulary
    fresh.load_state_dict(restricted.state_dict())  # strict: the buffer takes the saved size
    assert torch.equal(fresh.output_tokens, restricted.output_tokens)
    older = {k: v for k, v in restricted.state_dict().items() if k != "output_tokens"}
    fresh.load_state_dict(older)  # a checkpoint from before output vocabularies: all tokens
    assert not fresh.restricted and fresh.output_weight.shape[0] == fresh.cfg.vocab_size


def test_bad_vocabularies_are_one_sentence(restricted):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 49408\)"):
        restricted.set_output_vocabulary([5, 49408])
    with pytest.raises(ValueError, match="at least one token"):
        restricted.set_output_vocabulary([])


def test_caption_objective_trains_over_the_vocabulary_and_skips_unknown_targets():
    torch.manual_seed(0)
    model = build_model(MICRO_CAPTION)
    cfg = load_config(None, ["objectives.caption.enabled=true", "loss.weight=0"])
    trainer = ModelWithObjectives(model, build_objectives(cfg, model))
    tokenizer = get_tokenizer(MICRO_CAPTION)
    tokens = tokenizer(["a red circle", "a blue square"])
    known = tokenizer.token_ids(["a red circle"])  # "blue square" is outside
    decoder = model.caption_decoder()
    decoder.set_output_vocabulary(sorted(known))
    batch = {"image": torch.randn(2, 3, 32, 32), "text": tokens}
    terms = trainer(batch)

    visual = model(batch["image"], None, needs=frozenset({"visual_tokens"}))["visual_tokens"]
    hidden = decoder.hidden_states(tokens, visual)[:, :-1]
    targets = tokens[:, 1:]
    keep = (targets != 0) & torch.isin(targets, torch.tensor(sorted(known)))
    expected = F.cross_entropy(
        decoder.vocab_logits(hidden[keep]), decoder.vocab_index(targets[keep])
    )
    torch.testing.assert_close(terms["loss/caption"], expected, atol=1e-5, rtol=1e-5)
    assert decoder.vocab_index(targets[(targets != 0) & ~keep]).eq(-1).all()


def _all_captions(url: str, limit: int | None = None) -> list[str]:
    captions: list[str] = []
    samples = 0
    for shard in expand_urls(url):
        for raw in read_shard(shard, SkipCounter()):
            if limit is not None and samples == limit:
                return captions
            samples += 1
            captions += caption_lines(raw["txt"])
    return captions


def test_the_vocabulary_of_a_data_set_is_every_token_of_its_captions(synth_world, tmp_path):
    tokenizer = get_tokenizer(MICRO_CAPTION)
    train = str(synth_world / "train")
    vocab = caption_vocabulary([Source(url=train)], tokenizer, max_samples=10_000)
    tokens = tokenizer(_all_captions(train))  # whole captions, tokenized as training does
    assert vocab.token_ids == sorted(set(tokens.flatten().tolist()) - {0})
    assert vocab.n_samples == 600 and SOT in vocab.token_ids and EOT in vocab.token_ids

    few = caption_vocabulary([Source(url=train)], tokenizer, max_samples=3)
    assert few.n_samples == 3
    assert few.token_ids == sorted(set(tokenizer(_all_captions(train, 3)).flatten().tolist()) - {0})
    assert set(few.token_ids) < set(vocab.token_ids)

    (tmp_path / "bad.tar").write_bytes(b"not a tar")  # counted as unreadable, as in training
    nothing = caption_vocabulary([Source(url=str(tmp_path / "bad.tar"))], tokenizer, 10)
    assert nothing.n_samples == 0 and nothing.token_ids == [SOT, EOT]
    with pytest.raises(DataSourceError, match="no file matches"):
        caption_vocabulary([Source(url=str(tmp_path / "missing"))], tokenizer, 10)
