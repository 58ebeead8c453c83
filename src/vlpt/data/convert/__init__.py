"""Evaluation sets into the project's shard format: COCO and Flickr30k (Karpathy splits) as
image shards, MSR-VTT as video shards, with every caption of an item in its txt file.

`vlpt data convert karpathy|msrvtt` calls these; see `datasets/coco/`, `datasets/flickr30k/`
and `datasets/msrvtt/` for where the original files come from.
"""

from vlpt.data.convert.karpathy import convert_karpathy
from vlpt.data.convert.msrvtt import convert_msrvtt
from vlpt.data.convert.output import ConversionError, SkipTally

__all__ = ["ConversionError", "SkipTally", "convert_karpathy", "convert_msrvtt"]
