"""Caption decoder and generation: init, KV cache, teacher forcing, greedy / beam / sampling."""

import math

import pytest
import torch

from vlpt.models import get_tokenizer
from vlpt.models.decoder import CaptionDecoder, DecoderConfig, caption_loss
from vlpt.models.generation import (
    GenerationConfig,
    apply_repetition_penalty,
    ban_repeated_ngrams,
    generate,
    generate_captions,
    top_k_filter,
    top_p_filter,
)

TINY = {"width": 64, "layers": 2, "heads": 2, "visual_width": 32, "context_length": 24}
CAPTIONS = [
    "a small red circle at the top left",
    "a big blue square in the middle",
    "two shapes: a red star and a green cross",
    "a tiny yellow triangle on the right",
    "an orange diamond at the bottom",
    "a large white circle in the top right corner",
    "a black square on the left side",
    "a purple star below a green circle",
]


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer("tiny")


@pytest.fixture(scope="module")
def special(tokenizer):
    return {"sot_id": tokenizer.sot_id, "eot_id": tokenizer.eot_id}


@pytest.fixture(scope="module")
def random_decoder():
    torch.manual_seed(0)
    return CaptionDecoder(TINY).eval()


@pytest.fixture(scope="module")
def overfit(tokenizer):
    """A tiny decoder trained to caption 8 fixed 'images' (random visual tokens): 100 steps."""
    torch.manual_seed(0)
    tokens = tokenizer(CAPTIONS)
    visual = torch.randn(len(CAPTIONS), 4, TINY["visual_width"])
    decoder = CaptionDecoder(TINY)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(100):
        loss = caption_loss(decoder(tokens, visual), tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return decoder.eval(), visual, tokens, losses


# ---- the decoder -------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_every_parameter_is_initialised(tie):
    torch.manual_seed(0)
    decoder = CaptionDecoder({**TINY, "tie_embeddings": tie})
    weight = decoder.output_weight
    assert weight.shape == (49408, TINY["width"])
    assert torch.isfinite(weight).all() and weight.abs().max() > 0
    assert abs(weight.std().item() - 0.02) < 0.002  # normal(0.02), not zeros or leftover memory
    assert (weight.data_ptr() == decoder.token_embedding.weight.data_ptr()) == tie
    for name, param in decoder.named_parameters():
        assert torch.isfinite(param).all(), name
        assert param.abs().max() < 1.5, name  # uninitialised memory would show huge values


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="widht"):
        CaptionDecoder({"widht": 64})
    with pytest.raises(ValueError, match="divisible"):
        DecoderConfig(width=64, heads=3)
    assert DecoderConfig.from_dict(DecoderConfig(width=32, heads=2).to_dict()).width == 32


