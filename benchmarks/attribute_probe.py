"""Linear probes: which object attributes the image tower's patch tokens carry.

For every object of the synthetic world's images (their `.json` names each object's shape,
colour and 3x3 grid cell), the patch tokens of the model's image tower that cover the object's
cell are pooled (mean and max, concatenated) and a linear classifier (multinomial logistic
regression, L-BFGS, small L2) is trained on objects of training images to name the shape and the
colour, then scored on objects of val images. A tower whose contrastive training let it ignore
shape (colour and position already single out most scenes in a batch) probes high on colour and
low on shape; that is what bounds a fusion encoder's MLM accuracy on shape words.

    .venv/bin/python benchmarks/attribute_probe.py runs/synthetic-tiny runs/synthetic-tiny-masked \
        [--data data/synthetic] [--train-images 3000] [--val-images 1000] [--layers stem,2,out] \
        [--mlp] [--supervised-steps 300]

`--layers` probes other depths of the tower too (keys become CHECKPOINT@LAYER): where along the
tower shape is lost, or never found. `--mlp` adds a non-linear probe (a per-token MLP before the
pooling, trained with AdamW: keys `shape_mlp`, `colour_mlp`): what attention and MLPs could read
that a linear map of pooled tokens cannot. `--supervised-steps N` adds the ceiling: the first
checkpoint's architecture trained from scratch for N steps on the shape labels themselves
(`supervised_shape_by_step`): how fast the tower learns shape when it is told.

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


def normalised(model, images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> the model's normalised (n, 3, H, W) float input."""
    mean = torch.tensor(model.image_mean)[:, None, None]
    std = torch.tensor(model.image_std)[:, None, None]
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std


def grid_tokens(model, x: torch.Tensor, layer: str = "out") -> torch.Tensor:
    """(n, grid, grid, W) patch tokens (CLS dropped) of normalised images at `layer`."""
    grid = int(round((model.visual.positional_embedding.shape[0] - 1) ** 0.5))
    return tower_tokens(model, x, layer)[:, 1:].reshape(len(x), grid, grid, -1)


def pool_cells(tokens: torch.Tensor, objects: list[list[dict]]) -> tuple[torch.Tensor, dict]:
    """(objects, 2W) mean and max of the (n, grid, grid, W) tokens over each object's grid
    cell, and its labels ({attribute: (objects,) class indices})."""
    grid = tokens.shape[1]
    features, labels = [], {k: [] for k in ATTRIBUTES}
    for b, scene in enumerate(objects):
        for obj in scene:
            cell = tokens[b, _cell_span(obj["row"], grid), _cell_span(obj["col"], grid)]
            cell = cell.flatten(0, 1)  # (patches, W)
            features.append(torch.cat([cell.mean(0), cell.max(0).values]))
            for key in ATTRIBUTES:
                labels[key].append(ATTRIBUTES[key].index(obj[key]))
    return torch.stack(features), {k: torch.tensor(v) for k, v in labels.items()}


@torch.no_grad()
def all_grid_tokens(model, images: np.ndarray, layer: str) -> torch.Tensor:
    """`grid_tokens` of every image, 250 at a time."""
    return torch.cat(
        [
            grid_tokens(model, normalised(model, images[i : i + 250]), layer).float()
            for i in range(0, len(images), 250)
        ]
    )


def _cell_span(index: int, grid: int) -> slice:
    """Patch rows (or columns) that overlap grid cell `index` of 3."""
    return slice(int(index * grid / 3), int(np.ceil((index + 1) * grid / 3)))


