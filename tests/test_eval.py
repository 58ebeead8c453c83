"""Evaluation: retrieval Recall@K (hand-built cases + a reference), zero-shot, embedding pass."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from torch import nn

import vlpt.eval.embed
import vlpt.eval.retrieval
from vlpt.config import Source
from vlpt.data.synthetic import COLOUR_RGB, COLOURS, SHAPES
from vlpt.eval import (
    EvalEmbeddings,
    embed_eval_set,
    evaluate_retrieval,
    evaluate_zeroshot,
    retrieval_metrics,
    synthetic_task_labels,
    zeroshot_metrics,
)
from vlpt.models import build_model, get_tokenizer

# ---------------------------------------------------------------------------------------------
# Retrieval metrics


def reference_recall(image, text, text_to_image, k):
    """Straightforward clip-benchmark style: full score matrix, top-k, positive-pair masks."""
    scores = text @ image.T  # (M, N)
    positive = F.one_hot(text_to_image, len(image)).bool()  # (M, N)
    t2i_top = scores.topk(k, dim=1).indices  # (M, k)
    t2i = positive.gather(1, t2i_top).any(dim=1).float().mean().item()
    i2t_top = scores.T.topk(k, dim=1).indices  # (N, k)
    i2t = positive.T.gather(1, i2t_top).any(dim=1).float().mean().item()
    return t2i, i2t


def test_perfect_embeddings_give_recall_one() -> None:
    image = torch.eye(12)  # (N, D)
    owners = torch.arange(12).repeat_interleave(3)  # 3 captions per item
    text = F.normalize(image[owners] + 0.1 * torch.rand(36, 12), dim=-1)  # (M, D)
    metrics = retrieval_metrics(image, text, owners)
    assert all(metrics[f"{d}_r{k}"] == 1.0 for d in ("t2i", "i2t") for k in (1, 5, 10))
    assert metrics["n_items"] == 12 and metrics["n_captions"] == 36


def test_crafted_case_where_recall_at_1_differs_from_recall_at_5() -> None:
    # Caption j sits between item j (score 0.6) and item j+1 (score 0.8): its item ranks 2nd.
    n = 10
    image = torch.eye(n)
    text = 0.6 * image + 0.8 * image.roll(1, dims=1)
    owners = torch.arange(n)
    # Item 0 also gets an exact caption: one t2i hit at 1, and image 0 hits at 1.
    text, owners = torch.cat([text, image[:1]]), torch.cat([owners, torch.tensor([0])])
    m = retrieval_metrics(image, text, owners)
    assert m["t2i_r1"] == pytest.approx(1 / 11) and m["t2i_r5"] == 1.0 and m["t2i_r10"] == 1.0
    assert m["i2t_r1"] == pytest.approx(1 / 10) and m["i2t_r5"] == 1.0 and m["i2t_r10"] == 1.0


def test_ties_count_against_the_query() -> None:
    # A collapsed model embeds everything alike: it must not score perfect recall.
    image, text = torch.ones(20, 4) / 2, torch.ones(40, 4) / 2
    m = retrieval_metrics(image, text, torch.arange(20).repeat(2))
    assert m["t2i_r1"] == 0.0 and m["i2t_r10"] == 0.0


def test_item_without_captions_is_an_image_to_text_miss() -> None:
    image = torch.eye(4)
    m = retrieval_metrics(image, image[:3], torch.arange(3))
    assert m["i2t_r1"] == pytest.approx(3 / 4) and m["t2i_r1"] == 1.0


@pytest.mark.parametrize("chunk_elements", [1 << 24, 7])
def test_random_embeddings_match_reference(monkeypatch, chunk_elements: int) -> None:
    monkeypatch.setattr(vlpt.eval.retrieval, "_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(50, 8, generator=g), dim=-1)
    owners = torch.randint(0, 50, (120,), generator=g)  # some items have 0 or several captions
    text = F.normalize(image[owners] + 1.5 * torch.randn(120, 8, generator=g), dim=-1)
    m = retrieval_metrics(image, text, owners)
    for k in (1, 5, 10):
        t2i, i2t = reference_recall(image, text, owners, k)
        assert m[f"t2i_r{k}"] == pytest.approx(t2i) and m[f"i2t_r{k}"] == pytest.approx(i2t)


# ---------------------------------------------------------------------------------------------
# Zero-shot


class ColourWorldModel(nn.Module):
    """A stand-in model that 'understands' colours exactly: one axis per colour in COLOURS.

    Images: the mean pixel's nearest colour; texts: the colour named in the text (token 0).
    """

    image_size, image_mean, image_std = 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        rgb = images.float().mean(dim=(2, 3)) * 0.5 + 0.5  # (B, 3) in [0, 1]
        palette = torch.tensor([COLOUR_RGB[c] for c in COLOURS], dtype=torch.float32) / 255
        nearest = torch.cdist(rgb, palette).argmin(dim=1)
        return F.one_hot(nearest, len(COLOURS)).float()

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return F.one_hot(tokens[:, 0], len(COLOURS)).float()


def colour_tokenizer(texts: list[str]) -> torch.Tensor:
    """(B, 1): index in COLOURS of the colour the text names (0 when it names none)."""
    ids = [next((i for i, c in enumerate(COLOURS) if c in t.split()), 0) for t in texts]
    return torch.tensor(ids)[:, None]


def test_zeroshot_metrics_with_an_exact_model() -> None:
    labels = torch.tensor([0, 3, 5, 5, 7])
    image_emb = F.one_hot(labels, len(COLOURS)).float()
    templates = ["something {}.", "a {} shape."]
    args = (list(COLOURS), templates, ColourWorldModel(), colour_tokenizer)
    assert zeroshot_metrics(image_emb, labels, *args) == {"top1": 1.0, "n": 5}
    assert zeroshot_metrics(image_emb, labels.roll(1), *args)["top1"] == pytest.approx(1 / 5)


def test_synthetic_task_labels_use_single_object_items() -> None:
    obj = {"shape": "star", "colour": "blue", "size": "small", "position": "top"}
    metas = [
        {"objects": [obj]},
        {"objects": [obj, obj]},
        {},
        {"objects": [dict(obj, shape="blob")]},
    ]
    rows, labels, classnames = synthetic_task_labels(metas, "shape")
    assert rows == [0, 3] and classnames == [*SHAPES, "blob"]
    assert [classnames[c] for c in labels] == ["star", "blob"]
    with pytest.raises(ValueError, match="zero-shot task 'size' is unknown"):
        synthetic_task_labels(metas, "size")


def test_evaluate_zeroshot_from_precomputed_embeddings() -> None:
    metas = [{"objects": [{"shape": "circle", "colour": c}]} for c in COLOURS] + [{"objects": []}]
    labels = torch.tensor([*range(len(COLOURS)), 0])
    emb = EvalEmbeddings(F.one_hot(labels).float(), torch.empty(0, 8), torch.empty(0), meta=metas)
    metrics = evaluate_zeroshot(
        ColourWorldModel(), colour_tokenizer, [], task="colour", embeddings=emb
    )
    assert metrics == {"zeroshot_colour_top1": 1.0, "zeroshot_colour_n": len(COLOURS)}


# ---------------------------------------------------------------------------------------------
# Embedding pass (fake batches with a real tiny model) and end to end on shards

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def test_embed_eval_set_keeps_caption_owners_and_restores_mode(monkeypatch, tmp_path) -> None:
    (tmp_path / "m.json").write_text(json.dumps(TINY))
    torch.manual_seed(0)
    model = build_model(str(tmp_path / "m.json"))
    captions = [["a red circle", "red"], ["a blue star"], ["x", "y", "z"]]
    images = torch.randn(3, 3, 32, 32)

    def fake_batches(sources, *, image_size, mean, std, batch_size, max_items=0, num_frames=8):
        for i in range(0, 3, batch_size):  # two batches: items [0, 1] and [2]
            rows = slice(i, i + batch_size)
            n = len(captions[rows])
            yield {
                "image": images[rows],
                "captions": captions[rows],
                "key": ["k"] * n,
                "meta": [{}] * n,
                "skips": {"bad_utf8": 1},
            }

    monkeypatch.setattr(vlpt.eval.embed, "iter_eval_batches", fake_batches)
    tokenizer = get_tokenizer("tiny")
    emb = embed_eval_set(model, tokenizer, [], batch_size=2)
    assert emb.text_to_image.tolist() == [0, 0, 1, 2, 2, 2] and emb.skips == {"bad_utf8": 2}
    assert model.training  # eval() was only for the pass
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(emb.image, model.encode_image(images), rtol=1e-4, atol=1e-5)
        flat = [c for item in captions for c in item]
        torch.testing.assert_close(
            emb.text, model.encode_text(tokenizer(flat)), rtol=1e-4, atol=1e-5
        )
    low = embed_eval_set(model, tokenizer, [], batch_size=2, precision="bf16")
    assert low.image.dtype == torch.float32
    torch.testing.assert_close(low.image, emb.image, rtol=0, atol=0.05)


def _png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), rgb).save(buf, format="PNG")
    return buf.getvalue()


def _write_colour_shards(folder: Path) -> None:
    """Two shards; one solid-colour item per colour with two captions, one bad sample."""
    folder.mkdir()
    for shard, colours in enumerate([COLOURS[:5], COLOURS[5:]]):
        with wds.TarWriter(str(folder / f"{shard:05d}.tar")) as tar:
            for colour in colours:
                meta = {"objects": [{"shape": "circle", "colour": colour}]}
                tar.write(
                    {
                        "__key__": f"{shard}-{colour}",
                        "png": _png(COLOUR_RGB[colour]),
                        "txt": f"a {colour} circle\nsomething {colour}",
                        "json": json.dumps(meta),
                    }
                )
                if colour == "green":
                    tar.write({"__key__": "no-caption", "png": _png((0, 0, 0))})


def test_evaluate_on_shards_end_to_end(tmp_path: Path) -> None:
    _write_colour_shards(tmp_path / "val")
    sources, model = [Source(url=str(tmp_path / "val"))], ColourWorldModel()
    metrics = evaluate_retrieval(model, colour_tokenizer, sources, batch_size=3)
    assert metrics["n_items"] == len(COLOURS) and metrics["n_captions"] == 2 * len(COLOURS)
    assert metrics["t2i_r1"] == 1.0 and metrics["i2t_r1"] == 1.0  # owners line up with images
    emb = embed_eval_set(model, colour_tokenizer, sources, batch_size=3, max_items=4)
    assert len(emb.keys) == 4 and emb.skips == {"missing_caption": 1}
    zeroshot = evaluate_zeroshot(model, colour_tokenizer, sources, batch_size=3)
    assert zeroshot["zeroshot_colour_top1"] == 1.0
    assert zeroshot["zeroshot_colour_n"] == zeroshot["zeroshot_shape_n"] == len(COLOURS)