def test_cache_steps_match_teacher_forcing(random_decoder):
    tokens = torch.randint(1, 49000, (3, 12))
    visual = torch.randn(3, 5, TINY["visual_width"])
    with torch.no_grad():
        full = random_decoder(tokens, visual)  # (3, 12, V)
    cache = random_decoder.init_cache(visual, max_length=12)
    chunks = [random_decoder.step(tokens[:, :5], cache)]  # pre-fill 5 positions at once
    chunks += [random_decoder.step(tokens[:, i : i + 1], cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        last = random_decoder(tokens, visual, last_only=True)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-4)


def test_caption_loss_ignores_padding():
    logits = torch.randn(2, 4, 10)
    tokens = torch.tensor([[8, 3, 9, 0], [8, 4, 5, 9]])
    expected = torch.nn.functional.cross_entropy(
        torch.stack([logits[0, 0], logits[0, 1], logits[1, 0], logits[1, 1], logits[1, 2]]),
        torch.tensor([3, 9, 4, 5, 9]),
    )
    torch.testing.assert_close(caption_loss(logits, tokens), expected)


def test_overfitting_then_greedy_reproduces_the_captions(overfit, tokenizer):
    decoder, visual, tokens, losses = overfit
    assert losses[-1] < 0.1 < 5 < losses[0]
    out = generate_captions(decoder, visual, tokenizer, max_new_tokens=20)
    assert torch.equal(out.tokens, tokens)
    assert [t.replace(" :", ":") for t in out.texts] == CAPTIONS


# ---- generation on the real decoder ------------------------------------------------------------


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_and_uncached_generation_agree(random_decoder, overfit, special, num_beams):
    visual = torch.randn(4, 5, TINY["visual_width"])
    options = {"max_new_tokens": 16, "min_new_tokens": 16, "num_beams": num_beams, **special}
    cached = generate(random_decoder, visual, **options)
    assert cached.shape == (4, 17)  # min_new_tokens forbids the end token: full length
    assert torch.equal(cached, generate(random_decoder, visual, use_cache=False, **options))
    decoder, visual, tokens, _ = overfit
    cached = generate(decoder, visual, num_beams=num_beams, **special)
    assert torch.equal(
        cached, generate(decoder, visual, num_beams=num_beams, use_cache=False, **special)
    )


def test_beam_of_one_is_greedy(random_decoder, special):
    visual = torch.randn(4, 5, TINY["visual_width"])
    greedy = generate(random_decoder, visual, max_new_tokens=12, **special)
    beam = generate(random_decoder, visual, max_new_tokens=12, num_beams=1, **special)
    assert torch.equal(greedy, beam)
    # the beam-search code path itself with one beam (num_beams=1 dispatches to greedy)
    from vlpt.models.generation import _beam_search, _SpecialTokens

    ids = _SpecialTokens(special["sot_id"], special["eot_id"], 0)
    beam = _beam_search(random_decoder, visual, 13, GenerationConfig(), ids)
    assert torch.equal(beam, greedy)


def test_top_k_one_sampling_is_greedy(random_decoder, special):
    visual = torch.randn(3, 5, TINY["visual_width"])
    greedy = generate(random_decoder, visual, max_new_tokens=10, **special)
    sampled = generate(
        random_decoder,
        visual,
        max_new_tokens=10,
        do_sample=True,
        top_k=1,
        temperature=0.7,
        generator=torch.Generator().manual_seed(5),
        **special,
    )
    assert torch.equal(greedy, sampled)


def test_nucleus_sampling_is_reproducible(random_decoder, special):
    visual = torch.randn(3, 5, TINY["visual_width"])
    options = {"max_new_tokens": 10, "do_sample": True, "top_p": 0.9, **special}
    first = generate(random_decoder, visual, generator=torch.Generator().manual_seed(1), **options)
    again = generate(random_decoder, visual, generator=torch.Generator().manual_seed(1), **options)
    other = generate(random_decoder, visual, generator=torch.Generator().manual_seed(2), **options)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize(
    "options",
    [{}, {"num_beams": 3}, {"num_beams": 2, "length_penalty": 0.0, "early_stopping": False}],
)
def test_batched_generation_equals_one_by_one(random_decoder, overfit, special, options):
    for decoder, visual in ((random_decoder, torch.randn(3, 5, 32)), overfit[:2]):
        batched = generate(decoder, visual, max_new_tokens=12, **options, **special)
        for i in range(len(visual)):
            alone = generate(decoder, visual[i : i + 1], max_new_tokens=12, **options, **special)
            row = batched[i, : alone.shape[1]]
            assert torch.equal(row, alone[0]) and not batched[i, alone.shape[1] :].any()


def test_bad_options_are_one_sentence(random_decoder, special):
    visual = torch.randn(1, 5, 32)
    with pytest.raises(ValueError, match="top_pp"):
        generate(random_decoder, visual, top_pp=0.9, **special)
    with pytest.raises(ValueError, match="top_p"):
        generate(random_decoder, visual, do_sample=True, top_p=0.0, **special)
    with pytest.raises(ValueError, match="context_length"):
        generate(random_decoder, visual, max_new_tokens=40, **special)


# ---- decoding algorithms on a decoder whose probabilities are known ---------------------------

PAD, A, B, C, SOT, EOT = range(6)
TOY = {"sot_id": SOT, "eot_id": EOT}


class _ToyCache:
    def __init__(self) -> None:
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        pass


class MarkovDecoder:
    """Next-token logits depend on the previous token only: `table[previous]` (V, V)."""

    context_length = 16

    def __init__(self, probabilities: dict[int, dict[int, float]]) -> None:
        self.table = torch.full((6, 6), -30.0)
        for previous, row in probabilities.items():
            for token, p in row.items():
                self.table[previous, token] = math.log(p)

    def __call__(self, tokens, visual_tokens, last_only=False):
        logits = self.table[tokens]  # (B, T, V)
        return logits[:, -1:] if last_only else logits

    def init_cache(self, visual_tokens, max_length=None):
        return _ToyCache()

    def step(self, tokens, cache):
        cache.length += tokens.shape[1]
        return self.table[tokens]

    def log_prob(self, sequence: list[int]) -> float:
        log_probs = self.table.log_softmax(dim=-1)
        return sum(log_probs[a, b].item() for a, b in zip(sequence, sequence[1:]))


def test_beam_search_beats_greedy_on_a_trap():
    # Greedy takes A (0.6) but every continuation of A is unlikely; B (0.4) ends with 0.9.
    decoder = MarkovDecoder(
        {
            SOT: {A: 0.6, B: 0.4},
            A: {A: 0.33, B: 0.33, EOT: 0.34},
            B: {A: 0.05, C: 0.05, EOT: 0.9},
            C: {EOT: 1.0},
        }
    )
    visual = torch.zeros(1, 1, 1)
    greedy = generate(decoder, visual, max_new_tokens=5, **TOY)[0].tolist()
    assert greedy == [SOT, A, EOT]
    for use_cache in (True, False):
        for penalty in (0.0, 1.0):
            beam = generate(
                decoder,
                visual,
                max_new_tokens=5,
                num_beams=2,
                length_penalty=penalty,
                use_cache=use_cache,
                **TOY,
            )[0].tolist()
            assert beam == [SOT, B, EOT]
            assert decoder.log_prob(beam) > decoder.log_prob(greedy)


def test_length_penalty_favours_longer_captions():
    # Ending now: log 0.5; going on: log 0.5 + log 0.9 + ... per length, divided by length ** a.
    decoder = MarkovDecoder(
        {SOT: {A: 1.0}, A: {EOT: 0.5, B: 0.5}, B: {C: 1.0}, C: {EOT: 0.95, A: 0.05}}
    )
    visual = torch.zeros(1, 1, 1)
    options = {"max_new_tokens": 6, "num_beams": 2, "early_stopping": False, **TOY}
    short = generate(decoder, visual, length_penalty=0.0, **options)[0].tolist()
    long = generate(decoder, visual, length_penalty=2.0, **options)[0].tolist()
    assert short == [SOT, A, EOT]
    assert long == [SOT, A, B, C, EOT]


def test_repetition_penalty_follows_ctrl():
    decoder = MarkovDecoder({t: {A: 0.5, B: 0.3, C: 0.15, EOT: 0.05} for t in (SOT, A, B, C)})
    visual = torch.zeros(1, 1, 1)
    plain = generate(decoder, visual, max_new_tokens=5, min_new_tokens=5, **TOY)[0].tolist()
    assert plain == [SOT, A, A, A, A, A]
    # The logits are log-probs (negative), so a seen token's logit is multiplied by the penalty.
    # A at 1.3: log .5 * 1.3 = -0.90, still above B (log .3 = -1.20); at 2.0: -1.39, below B.
    mild = generate(
        decoder, visual, max_new_tokens=5, min_new_tokens=5, repetition_penalty=1.3, **TOY
    )
    strong = generate(
        decoder, visual, max_new_tokens=5, min_new_tokens=5, repetition_penalty=2.0, **TOY
    )
    assert mild[0].tolist() == plain
    assert strong[0].tolist() == [SOT, A, B, A, A, A]  # C (-1.90) never beats a penalised A or B


def _has_repeated_ngram(sequence: list[int], n: int) -> bool:
    ngrams = [tuple(sequence[i : i + n]) for i in range(len(sequence) - n + 1)]
    return len(ngrams) != len(set(ngrams))


def test_no_repeat_ngram_size_forbids_repeated_trigrams(random_decoder, special):
    # A -> B -> C -> A loops forever without the constraint.
    decoder = MarkovDecoder(
        {
            SOT: {A: 0.9, B: 0.1},
            A: {B: 0.6, C: 0.3, A: 0.1},
            B: {C: 0.6, A: 0.3, B: 0.1},
            C: {A: 0.6, B: 0.3, C: 0.1},
        }
    )
    visual = torch.zeros(1, 1, 1)
    loop = generate(decoder, visual, max_new_tokens=12, **TOY)[0].tolist()
    assert _has_repeated_ngram(loop, 3)
    for num_beams in (1, 2):
        out = generate(
            decoder, visual, max_new_tokens=12, no_repeat_ngram_size=3, num_beams=num_beams, **TOY
        )
        assert not _has_repeated_ngram(out[0].tolist(), 3)
    out = generate(
        random_decoder, torch.randn(2, 5, 32), max_new_tokens=20, no_repeat_ngram_size=2, **special
    )
    assert not any(_has_repeated_ngram(row.tolist(), 2) for row in out)


# ---- logit processors against transformers' own -------------------------------------------------


def test_logit_processors_match_transformers():
    from transformers.generation.logits_process import (
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    torch.manual_seed(0)
    scores = torch.randn(4, 50)
    sequences = torch.randint(0, 6, (4, 15))  # a small alphabet, so n-grams repeat
    expected = RepetitionPenaltyLogitsProcessor(1.7)(sequences, scores.clone())
    torch.testing.assert_close(apply_repetition_penalty(scores, sequences, 1.7), expected)
    for n in (1, 2, 3):
        expected = NoRepeatNGramLogitsProcessor(n)(sequences, scores.clone())
        assert torch.equal(ban_repeated_ngrams(scores, sequences, n), expected)
    for k in (1, 5):
        assert torch.equal(top_k_filter(scores, k), TopKLogitsWarper(k)(sequences, scores.clone()))
    for p in (0.3, 0.9):
        assert torch.equal(top_p_filter(scores, p), TopPLogitsWarper(p)(sequences, scores.clone()))
