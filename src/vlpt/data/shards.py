"""Where samples come from: shard URLs, reading one shard, and the order shards are read in.

- `expand_urls` turns a `Source.url` (folder, brace pattern, `a::b`, `http(s)://`, `pipe:`) into
  shard URLs, and fails early with `DataSourceError` when a local pattern matches nothing.
- `read_shard` streams the samples of one shard (opened with webdataset's `gopen`, read by
  `tar_members`); a shard that is missing, empty or cut short is counted, never raised.
- `shards_for_worker` (read once, split across ranks and workers), `resampled` (draw shards with
  replacement forever) and `mix_by_weight` (interleave sources) order the shards.
"""

from __future__ import annotations

import bz2
import gzip
import io
import itertools
import lzma
import os
import random
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

import braceexpand
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from vlpt.config import Source
from vlpt.data.samples import SkipCounter, SkipReason

T = TypeVar("T")

_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


class Readable(Protocol):
    """What the tar reader needs from a stream: a file, a pipe, a decompressor."""

    def read(self, size: int = -1, /) -> bytes: ...


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
            stream = gopen(self.url)
        except Exception:  # missing file, refused connection, bad command: all one reason
            self.problem = SkipReason.UNREADABLE_SHARD
            return
        n_files = 0
        try:
            for name, data in tar_members(stream):
                n_files += 1
                yield name, data
        except NotATarError:
            self.problem = SkipReason.UNREADABLE_SHARD
        except (TruncatedTarError, OSError, EOFError, zlib.error, lzma.LZMAError):
            self.problem = SkipReason.TRUNCATED_TAR if n_files else SkipReason.UNREADABLE_SHARD
        finally:
            if not _close(stream) and not n_files:  # e.g. `pipe:` whose command failed
                self.problem = SkipReason.UNREADABLE_SHARD


class TruncatedTarError(Exception):
    """The archive ends inside a member, or without its end-of-archive block."""


class NotATarError(Exception):
    """The first block is not a tar header."""


def tar_members(stream: Readable) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a tar stream (plain, or gz/bz2/xz compressed).

    A reader by hand rather than `tarfile`: parsing headers with tarfile costs more CPU than
    decoding a 64 px JPEG, and tarfile ends silently when an archive is cut between two members.
    It reads ustar/GNU/pax headers (long names from GNU `L` and pax `path` records), skips
    directories, links and webdataset `__meta__` files, and raises `TruncatedTarError` when the
    stream ends early. An empty stream gives nothing (an empty shard).
    """
    header = _read_exact(stream, _BLOCK)
    if header.startswith(_COMPRESSED_MAGIC):
        stream = _decompressed(header, stream)
        header = _read_exact(stream, _BLOCK)
    if not header:
        return
    if header != _ZERO_BLOCK and not _valid_header(header):
        raise NotATarError()
    long_name: str | None = None
    while True:
        if len(header) < _BLOCK:
            raise TruncatedTarError()
        if header == _ZERO_BLOCK:
            return
        if not _valid_header(header):
            raise TruncatedTarError()  # garbage after valid members: treat as cut there
        size = _header_size(header)
        data = _read_exact(stream, size)
        if len(data) < size or len(_read_exact(stream, -size % _BLOCK)) < -size % _BLOCK:
            raise TruncatedTarError()
        kind = header[156:157]
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == b"x":  # pax extended header of the next member
            long_name = _pax_path(data) or long_name
        elif kind in (b"0", b"\0", b"7"):  # regular file
            name = long_name or _header_name(header)
            long_name = None
            if not (name.startswith("__") and name.endswith("__")):
                yield name, data
        elif kind != b"g":  # directories, links, devices: nothing to read
            long_name = None
        header = _read_exact(stream, _BLOCK)


def _read_exact(stream: Readable, n: int) -> bytes:
    """n bytes, or fewer only at the end of the stream (pipes may return short reads)."""
    data = stream.read(n)
    while 0 < len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _valid_header(header: bytes) -> bool:
    try:
        stored = int(header[148:156].strip(b" \0") or b"0", 8)
    except ValueError:
        return False
    return stored == sum(header) - sum(header[148:156]) + 8 * 32


def _header_size(header: bytes) -> int:
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256 for members over 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b" \0") or b"0", 8)


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0":  # POSIX: the name may continue in the prefix field
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_path(records: bytes) -> str | None:
    """The `path` of a pax extended header (records `"<len> key=value\\n"`), if any."""
    pos = 0
    try:
        while pos < len(records):
            space = records.index(b" ", pos)
            end = pos + int(records[pos:space])
            key, _, value = records[space + 1 : end - 1].partition(b"=")
            if key == b"path":
                return value.decode("utf-8", "surrogateescape")
            pos = end
    except ValueError:
        return None
    return None


def _decompressed(head: bytes, stream: Readable) -> Readable:
    """A decompressing reader over a stream of which `head` has already been read."""
    whole = io.BufferedReader(_Prepended(head, stream))
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=whole)
    if head.startswith(b"BZh"):
        return bz2.BZ2File(whole)
    return lzma.LZMAFile(whole)


class _Prepended(io.RawIOBase):
    """`head` followed by the rest of `stream`, as one readable file."""

    def __init__(self, head: bytes, stream: Readable) -> None:
        self.head, self.stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.head[: len(buffer)] if self.head else self.stream.read(len(buffer))
        self.head = self.head[len(data) :]
        buffer[: len(data)] = data
        return len(data)


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
