"""Streaming image-text and video-text data from WebDataset shards: sources, decoding, batches,
skip counts."""

from vlpt.data.loader import CaptionTokens, TrainLoader, build_train_loader, iter_eval_batches
from vlpt.data.media import MediaFileReader, UnreadableMedia
from vlpt.data.samples import (
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    Sample,
    SkipCounter,
    SkipReason,
    VideoSample,
    parse_sample,
)
from vlpt.data.shards import DataSourceError, check_source, expand_urls, read_shard
from vlpt.data.transforms import EvalTransform, TrainTransform, normalize_batch, normalize_pixels
from vlpt.data.video import ClipSampler, UnusableVideo, segment_times

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "CaptionTokens",
    "ClipSampler",
    "DataSourceError",
    "EvalTransform",
    "MediaFileReader",
    "Sample",
    "SkipCounter",
    "SkipReason",
    "TrainLoader",
    "TrainTransform",
    "UnreadableMedia",
    "UnusableVideo",
    "VideoSample",
    "build_train_loader",
    "check_source",
    "expand_urls",
    "iter_eval_batches",
    "normalize_batch",
    "normalize_pixels",
    "parse_sample",
    "read_shard",
    "segment_times",
]
