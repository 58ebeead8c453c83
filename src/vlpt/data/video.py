"""Video clips for training and evaluation: sparse segment sampling that seeks, one crop per clip.

`ClipSampler` turns the media bytes of a video sample (`mp4|webm|mkv|avi|mov`) into uint8
(T, S, S, 3) with PyAV, inside a dataloader worker:

1. **Times.** The clip range (the whole video, or one of `json["clips"]` = [[start_s, end_s],
   ...]: a random one in training, the first in evaluation) is cut into T equal segments;
   training takes a random time in each segment, evaluation its middle (TSN sampling). A time
   shows the last frame whose timestamp is <= it, so a variable frame rate needs nothing special
   and a video with fewer than T frames repeats frames.
2. **Packets.** Seek to the keyframe before the first time, then demux (read compressed packets,
   no decoding) up to the last time. Packet timestamps tell which frame each time needs and
   which keyframe that frame depends on.
3. **Decode.** Only from the keyframe before each needed frame up to that frame; when the next
   needed frame lies in a later group of pictures, jump to its keyframe instead of decoding the
   frames in between.
4. **Convert.** Only the kept frames: one swscale call scales a frame so that the crop box (drawn
   once per clip, from the display size: every frame gets the same crop) becomes S x S, then the
   display rotation is applied and the box cut out.

Why by hand rather than torchvision / decord / torchcodec: none of them both decodes only the
groups of pictures a sparse sample needs and converts only the kept frames at crop size from
in-memory bytes; `benchmarks/video_decode.py` measures the difference with decoding everything.

Nothing raises on bad input except `UnusableVideo`, which carries the `SkipReason`. A one-frame
video is usable (its frame repeated T times, as an image is a one-frame video); so is any video
shorter than T frames.
"""

from __future__ import annotations

import io
import math
import random
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from vlpt.data.samples import SkipCounter, SkipReason, VideoSample
from vlpt.data.transforms import CropResize

DEFAULT_MAX_FRAME_PIXELS = 64_000_000
"""Frames larger than this (width*height) are skipped, like oversize images."""

_TIME_TOLERANCE_S = 1e-4  # a time this close before a frame's timestamp already shows that frame
# Top-level box types an MP4/MOV file may start with (to tell a cut MP4 from garbage).
_ISO_BMFF_FIRST_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"styp"}


class UnusableVideo(Exception):
    """A video sample that cannot give a clip; `reason` is what to count."""

    def __init__(self, reason: SkipReason) -> None:
        super().__init__(reason.value)
        self.reason = reason


def segment_times(
    start: float, end: float, num_segments: int, rng: random.Random | None
) -> list[float]:
    """One time per equal segment of [start, end): uniform within the segment when `rng` is
    given (training), the segment's middle otherwise (evaluation)."""
    step = (end - start) / num_segments
    if rng is None:
        return [start + (i + 0.5) * step for i in range(num_segments)]
    return [start + (i + rng.random()) * step for i in range(num_segments)]


def choose_clip(
    meta: dict[str, Any], duration: float, rng: random.Random | None
) -> tuple[float, float]:
    """The [start, end) seconds to sample: the whole video, or one of `meta["clips"]` (random in
    training, the first in evaluation) clamped to the video. Raises `UnusableVideo`
    (`clip_out_of_range`) when the range lies outside the video or is not a [start, end] pair."""
    clips = meta.get("clips")
    if not clips:
        return 0.0, duration
    if not isinstance(clips, list):
        raise UnusableVideo(SkipReason.CLIP_OUT_OF_RANGE)
    chosen = clips[rng.randrange(len(clips))] if rng is not None else clips[0]
    try:
        start, end = (float(x) for x in chosen)
    except (TypeError, ValueError):  # not a [start, end] pair of numbers
        raise UnusableVideo(SkipReason.CLIP_OUT_OF_RANGE) from None
    start, end = max(start, 0.0), min(end, duration)
    if not (math.isfinite(start) and math.isfinite(end)) or end - start <= _TIME_TOLERANCE_S:
        raise UnusableVideo(SkipReason.CLIP_OUT_OF_RANGE)
    return start, end