def linear_probe(
    train_x: torch.Tensor, ya: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, classes: int
) -> float:
    """Val accuracy of a multinomial logistic regression on standardised features."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (val_x - mu) / sd
    linear = torch.nn.Linear(a.shape[1], classes)
    optimiser = torch.optim.LBFGS(linear.parameters(), max_iter=300)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(linear(a), ya) + 1e-3 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        return (linear(b).argmax(1) == val_y).float().mean().item()


def mlp_probe(
    train: tuple[torch.Tensor, list], val: tuple[torch.Tensor, list], steps: int = 300
) -> dict[str, float]:
    """Val accuracy per attribute of a small non-linear probe on frozen (n, g, g, W) tokens:
    a per-token MLP (W -> 256 -> 256), pooled over the object's cell (mean and max), then a
    linear layer per attribute; AdamW, batches of 128 images. It finds what a fusion encoder's
    attention and MLPs could read that a linear map of pooled tokens cannot."""
    generator = torch.Generator().manual_seed(0)
    head = ReadoutHead(train[0].shape[-1], hidden=256)
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
    for _ in range(steps):
        pick = torch.randperm(len(train[0]), generator=generator)[:128].tolist()
        logits, labels = head(train[0][pick], [train[1][i] for i in pick])
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in ATTRIBUTES)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        logits, labels = head(val[0], val[1])
    return {k: (logits[k].argmax(1) == labels[k]).float().mean().item() for k in ATTRIBUTES}


class ReadoutHead(torch.nn.Module):
    """(n, g, g, W) tokens and the images' objects -> ({attribute: logits}, {attribute: labels})
    through an optional per-token MLP, cell pooling and one linear layer per attribute."""

    def __init__(self, width: int, hidden: int = 0) -> None:
        super().__init__()
        self.mlp = (
            torch.nn.Sequential(
                torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden)
            )
            if hidden
            else torch.nn.Identity()
        )
        out = hidden or width
        self.linear = torch.nn.ModuleDict(
            {k: torch.nn.Linear(2 * out, len(v)) for k, v in ATTRIBUTES.items()}
        )

    def forward(self, tokens: torch.Tensor, objects: list[list[dict]]) -> tuple[dict, dict]:
        features, labels = pool_cells(self.mlp(tokens), objects)
        return {k: layer(features) for k, layer in self.linear.items()}, labels


def supervised_reference(
    checkpoint: str, train: tuple[np.ndarray, list], val: tuple[np.ndarray, list], steps: int
) -> dict[str, float]:
    """The ceiling: the checkpoint's architecture from random init, its image tower trained end
    to end with a linear cell readout on the attribute labels themselves (AdamW 1e-3, batches of
    128 images, bf16 autocast). Val shape accuracy every 50 steps: how fast the tower learns
    shape when told it directly, against what the run's objectives taught it."""
    from vlpt.train.build import model_from_config

    _, cfg = load_trained_model(checkpoint)
    torch.manual_seed(0)
    model = model_from_config(cfg.model, pretrained=False).train()
    model.set_patch_dropout(0.0)  # the readout reads every cell's patch (a FLIP run's config)
    head = ReadoutHead(model.visual.transformer.width)
    params = [*model.visual.parameters(), *head.parameters()]
    optimiser = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    rng, curve = np.random.default_rng(0), {}
    for step in range(1, steps + 1):
        pick = rng.choice(len(train[0]), 128, replace=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = grid_tokens(model, normalised(model, train[0][pick]))
        logits, labels = head(tokens.float(), [train[1][i] for i in pick])
        loss = F.cross_entropy(logits["shape"], labels["shape"])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 50 == 0 or step == steps:
            with torch.no_grad():
                model.eval()
                logits, labels = head(all_grid_tokens(model, val[0], "out"), val[1])
                model.train()
            curve[str(step)] = round(
                (logits["shape"].argmax(1) == labels["shape"]).float().mean().item(), 4
            )
    return curve


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
    parser.add_argument(
        "--mlp", action="store_true", help="also a non-linear probe (per-token MLP) per layer"
    )
    parser.add_argument(
        "--supervised-steps",
        type=int,
        default=0,
        help="also train the first checkpoint's architecture from scratch on the shape labels "
        "for this many steps (the ceiling; ~0.9 s a step on 2 cores)",
    )
    args = parser.parse_args()
    layers = args.layers.split(",")
    torch.manual_seed(0)
    train = load_split(Path(args.data) / "train", args.train_images)
    val = load_split(Path(args.data) / "val", args.val_images)
    results = {}
    for checkpoint in args.checkpoints:
        model, _ = load_trained_model(checkpoint)
        for layer in layers:
            key = checkpoint if layers == ["out"] else f"{checkpoint}@{layer}"
            results[key] = probe_layer(model, layer, train, val, args.mlp)
    report = {
        "bench": "attribute_probe",
        "runs": results,
        "chance": {k: round(1 / len(v), 4) for k, v in ATTRIBUTES.items()},
    }
    if args.supervised_steps:
        curve = supervised_reference(args.checkpoints[0], train, val, args.supervised_steps)
        report["supervised_shape_by_step"] = curve
    settings = vars(args) | {"machine": platform.processor() or platform.machine()}
    print(json.dumps(report | {"settings": settings}))


def probe_layer(model, layer: str, train: tuple, val: tuple, mlp: bool) -> dict:
    """Linear (and with `mlp`, non-linear) probe accuracies of one layer's tokens."""
    train_tokens = all_grid_tokens(model, train[0], layer)
    val_tokens = all_grid_tokens(model, val[0], layer)
    train_x, train_y = pool_cells(train_tokens, train[1])
    val_x, val_y = pool_cells(val_tokens, val[1])
    row = {
        name: round(linear_probe(train_x, train_y[name], val_x, val_y[name], len(v)), 4)
        for name, v in ATTRIBUTES.items()
    } | {"n_train": len(train_x), "n_val": len(val_x)}
    if mlp:
        accuracy = mlp_probe((train_tokens, train[1]), (val_tokens, val[1]))
        row |= {f"{k}_mlp": round(v, 4) for k, v in accuracy.items()}
    return row


if __name__ == "__main__":
    main()
