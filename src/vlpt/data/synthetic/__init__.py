"""A procedurally generated world of coloured shapes with paraphrased captions.

`vlpt data synth` calls `write_dataset`, which writes train/val/test WebDataset shards. The test
split holds colour-shape pairs never seen in training. Modules, one idea each:

- `world`: vocabularies, scene sampling, held-out pairs (pure data)
- `render`: draw a scene of continuous sprites into a PIL image (shared with video)
- `captions`: paraphrased captions of a scene
- `writer`: shards, metadata and the worker pool
"""

from vlpt.data.synthetic.captions import make_captions
from vlpt.data.synthetic.render import render_scene
from vlpt.data.synthetic.world import (
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Background,
    ObjectSpec,
    Scene,
    SceneSpec,
    Sprite,
    held_out_pairs,
    sample_scene,
)
from vlpt.data.synthetic.writer import write_dataset

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "COLOUR_RGB",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "Background",
    "ObjectSpec",
    "Scene",
    "SceneSpec",
    "Sprite",
    "held_out_pairs",
    "make_captions",
    "render_scene",
    "sample_scene",
    "write_dataset",
]