def plan_frames(
    pts: Sequence[int], keyframe: Sequence[bool], targets: Sequence[float]
) -> tuple[list[int], dict[int, int]]:
    """Which frame each target time shows, and where decoding must start for it.

    `pts`/`keyframe` describe the demuxed packets in decode order; `targets` are times in the
    same units. Returns the pts of the frame shown at each target (the last frame with pts <=
    target; the first frame for targets before it) and, for each chosen pts, the index of the
    packet to start decoding from: the last keyframe at or before it in decode order whose pts is
    not later than the frame's.
    """
    shown = sorted(set(pts))
    chosen = [shown[max(bisect_right(shown, t) - 1, 0)] for t in targets]
    index: dict[int, int] = {}
    for i, p in enumerate(pts):
        index.setdefault(p, i)
    begin = {}
    for frame in set(chosen):
        j = index[frame]
        begin[frame] = next((i for i in range(j, -1, -1) if keyframe[i] and pts[i] <= frame), 0)
    return chosen, begin


class ClipSampler:
    """Video bytes -> uint8 (T, S, S, 3): T sampled frames, cropped and resized like an image.

    `transform` gives the crop box (`TrainTransform`: random-resized crop, `EvalTransform`:
    center crop) from the display size; `rng=None` in `__call__` means evaluation (segment middles,
    first clip). Decoding uses `threads` FFmpeg threads per clip (1: the dataloader workers are
    the parallelism).
    """

    def __init__(
        self,
        transform: CropResize,
        num_frames: int,
        *,
        max_pixels: int = DEFAULT_MAX_FRAME_PIXELS,
        threads: int = 1,
    ) -> None:
        self.transform = transform
        self.num_frames = num_frames
        self.max_pixels = max_pixels
        self.threads = threads
        self._reformatter: VideoReformatter | None = None  # made in the worker, keeps swscale state

    def __call__(
        self, data: bytes, meta: dict[str, Any] | None = None, rng: random.Random | None = None
    ) -> np.ndarray:
        """The clip's frames as uint8 (T, S, S, 3); raises `UnusableVideo` with the reason.

        `meta` is the sample's json (only `clips` is read); `rng` None means evaluation."""
        if not data:
            raise UnusableVideo(SkipReason.EMPTY_FILE)
        try:
            container = av.open(io.BytesIO(data), metadata_errors="ignore")
        except Exception:  # FFmpeg raises many types for garbage input
            raise UnusableVideo(_unreadable(data)) from None
        try:
            return self._sample(container, meta or {}, rng)
        except UnusableVideo as e:
            if e.reason is SkipReason.UNDECODABLE_VIDEO:
                raise UnusableVideo(_unreadable(data)) from None
            raise
        except Exception:  # a corrupt stream: never stop training on one bad video
            raise UnusableVideo(_unreadable(data)) from None
        finally:
            container.close()

    def _sample(
        self, container: Any, meta: dict[str, Any], rng: random.Random | None
    ) -> np.ndarray:
        if not container.streams.video:
            raise UnusableVideo(SkipReason.NO_VIDEO_STREAM)
        stream = container.streams.video[0]
        codec = stream.codec_context
        if codec is None:  # FFmpeg knows no decoder for this codec
            raise UnusableVideo(SkipReason.UNSUPPORTED_CODEC)
        if codec.width * codec.height > self.max_pixels:
            raise UnusableVideo(SkipReason.IMAGE_TOO_LARGE)
        codec.thread_count = self.threads
        time_base = float(stream.time_base)
        first_pts = stream.start_time or 0
        packets = None
        duration = _duration(stream, container)
        if duration is None:  # read every packet to learn it
            packets = _demux(container, stream, stop=None)
            duration = _packets_duration(packets, first_pts, time_base)
        start, end = choose_clip(meta, duration, rng)
        times = segment_times(start, end, self.num_frames, rng)
        tolerance = _TIME_TOLERANCE_S / time_base
        targets = [first_pts + t / time_base + tolerance for t in times]
        if packets is None:
            packets = _demux_range(container, stream, targets[0], targets[-1], first_pts)
        if not packets:
            raise UnusableVideo(SkipReason.UNDECODABLE_VIDEO)
        pts = [_pts(p) for p in packets]
        chosen, begin = plan_frames(pts, [p.is_keyframe for p in packets], targets)
        convert = _FrameConverter(self.transform, self._reformatter_in_worker(), rng)
        frames = _decode(codec, packets, chosen, begin, convert)
        return np.stack([frames[p] for p in chosen])  # (T, S, S, 3)

    def _reformatter_in_worker(self) -> VideoReformatter:
        if self._reformatter is None:
            self._reformatter = VideoReformatter()
        return self._reformatter

    def __getstate__(self) -> dict[str, Any]:  # the swscale state does not pickle
        return {**self.__dict__, "_reformatter": None}


