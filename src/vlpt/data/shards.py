"""Where samples come from: shard URLs, reading one shard, and the order shards are read in.

- `expand_urls` turns a `Source.url` (folder, brace pattern, `a::b`, `http(s)://`, `pipe:`) into
  shard URLs, and fails early with `DataSourceError` when a local pattern matches nothing.
- `read_shard` streams the samples of one shard with webdataset's tar reader; a shard that is
  missing, empty or cut short is counted, never raised.
- `shards_for_worker` (read once, split across ranks and workers), `resampled` (draw shards with
  replacement forever) and `mix_by_weight` (interleave sources) order the shards.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from vlpt.config import Source
from vlpt.data.samples import SkipCounter, SkipReason

T = TypeVar("T")

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gz bz2 xz zstd
_BLOCK = 512


class DataSourceError(ValueError):
    """A source of shards that cannot be used at all; the message names it in one sentence."""


def expand_urls(url: str) -> list[str]:
    """Shard URLs of a source pattern, in order.

    A folder gives its `*.tar` files sorted (side files such as img2dataset's `.parquet` and
    `_stats.json` are ignored); braces expand (`/d/{00000..00099}.tar`); `a::b` joins patterns;
    `http(s)://...`, other `scheme://` URLs and `pipe:...` commands pass through (braces expanded).
    A local pattern of which no file exists raises `DataSourceError`; one that exists only in part
    is kept whole, and the missing shards are counted as `unreadable_shard` when read.
    """
    urls = [shard for part in url.split("::") if part.strip() for shard in _expand(part.strip())]
    if not urls:
        raise DataSourceError(f"the shard pattern '{url}' is empty; give a folder or a pattern.")
    return urls


def _expand(pattern: str) -> list[str]:
    if pattern.startswith("pipe:") or _URL_SCHEME.match(pattern):
        return list(braceexpand.braceexpand(pattern))
    path = Path(pattern).expanduser()
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar") if p.is_file())
        if not shards:
            raise DataSourceError(
                f"the folder '{pattern}' holds no .tar shard; point the source at a folder of "
                "WebDataset shards or at a pattern such as /data/{00000..00099}.tar."
            )
        return shards
    shards = [os.path.expanduser(p) for p in braceexpand.braceexpand(pattern)]
    if not any(os.path.isfile(p) for p in shards):
        raise DataSourceError(
            f"no file matches the shard pattern '{pattern}'; check the path (a folder of .tar "
            "files or a brace pattern such as /data/{00000..00099}.tar)."
        )
    return shards


def check_source(source: Source) -> dict[str, Any]:
    """Open the first shard of `source` and count its samples (for `vlpt pretrain --dry-run`).

    Returns `{"url", "n_shards", "first_shard_samples"}`; raises `DataSourceError` naming the
    source when no shard matches or the first one cannot be opened.
    """
    urls = expand_urls(source.url)
    skips = SkipCounter()
    n_samples = sum(1 for _ in read_shard(urls[0], skips))
    if skips[SkipReason.UNREADABLE_SHARD.value]:
        raise DataSourceError(
            f"source '{source.url}': its first shard '{urls[0]}' cannot be read as a tar file; "
            "check that it exists and that the URL or pipe command works."
        )
    return {"url": source.url, "n_shards": len(urls), "first_shard_samples": n_samples}


# ---------------------------------------------------------------------------------------------
# Reading one shard


def read_shard(url: str, skips: SkipCounter) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard: `{"__key__", "__url__", "<ext>": bytes, ...}` per key.

    Files are grouped by key as webdataset does (`base_plus_ext`, extensions lower-cased).
    Nothing is raised: a shard that cannot be opened, holds no sample, or ends early is counted
    in `skips` (`unreadable_shard`, `empty_shard`, `truncated_tar`); samples before a cut are kept.
    """
    files = _ShardFiles(url)
    sample: dict[str, Any] | None = None
    n_samples = 0
    for name, data in files:
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        ext = ext.lower()
        if sample is not None and (key != sample["__key__"] or ext in sample):
            n_samples += 1
            yield sample
            sample = None
        if sample is None:
            sample = {"__key__": key, "__url__": url}
        sample[ext] = data
    if sample is not None:
        n_samples += 1
        yield sample
    if files.problem is not None:
        skips.add(files.problem)
    elif n_samples == 0:
        skips.add(SkipReason.EMPTY_SHARD)


