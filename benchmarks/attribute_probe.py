"""Linear probes: which object attributes the image tower's patch tokens carry.

For every object of the synthetic world's images (their `.json` names each object's shape,
colour and 3x3 grid cell), the patch tokens of the model's image tower that cover the object's
cell are pooled (mean and max, concatenated) and a linear classifier (multinomial logistic
regression, L-BFGS, small L2) is trained on objects of training images to name the shape and the
colour, then scored on objects of val images. A tower whose contrastive training let it ignore
shape (colour and position already single out most scenes in a batch) probes high on colour and
low on shape; that is what bounds a fusion encoder's MLM accuracy on shape words.

    .venv/bin/python benchmarks/attribute_probe.py runs/synthetic-tiny runs/synthetic-tiny-masked \
        [--data data/synthetic] [--train-images 3000] [--val-images 1000] [--layers stem,2,out]

`--layers` probes other depths of the tower too (keys become CHECKPOINT@LAYER): where along the
tower shape is lost, or never found.

Prints one JSON line: {"bench": "attribute_probe", "runs": {CHECKPOINT: {"shape": acc,
"colour": acc, "n_train": objects, "n_val": objects}}, "chance": {...}, "settings": {...}}.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlpt.data.samples import SkipCounter
from vlpt.data.shards import expand_urls, read_shard
from vlpt.data.synthetic.world import COLOURS, SHAPES
from vlpt.train.checkpoint import load_trained_model

ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS}


def load_split(folder: Path, n: int) -> tuple[np.ndarray, list[list[dict]]]:
    """The first `n` images of a split (uint8 (n, H, W, 3)) and each one's objects."""
    from io import BytesIO

    from PIL import Image

    images, objects = [], []
    skips = SkipCounter()
    for url in expand_urls(str(folder)):
        for raw in read_shard(url, skips):
            if "jpg" not in raw or "json" not in raw:
                continue
            images.append(np.asarray(Image.open(BytesIO(raw["jpg"])).convert("RGB")))
            objects.append(json.loads(raw["json"])["objects"])
            if len(images) == n:
                return np.stack(images), objects
    return np.stack(images), objects


def tower_tokens(model, x: torch.Tensor, layer: str) -> torch.Tensor:
    """(B, 1 + N, W) tokens of the image tower at `layer`: "out" (after `ln_post`, what the
    fusion encoder reads), "stem" (the stem's tokens plus positions, after `ln_pre`) or block
    "K" (the output of Transformer block K, 1-based, before `ln_post`)."""
    if layer == "out":
        return model.encode_image_with_tokens(x)[1]
    tower = model.visual
    module = tower.ln_pre if layer == "stem" else tower.transformer.resblocks[int(layer) - 1]
    caught: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: caught.append(out))
    try:
        model.encode_image_with_tokens(x)
    finally:
        handle.remove()
    tokens = caught[0]
    return tokens if tokens.shape[0] == len(x) else tokens.transpose(0, 1)  # (B, 1 + N, W)


@torch.no_grad()
def cell_features(
    model, images: np.ndarray, objects: list[list[dict]], layer: str = "out"
) -> tuple[np.ndarray, dict]:
    """(objects, 2W) pooled patch tokens over each object's grid cell, and its labels."""
    mean = torch.tensor(model.image_mean)[:, None, None]
    std = torch.tensor(model.image_std)[:, None, None]
    grid = int(round((model.visual.positional_embedding.shape[0] - 1) ** 0.5))
    features, labels = [], {k: [] for k in ATTRIBUTES}
    for start in range(0, len(images), 250):
        x = torch.from_numpy(images[start : start + 250]).permute(0, 3, 1, 2).float() / 255
        tokens = tower_tokens(model, (x - mean) / std, layer).float()
        tokens = tokens[:, 1:].reshape(len(x), grid, grid, -1)  # patch tokens, CLS dropped
        for b, scene in enumerate(objects[start : start + 250]):
            for obj in scene:
                rows = _cell_span(obj["row"], grid)
                cols = _cell_span(obj["col"], grid)
                cell = tokens[b, rows, cols].flatten(0, 1)  # (patches, W)
                features.append(torch.cat([cell.mean(0), cell.max(0).values]).numpy())
                for key in ATTRIBUTES:
                    labels[key].append(ATTRIBUTES[key].index(obj[key]))
    return np.stack(features), {k: np.array(v) for k, v in labels.items()}


def _cell_span(index: int, grid: int) -> slice:
    """Patch rows (or columns) that overlap grid cell `index` of 3."""
    return slice(int(index * grid / 3), int(np.ceil((index + 1) * grid / 3)))


def linear_probe(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, classes: int
) -> float:
    """Val accuracy of a multinomial logistic regression on standardised features."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a = torch.tensor((train_x - mu) / sd, dtype=torch.float32)
    b = torch.tensor((val_x - mu) / sd, dtype=torch.float32)
    ya = torch.tensor(train_y)
    linear = torch.nn.Linear(a.shape[1], classes)
    optimiser = torch.optim.LBFGS(linear.parameters(), max_iter=300)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(linear(a), ya) + 1e-3 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        return (linear(b).argmax(1).numpy() == val_y).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="run or checkpoint folders")
    parser.add_argument("--data", default="data/synthetic", help="synthetic data set folder")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--val-images", type=int, default=1000)
    parser.add_argument(
        "--layers",
        default="out",
        help="comma-separated tower layers to probe: out (default; the tokens the fusion encoder "
        "reads), stem (after the stem and ln_pre), K (output of block K, 1-based)",
    )
    args = parser.parse_args()
    layers = args.layers.split(",")
    torch.manual_seed(0)
    train_images, train_objects = load_split(Path(args.data) / "train", args.train_images)
    val_images, val_objects = load_split(Path(args.data) / "val", args.val_images)
    results = {}
    for checkpoint in args.checkpoints:
        model, _ = load_trained_model(checkpoint)
        for layer in layers:
            train_x, train_y = cell_features(model, train_images, train_objects, layer)
            val_x, val_y = cell_features(model, val_images, val_objects, layer)
            key = checkpoint if layers == ["out"] else f"{checkpoint}@{layer}"
            results[key] = {
                name: round(linear_probe(train_x, train_y[name], val_x, val_y[name], len(v)), 4)
                for name, v in ATTRIBUTES.items()
            } | {"n_train": len(train_x), "n_val": len(val_x)}
    print(
        json.dumps(
            {
                "bench": "attribute_probe",
                "runs": results,
                "chance": {k: round(1 / len(v), 4) for k, v in ATTRIBUTES.items()},
                "settings": vars(args) | {"machine": platform.processor() or platform.machine()},
            }
        )
    )


if __name__ == "__main__":
    main()
