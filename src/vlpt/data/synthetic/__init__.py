"""A procedurally generated world of coloured shapes with paraphrased captions.

`vlpt data synth` calls `write_dataset`, which writes train/val/test WebDataset shards. The test
split holds colour-shape pairs never seen in training. Modules, one idea each:

- `world`: vocabularies, scene sampling, held-out pairs (pure data)
- `render`: draw a scene of continuous sprites into a PIL image (shared with video)
- `captions`: paraphrased captions of a scene
- `writer`: shards, metadata and the worker pool

and for video clips (`write_video_dataset`, `vlpt data synth --video`):

- `events`: actions, events, clips, their time reversal and animation (pure data)
- `video_captions`: paraphrased captions of a clip's events, in order
- `video_writer`: H.264 MP4 encoding, per-clip metadata, video shards
"""

from vlpt.data.synthetic.captions import make_captions
from vlpt.data.synthetic.events import (
    ACTIONS,
    REVERSE_ACTION,
    ClipSpec,
    ClipState,
    Event,
    animate,
    reverse_action,
    sample_clip,
)
from vlpt.data.synthetic.render import render_clip, render_scene
from vlpt.data.synthetic.video_captions import make_clip_captions
from vlpt.data.synthetic.video_writer import write_video_dataset
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
    "ACTIONS",
    "BACKGROUNDS",
    "COLOURS",
    "COLOUR_RGB",
    "POSITIONS",
    "RELATIONS",
    "REVERSE_ACTION",
    "SHAPES",
    "SIZES",
    "Background",
    "ClipSpec",
    "ClipState",
    "Event",
    "ObjectSpec",
    "Scene",
    "SceneSpec",
    "Sprite",
    "animate",
    "held_out_pairs",
    "make_captions",
    "make_clip_captions",
    "render_clip",
    "render_scene",
    "reverse_action",
    "sample_clip",
    "sample_scene",
    "write_dataset",
    "write_video_dataset",
]
