"""vlpt: vision-language pretraining on image/video-text WebDataset shards."""

__version__ = "0.1.0"