def decode_clip(
    sample: VideoSample, sampler: ClipSampler, rng: random.Random | None, skips: SkipCounter
) -> np.ndarray | None:
    """The sample's clip as uint8 (T, S, S, 3); None (counted under its reason) if unusable."""
    try:
        return sampler(sample.data, sample.meta(), rng)
    except UnusableVideo as e:
        skips.add(e.reason)
        return None


class _FrameConverter:
    """Kept frame -> uint8 (S, S, 3): scale so the clip's crop box is S x S, rotate, cut."""

    def __init__(
        self, transform: CropResize, reformatter: VideoReformatter, rng: random.Random | None
    ) -> None:
        self.transform, self.reformatter, self.rng = transform, reformatter, rng
        self.box: tuple[float, float, float, float] | None = None

    def __call__(self, frame: av.VideoFrame) -> np.ndarray:
        size = self.transform.image_size
        quarter_turns = round((frame.rotation or 0) / 90) % 4  # counter-clockwise, for display
        width, height = frame.width, frame.height
        display = (height, width) if quarter_turns % 2 else (width, height)
        if self.box is None:  # drawn once: every frame of the clip gets the same crop
            self.box = self.transform.box(*display, self.rng)
        left, top, right, bottom = self.box
        sx, sy = size / (right - left), size / (bottom - top)  # display-axis scales
        scale_w, scale_h = (sy, sx) if quarter_turns % 2 else (sx, sy)
        # The box lies inside the frame, so the scaled frame is at least S x S.
        out_w, out_h = max(size, round(width * scale_w)), max(size, round(height * scale_h))
        scaled = self.reformatter.reformat(
            frame, out_w, out_h, format="rgb24", interpolation="BICUBIC"
        ).to_ndarray()  # (out_h, out_w, 3), coded orientation
        if quarter_turns:
            scaled = np.rot90(scaled, quarter_turns)
        x0 = min(max(round(left * sx), 0), scaled.shape[1] - size)
        y0 = min(max(round(top * sy), 0), scaled.shape[0] - size)
        return np.ascontiguousarray(scaled[y0 : y0 + size, x0 : x0 + size])


def _decode(
    codec: Any,
    packets: list[av.Packet],
    chosen: list[int],
    begin: dict[int, int],
    convert: _FrameConverter,
) -> dict[int, np.ndarray]:
    """Decode the frames `chosen` (pts) -> converted arrays, feeding only the packets needed.

    Goes through the needed frames in pts order; a frame whose keyframe lies beyond what was fed
    so far is reached by flushing the decoder and jumping to that keyframe. A frame that does not
    come out of a forward pass is tried once more from its own keyframe.
    """
    wanted = set(chosen)
    got: dict[int, np.ndarray] = {}

    def feed(position: int, frame_pts: int) -> tuple[int, bool]:
        """Send packets after `position` until `frame_pts` is out; (last packet sent, drained)."""
        i = position + 1
        while frame_pts not in got and i < len(packets):
            if packets[i].is_corrupt:  # cut or damaged data: the clip is not trustworthy
                raise UnusableVideo(SkipReason.UNDECODABLE_VIDEO)
            for frame in codec.decode(packets[i]):
                keep(frame)
            i += 1
        if frame_pts in got:
            return i - 1, False
        for frame in codec.decode(None):  # end of what we read: take the delayed frames
            keep(frame)
        return i - 1, True

    def keep(frame: av.VideoFrame) -> None:
        p = frame.pts if frame.pts is not None else frame.dts
        if p in wanted and p not in got:
            got[p] = convert(frame)

    position, drained = -1, False
    for frame_pts in sorted(wanted):
        if frame_pts in got:
            continue
        restarted = begin[frame_pts] > position or drained
        if restarted:
            if position >= 0:
                codec.flush_buffers()
            position = begin[frame_pts] - 1
        position, drained = feed(position, frame_pts)
        if frame_pts not in got and not restarted:
            codec.flush_buffers()
            position, drained = feed(begin[frame_pts] - 1, frame_pts)
        if frame_pts not in got:
            raise UnusableVideo(SkipReason.UNDECODABLE_VIDEO)
    return got


