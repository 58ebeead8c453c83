"""The MLM head over an output vocabulary (`objectives.mlm.vocabulary=train`): its logits are
the whole-vocabulary logits' columns, its loss never touches the rest of the 49k token table,
random replacements come from it, and evaluation still works on token ids."""

from __future__ import annotations

import torch
from conftest import MICRO_MODEL, ROOT

from vlpt.models import build_model, get_tokenizer
from vlpt.objectives import MaskedLanguageModeling, mask_tokens
from vlpt.objectives.mlm import IGNORE, replacement_pool

MICRO_MASKED = str(ROOT / "tests/fixtures/micro-masked.json")
VOCAB, SOT, EOT = 49408, 49406, 49407
CAPTIONS = ["a red circle at the top left", "a blue star", "a green cross at the bottom"]


def _vocabulary(words: str = " ".join(CAPTIONS)) -> list[int]:
    tokens = get_tokenizer(MICRO_MODEL)([words])[0]
    return sorted({int(t) for t in tokens if t > 0})  # the words, SOT and EOT


def test_restricted_logits_are_the_whole_vocabulary_logits_at_its_columns():
    torch.manual_seed(0)
    model = build_model(MICRO_MASKED)
    hidden = torch.randn(5, model.fusion.cfg.width)
    whole = model.mlm_logits(hidden)  # (5, 49408)
    assert whole.shape == (5, VOCAB) and torch.equal(model.mlm_logits(hidden, full=False), whole)
    ids = torch.tensor(_vocabulary())
    model.fusion.mlm_head.set_output_vocabulary(ids)
    restricted = model.mlm_logits(hidden, full=False)
    assert restricted.shape == (5, len(ids))
    torch.testing.assert_close(restricted, whole[:, ids])
    full = model.mlm_logits(hidden)  # what evaluation reads: token ids, -inf elsewhere
    torch.testing.assert_close(full[:, ids], whole[:, ids])
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[ids] = False
    assert torch.isneginf(full[:, outside]).all()
    assert set(full.argmax(dim=1).tolist()) <= set(ids.tolist())
    head = model.fusion.mlm_head
    assert head.vocab_index(ids[[2, 0]]).tolist() == [2, 0]
    assert head.vocab_index(torch.tensor([int(ids.max()) + 1])).tolist() == [-1]


def test_random_replacements_come_from_the_pool_of_the_head_words():
    g = torch.Generator().manual_seed(0)
    body = torch.randint(1, 1000, (2000, 20), generator=g)
    tokens = torch.cat([torch.full((2000, 1), SOT), body, torch.full((2000, 1), EOT)], dim=1)
    head_tokens = torch.tensor([7, 11, 13, SOT, EOT])
    pool = replacement_pool(head_tokens, VOCAB)
    assert pool is not None and pool.tolist() == [7, 11, 13]  # never the start or end token
    assert replacement_pool(torch.empty(0, dtype=torch.long), VOCAB) is None
    inputs, labels = mask_tokens(tokens, ratio=0.5, vocab_size=VOCAB, generator=g, random_pool=pool)
    selected = labels != IGNORE
    replaced = selected & (inputs != VOCAB) & (inputs != tokens)
    assert replaced.sum() > 500  # ~10% of ~20,000 selected tokens (less the ~1/3 that match)
    assert set(inputs[replaced].tolist()) == {7, 11, 13}


def test_mlm_loss_over_the_vocabulary_reads_only_its_rows_and_skips_unknown_targets():
    torch.manual_seed(0)
    model = build_model(MICRO_MASKED)
    ids = _vocabulary()
    model.fusion.mlm_head.set_output_vocabulary(ids)
    tokenizer = get_tokenizer(MICRO_MODEL)
    batch = {"image": torch.randn(3, 3, 32, 32), "text": tokenizer(CAPTIONS)}
    out = model(batch["image"], batch["text"], needs=frozenset({"visual_tokens"}))
    terms = MaskedLanguageModeling(mask_ratio=0.5)(out, model=model, batch=batch)
    assert terms["mlm/masked_tokens"] > 0 and torch.isfinite(terms["loss/mlm"])
    terms["loss/mlm"].backward()
    table = model.text.token_embedding.weight.grad
    touched = set(table.abs().sum(dim=1).nonzero().flatten().tolist())
    assert touched <= set(ids) | {VOCAB - 2, VOCAB - 1, 0}  # the head never reads other rows
    assert model.fusion.mlm_head.bias.grad[ids].abs().sum() > 0

    # A caption word the vocabulary lacks is not a target: it is neither trained nor counted.
    model.fusion.mlm_head.set_output_vocabulary(_vocabulary("a red circle"))
    terms = MaskedLanguageModeling(mask_ratio=0.99)(out, model=model, batch=batch)
    in_vocab = torch.isin(batch["text"][:, 1:-1], torch.tensor(_vocabulary("a red circle")))
    assert 0 < terms["mlm/masked_tokens"] <= in_vocab.sum()
