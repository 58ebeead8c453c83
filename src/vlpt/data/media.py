"""Image and video files on disk, preprocessed exactly as evaluation shards are.

    read = MediaFileReader(image_size=64, num_frames=8)
    pixels = read("photo.jpg")     # uint8 (S, S, 3)
    clip = read("cat.mp4")         # uint8 (T, S, S, 3): the middle frames of T equal segments

Images go through `EvalTransform` (shortest side to S, center crop) and videos through
`ClipSampler` with it, as in `iter_eval_batches`, so a model sees a file the way it saw its
evaluation set; `normalize_pixels` turns a batch of them into model input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlpt.data.loader import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_NUM_FRAMES
from vlpt.data.samples import VIDEO_EXTENSIONS, SkipReason, open_image
from vlpt.data.transforms import EvalTransform
from vlpt.data.video import ClipSampler, UnusableVideo


class UnreadableMedia(Exception):
    """A file that gives no pixels; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot read '{path}': {reason}")
        self.path, self.reason = str(path), reason


class MediaFileReader:
    """A file path -> uint8 pixels: (S, S, 3) for an image, (T, S, S, 3) for a video.

    Videos are recognised by extension (`VIDEO_EXTENSIONS`: mp4, webm, mkv, avi, mov); any
    other file is opened as an image (every format PIL reads). A file that cannot be read
    raises `UnreadableMedia` with the skip reason the shard reader would count
    (`undecodable_image`, `truncated_video`, ...) or the operating system's message.
    """

    def __init__(
        self,
        image_size: int,
        num_frames: int = DEFAULT_NUM_FRAMES,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.transform = EvalTransform(image_size)
        self.clips = ClipSampler(self.transform, num_frames, max_pixels=max_pixels)
        self.max_pixels = max_pixels

    def __call__(self, path: str | Path) -> np.ndarray:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UnreadableMedia(path, e.strerror or type(e).__name__) from None
        if path.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS:
            try:
                return self.clips(data)  # rng None: evaluation sampling (segment middles)
            except UnusableVideo as e:
                raise UnreadableMedia(path, e.reason.value) from None
        return self._image(path, data)

    def _image(self, path: Path, data: bytes) -> np.ndarray:
        if not data:
            raise UnreadableMedia(path, SkipReason.EMPTY_FILE.value)
        image = open_image(data, self.max_pixels)
        if isinstance(image, SkipReason):
            raise UnreadableMedia(path, image.value)
        try:
            return self.transform(image)
        except Exception:  # truncated data, corrupt stream: PIL raises many types
            raise UnreadableMedia(path, SkipReason.UNDECODABLE_IMAGE.value) from None
        finally:
            image.close()