class _ShardFiles:
    """(name, bytes) of the regular files in one shard; `problem` is set once it is exhausted."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.problem: SkipReason | None = None

    def __iter__(self) -> Iterator[tuple[str, bytes]]:
        try:
            stream = _TailRecorder(gopen(self.url))
        except Exception:  # missing file, refused connection, bad command: all one reason
            self.problem = SkipReason.UNREADABLE_SHARD
            return
        n_files = 0
        try:
            for file in tar_file_iterator(stream):
                n_files += 1
                yield file["fname"], file["data"]
            if n_files and not stream.ended_cleanly():
                self.problem = SkipReason.TRUNCATED_TAR
        except (tarfile.TarError, OSError, EOFError, zlib.error):
            if n_files or stream.starts_like_tar():
                self.problem = SkipReason.TRUNCATED_TAR
            elif stream.n_bytes:  # bytes that are not a tar archive
                self.problem = SkipReason.UNREADABLE_SHARD
        finally:
            if not _close(stream) and not n_files:  # e.g. `pipe:` whose command failed
                self.problem = SkipReason.UNREADABLE_SHARD


class _TailRecorder:
    """File wrapper that remembers the first and last bytes read.

    Python's tarfile stops silently when an uncompressed archive is cut exactly between two
    members; a complete archive always ends with zero blocks, so the tail tells the two apart.
    """

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.n_bytes = 0
        self.head = b""
        self.tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        if data:
            if len(self.head) < _BLOCK:
                self.head = (self.head + data)[:_BLOCK]
            self.tail = data[-_BLOCK:] if len(data) >= _BLOCK else (self.tail + data)[-_BLOCK:]
            self.n_bytes += len(data)
        return data

    def starts_like_tar(self) -> bool:
        """Whether the first block is a POSIX/GNU tar header (`ustar` magic)."""
        return self.head[257:262] == b"ustar"

    def ended_cleanly(self) -> bool:
        """Whether the archive ended with an end-of-archive zero block (reads what is left)."""
        if self.head.startswith(_COMPRESSED_MAGIC):
            return True  # decompressors raise on a cut stream themselves
        while self.read(1 << 16):
            pass
        return len(self.tail) == _BLOCK and not self.tail.strip(b"\0")

    def close(self) -> None:
        self.raw.close()


def _close(stream: Any) -> bool:
    try:
        stream.close()
    except Exception:  # a pipe reports its command's failure on close
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Shard order


def shards_for_worker(
    urls: Sequence[T], *, rank: int, world_size: int, worker: int, num_workers: int, seed: str
) -> list[T]:
    """This worker's share of one pass over `urls`: shuffled by `seed` (the same on every rank),
    then dealt round-robin over world_size * num_workers readers, so shares are disjoint."""
    order = list(urls)
    random.Random(seed).shuffle(order)
    return order[rank * num_workers + worker :: world_size * num_workers]


def resampled(
    source: Source, urls: Sequence[str], rng: random.Random, read: Callable[[str], Iterable[T]]
) -> Iterator[T]:
    """Items of `read(url)` for shards of `source` drawn with replacement, forever.

    After a shard gives nothing, the next shards are drawn *without* replacement from those not
    tried since the last item, so a source where no shard gives anything raises
    `DataSourceError` after len(urls) tries instead of looping forever.
    """
    untried: list[str] | None = None  # None while the last shard gave something
    while True:
        if untried is None:
            url = rng.choice(urls)
        elif untried:
            url = untried.pop(rng.randrange(len(untried)))
        else:
            raise DataSourceError(
                f"source '{source.url}' yields no usable sample: none of its {len(urls)} shards "
                "could be read or held a valid image-text pair (see the skip counts)."
            )
        gave = False
        for item in read(url):
            gave = True
            yield item
        if gave:
            untried = None
        elif untried is None:
            untried = [u for u in urls if u != url]


def mix_by_weight(
    streams: Sequence[Iterator[T]], weights: Sequence[float], rng: random.Random
) -> Iterator[T]:
    """Interleave infinite streams, taking each next item from stream i with p = w_i / sum(w)."""
    if len(streams) == 1:
        yield from streams[0]
        return
    indices = range(len(streams))
    cum_weights = list(itertools.accumulate(weights))
    while True:
        (i,) = rng.choices(indices, cum_weights=cum_weights)
        yield next(streams[i])