def _demux_range(
    container: Any, stream: Any, first: float, last: float, first_pts: int
) -> list[av.Packet]:
    """Packets from the keyframe before pts `first` through every frame with pts <= `last`."""
    if first > first_pts + 1:
        container.seek(int(first), stream=stream, backward=True, any_frame=False)
        packets = _demux(container, stream, stop=last)
        keys = [_pts(p) for p in packets if p.is_keyframe]
        if keys and min(keys) <= first:
            return packets
        # The demuxer seeks by decode time; with B-frames the keyframe found may still show
        # after `first`. Read from the start instead (packets only: cheap).
        container.seek(first_pts, stream=stream, backward=True, any_frame=False)
    return _demux(container, stream, stop=last)


def _demux(container: Any, stream: Any, stop: float | None) -> list[av.Packet]:
    """Packets of `stream` in decode order until one decodes after `stop` (all when None): its
    dts > stop, so it and every later packet show after `stop`."""
    packets: list[av.Packet] = []
    for packet in container.demux(stream):
        if packet.size == 0 or (packet.pts is None and packet.dts is None):
            continue  # the demuxer's end-of-stream marker, or a packet no time can be given to
        decode_time = packet.dts if packet.dts is not None else packet.pts
        if stop is not None and packets and decode_time > stop:
            break
        packets.append(packet)
    return packets


def _pts(packet: av.Packet) -> int:
    """Presentation time; the decode time for packets without one (`_demux` drops packets that
    have neither)."""
    return packet.pts if packet.pts is not None else int(packet.dts or 0)


def _duration(stream: Any, container: Any) -> float | None:
    """Seconds of video the container declares, or None when it declares nothing."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _packets_duration(packets: list[av.Packet], first_pts: int, time_base: float) -> float:
    if not packets:
        raise UnusableVideo(SkipReason.UNDECODABLE_VIDEO)
    end = max(_pts(p) + (p.duration or 0) for p in packets)
    return max((end - first_pts) * time_base, _TIME_TOLERANCE_S * 2)


def _unreadable(data: bytes) -> SkipReason:
    """Why bytes that FFmpeg could not use are unusable: `truncated_video` for an MP4/MOV whose
    boxes run past the end of the file, `undecodable_video` for everything else."""
    return SkipReason.TRUNCATED_VIDEO if _iso_bmff_cut(data) else SkipReason.UNDECODABLE_VIDEO


def _iso_bmff_cut(data: bytes) -> bool:
    """True when `data` starts like an MP4/MOV file but its top-level boxes do not end with it."""
    position, n = 0, len(data)
    if data[4:8] not in _ISO_BMFF_FIRST_BOXES:
        return False
    while position + 8 <= n:
        size = int.from_bytes(data[position : position + 4], "big")
        if size == 1:  # 64-bit size follows the type
            if position + 16 > n:
                return True
            size = int.from_bytes(data[position + 8 : position + 16], "big")
        elif size == 0:  # the box runs to the end of the file
            return False
        if size < 8:
            return False  # not a box: garbage, not a cut
        position += size
    return position != n
