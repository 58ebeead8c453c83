"""Caption metrics: hand-computed BLEU-4 / CIDEr-D / ROUGE-L, and synthetic attribute accuracy."""

import json
import math
import tarfile
from collections import defaultdict

import pytest

from vlpt.data.synthetic import COLOURS
from vlpt.eval.caption_metrics import (
    attribute_accuracy,
    caption_scores,
    parse_mentions,
    ptb_tokenize,
)


def test_ptb_tokenize_lowercases_splits_clitics_and_drops_punctuation():
    text = "A man's dog, running (fast). Don't stop: a black-and-white \"cat\"..."
    assert ptb_tokenize(text) == "a man 's dog running fast do n't stop a black-and-white cat"
    assert ptb_tokenize("  ?! ") == ""


def test_identical_captions_score_perfectly():
    # Disjoint words across the two items: every n-gram has idf log(2), so CIDEr-D is exactly 10.
    refs = {"a": ["a small red circle at the top"], "b": ["one big blue square in its middle"]}
    preds = {"a": "A small red circle at the top.", "b": "One big blue square in its middle"}
    scores = caption_scores(preds, refs)
    assert scores["n_items"] == 2
    assert scores["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["cider"] == pytest.approx(10.0, abs=1e-6)
    assert scores["rouge_l"] == pytest.approx(1.0)


def test_bleu4_brevity_penalty_by_hand():
    # Every n-gram of the prediction is in the reference: precisions 1, brevity penalty only.
    refs = {0: ["a red circle on the left side of the picture"]}
    scores = caption_scores({0: "a red circle on the left side"}, refs)
    assert scores["bleu4"] == pytest.approx(math.exp(1 - 10 / 7), rel=1e-6)


def test_rouge_l_by_hand():
    # LCS of 'a red circle on the left' and 'a big red circle at the left': a red circle the left.
    refs = {0: ["a big red circle at the left", "something else entirely"]}
    scores = caption_scores({0: "a red circle on the left"}, refs)
    precision, recall, beta = 5 / 6, 5 / 7, 1.2
    expected = (1 + beta**2) * precision * recall / (recall + beta**2 * precision)
    assert scores["rouge_l"] == pytest.approx(expected)


def test_wrong_captions_score_lower():
    refs = {"a": ["a small red circle at the top"], "b": ["one big blue square in its middle"]}
    good = caption_scores({"a": "a small red circle at the top", "b": "a blue square"}, refs)
    bad = caption_scores({"a": "a green star", "b": "a yellow cross"}, refs)
    assert bad["bleu4"] < good["bleu4"] and bad["cider"] < good["cider"]
    assert bad["rouge_l"] < good["rouge_l"]


@pytest.mark.parametrize("references", [{}, {"img7": []}, {"img7": ["", " ... "]}])
def test_missing_or_empty_references_name_the_item(references):
    with pytest.raises(ValueError, match="img7"):
        caption_scores({"img7": "a red circle"}, references)


# ---- attribute accuracy -------------------------------------------------------------------------

SCENE = {
    "objects": [
        {"shape": "circle", "colour": "red", "size": "small", "position": "top left"},
        {"shape": "square", "colour": "blue", "size": "large", "position": "bottom right"},
    ]
}


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a small red circle at the top left and a big blue square in the bottom right corner", 1),
        (
            "in the upper left there is a tiny red circle and at the lower right a big blue square",
            1,
        ),
        ("top left: small red circle; bottom right: large blue square", 1),
        (
            "the circle in the top left is small and red, and the square at the bottom right is big and blue",
            1,
        ),
        ("a large blue square below and to the right of a small red circle", 1),  # no positions
        ("two shapes: a red circle (top left) and a blue square (bottom right)", 1),
        ("a small red circle at the top left", 1 / 2),  # one object missing
        ("a red circle at the bottom and a blue square at the bottom right", 1 / 2),  # wrong place
        ("a big red circle and a small blue square", 0),  # sizes swapped: both objects missed
        ("a tiny red circle and a square that is blue and large", 1),
        ("the circle is large and red, and the square is blue", 1 / 2),  # predicate size wrong
        ("a red circle, a blue square and a green star", 2 / 3),  # one object invented
        ("a blue circle and a red square", 0),  # colours swapped: both pairs invented
        ("a circle and a square", 0),  # no colours: nothing named correctly, nothing invented
        ("", 0),
    ],
)
def test_attribute_accuracy_on_hand_written_captions(caption, expected):
    assert attribute_accuracy(caption, SCENE) == pytest.approx(expected)


def test_relations_are_not_positions():
    mentions = parse_mentions("a red circle in the middle, with a blue square to the left of it")
    assert [(m.colour, m.shape, m.position) for m in mentions] == [
        ("red", "circle", "center"),
        ("blue", "square", None),
    ]


@pytest.fixture(scope="module")
def synthetic_items(tmp_path_factory):
    """(metadata, reference captions) of 120 val and 40 test scenes of the synthetic world."""
    from vlpt.data.synthetic import write_dataset

    out = tmp_path_factory.mktemp("world")
    write_dataset(out, n_train=0, n_val=120, n_test=40, size=16, workers=1, progress=False)
    items = []
    for split in ("val", "test"):
        files: dict[str, dict[str, bytes]] = defaultdict(dict)
        with tarfile.open(out / split / "00000.tar") as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                files[key][ext] = tar.extractfile(member).read()
        for sample in files.values():
            items.append((json.loads(sample["json"]), sample["txt"].decode().split("\n")))
    return items


def test_every_reference_caption_is_fully_correct(synthetic_items):
    # All caption templates and paraphrases of the generator parse back to their own scene.
    for meta, captions in synthetic_items:
        for caption in captions:
            assert attribute_accuracy(caption, meta) == 1.0, (caption, meta["objects"])


def test_attribute_accuracy_on_real_metadata(synthetic_items):
    meta = next(m for m, _ in synthetic_items if len(m["objects"]) == 3)
    first = meta["objects"][0]
    named = [f"a {o['colour']} {o['shape']} in the {o['position']}" for o in meta["objects"]]
    assert attribute_accuracy(", ".join(named), meta) == 1.0
    assert attribute_accuracy(", ".join(named[:2]), meta) == pytest.approx(2 / 3)
    moved = {"top left": "bottom right"}.get(first["position"], "top left")
    wrong_place = [f"a {first['colour']} {first['shape']} in the {moved}", *named[1:]]
    assert attribute_accuracy(", ".join(wrong_place), meta) == pytest.approx(2 / 3)
    # A wrong colour: the object is missed and an invented pair joins the denominator.
    pairs = {(o["colour"], o["shape"]) for o in meta["objects"]}
    other = next(c for c in COLOURS if (c, first["shape"]) not in pairs)
    recoloured = [f"a {other} {first['shape']} in the {first['position']}", *named[1:]]
    assert attribute_accuracy(", ".join(recoloured), meta) == pytest.approx(2 / 4)


def test_metadata_without_objects_is_an_error():
    with pytest.raises(ValueError, match="img3"):
        attribute_accuracy("a red circle", {"key": "img3", "objects": []})
