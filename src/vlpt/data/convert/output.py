"""What every evaluation-set converter shares: the output layout, skip counts and input checks.

    OUT_DIR/info.json                  what was converted from where; items, captions, shards
    OUT_DIR/{split}/00000.tar          KEY.<jpg|png|webp|mp4|...>, KEY.txt, KEY.json
    OUT_DIR/{split}/sizes.json         {"00000.tar": count, ...} (read by open_clip)
    OUT_DIR/{split}/nshards.txt        number of shards

`KEY.txt` holds every caption of the item, one a line (clip-benchmark's convention, read by
`vlpt eval retrieval`). Media bytes are copied as they are. A user mistake about a whole input
(missing or unreadable file, wrong schema) raises `ConversionError` with one sentence; a
problem with one item is counted in a `SkipTally` and the item is left out.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any

import webdataset as wds

from vlpt.data.shards import DataSourceError

_SHARD_FILE = re.compile(r"^(?P<shard>\d{5})\.tar(?P<tmp>\.tmp)?$")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class ConversionError(DataSourceError):
    """An input of a converter (annotation file, media folder, argument) that cannot be used at
    all; the message names it and says what to do in one sentence."""


class SkipItem(Exception):
    """Raised inside a converter's per-item code: leave this item out, count it under `reason`."""

    def __init__(self, reason: str, example: str, split: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.example = example
        self.split = split


class SkipTally:
    """Items left out, counted per split and reason, with the first example of each reason."""

    def __init__(self) -> None:
        self.by_split: dict[str, Counter[str]] = {}
        """{split: {reason: n}}; split "" for entries whose split could not be read."""
        self.examples: dict[str, str] = {}
        """{reason: what the first skipped item was (a path, a file name, an entry number)}."""

    def add(self, reason: str, example: str, split: str = "") -> None:
        """Count one item of `split` left out for `reason`."""
        self.by_split.setdefault(split, Counter())[reason] += 1
        self.examples.setdefault(reason, example)

    def totals(self) -> dict[str, int]:
        """{reason: n} over all splits, sorted by reason."""
        total: Counter[str] = Counter()
        for counts in self.by_split.values():
            total.update(counts)
        return dict(sorted(total.items()))

    def report(self) -> str:
        """One line: `skipped 3: missing_image=2 (first: /d/a.jpg), no_captions=1 (first: b.jpg)`."""
        totals = self.totals()
        if not totals:
            return "skipped 0"
        details = ", ".join(f"{r}={n} (first: {self.examples[r]})" for r, n in totals.items())
        return f"skipped {sum(totals.values())}: {details}"


class SplitShards:
    """One split's samples as numbered tar shards of `shard_size` samples each.

    A shard is written as `NNNNN.tar.tmp` and renamed when full, so a reader never sees half a
    shard. Tar members carry a fixed mtime: the same inputs give the same bytes.
    """

    def __init__(self, split_dir: Path, shard_size: int) -> None:
        self.split_dir = split_dir
        self.shard_size = shard_size
        self.sizes: dict[str, int] = {}
        self.keys: set[str] = set()
        self.captions = 0
        self._sink: wds.TarWriter | None = None
        split_dir.mkdir(parents=True, exist_ok=True)

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample (`{"__key__", ext: bytes, ...}`), starting a new shard when full."""
        if self._sink is None:
            name = f"{len(self.sizes):05d}.tar"
            # Given a path, TarWriter opens the file itself and closes it in `close()`.
            self._sink = wds.TarWriter(
                str(self.split_dir / f"{name}.tmp"), compress=False, encoder=False, mtime=0
            )
            self.sizes[name] = 0
        self._sink.write(sample)
        self.keys.add(sample["__key__"])
        self.captions += sample["txt"].count(b"\n") + 1
        name = next(reversed(self.sizes))
        self.sizes[name] += 1
        if self.sizes[name] == self.shard_size:
            self._finish_shard()

    def close(self) -> None:
        """Finish the last shard, write sizes.json and nshards.txt, and delete shards of an
        earlier, larger conversion that this one did not overwrite (a folder glob would read them)."""
        self._finish_shard()
        for path in self.split_dir.iterdir():
            match = _SHARD_FILE.match(path.name)
            if match and (match["tmp"] or path.name not in self.sizes):
                path.unlink()
        write_text(self.split_dir / "sizes.json", json.dumps(self.sizes, indent=1))
        write_text(self.split_dir / "nshards.txt", str(len(self.sizes)))

    def abort(self) -> None:
        """Drop the shard being written (after an error or an interrupt)."""
        if self._sink is not None:
            self._sink.close()
            name = next(reversed(self.sizes))
            (self.split_dir / f"{name}.tmp").unlink(missing_ok=True)
            self._sink = None

    def _finish_shard(self) -> None:
        if self._sink is None:
            return
        self._sink.close()
        name = next(reversed(self.sizes))
        os.replace(self.split_dir / f"{name}.tmp", self.split_dir / name)
        self._sink = None


class ShardOutput:
    """All splits of one conversion; a split's folder is created on its first sample.

    Use as a context manager: on an exception the shards being written are dropped.
    """

    def __init__(self, out_dir: Path, shard_size: int) -> None:
        self.out_dir = out_dir
        self.shard_size = shard_size
        self.splits: dict[str, SplitShards] = {}

    def has(self, split: str, key: str) -> bool:
        """Whether `key` was already written to `split`."""
        return split in self.splits and key in self.splits[split].keys

    def write(self, split: str, sample: dict[str, Any]) -> None:
        """Append `sample` to the shards of `split`."""
        if split not in self.splits:
            self.splits[split] = SplitShards(self.out_dir / split, self.shard_size)
        self.splits[split].write(sample)

    def close(self) -> dict[str, dict[str, int]]:
        """Finish every split; returns {split: {"items", "captions", "shards"}}."""
        for shards in self.splits.values():
            shards.close()
        return {
            split: {
                "items": sum(shards.sizes.values()),
                "captions": shards.captions,
                "shards": len(shards.sizes),
            }
            for split, shards in self.splits.items()
        }

    def __enter__(self) -> ShardOutput:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is not None:
            for shards in self.splits.values():
                shards.abort()


def finish_conversion(
    out_dir: Path,
    info: dict[str, Any],
    written: dict[str, dict[str, int]],
    skips: SkipTally,
    seconds: float,
) -> dict[str, Any]:
    """Write info.json (`info` plus per-split counts and skips) and return the summary that
    `vlpt data convert` prints. `info` names its inputs as lists: `annotations` (files) and
    `media` (folders). Raises `ConversionError` when no item at all was written."""
    if not written:
        raise ConversionError(
            f"no item could be converted from {', '.join(info['annotations'])} ({skips.report()}); "
            f"check that {', '.join(info['media'])} holds the files the annotations name."
        )
    splits = {
        split: {**counts, "skipped": dict(sorted(skips.by_split.get(split, {}).items()))}
        for split, counts in written.items()
    }
    write_info(out_dir, {**info, "splits": splits})
    return {
        "out_dir": str(out_dir),
        "name": info["name"],
        "splits": splits,
        "skipped": skips.totals(),
        "report": skips.report(),
        "seconds": round(seconds, 3),
    }


def make_sample(
    key: str, media_ext: str, media: bytes, captions: list[str], meta: dict[str, Any]
) -> dict[str, Any]:
    """A sample in img2dataset / video2dataset layout: media, all captions a line each, json."""
    return {
        "__key__": key,
        media_ext: media,
        "txt": "\n".join(captions).encode("utf-8"),
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
    }


def sample_key(name: str) -> str:
    """A tar key from a file or video name: webdataset cuts keys at the first dot and splits
    folders at slashes, so everything but letters, digits, `_` and `-` becomes `_`."""
    return _KEY_UNSAFE.sub("_", name)


def clean_caption(text: Any) -> str:
    """One caption on one line: whitespace runs (newlines included) become one space."""
    return " ".join(str(text).split())


def load_json(path: Path, what: str) -> Any:
    """The parsed JSON file `path`; `what` names it in the error ("annotation file")."""
    check_file(path, what)
    try:
        with open(path, encoding="utf-8") as stream:
            return json.load(stream)
    except UnicodeDecodeError:
        raise ConversionError(f"{what} {path} is not UTF-8 text; pass the JSON file.") from None
    except json.JSONDecodeError as e:
        raise ConversionError(
            f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno}); pass the original, "
            "unmodified file."
        ) from None


def check_file(path: Path, what: str) -> None:
    """Raise `ConversionError` unless `path` is a readable file."""
    if not path.exists():
        raise ConversionError(f"{what} {path} does not exist; check the path.")
    if not path.is_file():
        raise ConversionError(f"{what} {path} is not a file; pass the file itself.")
    if not os.access(path, os.R_OK):
        raise ConversionError(f"{what} {path} cannot be read; check its permissions.")


def check_dir(path: Path, what: str, holding: str) -> None:
    """Raise `ConversionError` unless `path` is a folder; `holding` says what it should hold."""
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "does not exist"
        raise ConversionError(f"{what} {path} {state}; pass the folder that holds {holding}.")


def prepare_out_dir(path: Path) -> None:
    """Create the output folder, or raise `ConversionError` when that is not possible."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(
            f"cannot create the output folder {path} ({e.strerror}); choose a writable folder."
        ) from None


def check_splits(requested: list[str], present: list[str], source: str) -> None:
    """Raise `ConversionError` when a requested split has no item in the annotations."""
    for split in requested:
        if split not in present:
            raise ConversionError(
                f"{source} has no item in split '{split}'; it has: {', '.join(present) or 'none'}."
            )


def check_shard_size(shard_size: int) -> None:
    if shard_size < 1:
        raise ConversionError(f"shard size must be at least 1, got {shard_size}.")


def write_info(out_dir: Path, info: dict[str, Any]) -> None:
    """Write `OUT_DIR/info.json`. Splits converted by an earlier run of the same converter into
    the same folder (one split at a time, say) are kept in `splits`."""
    path = out_dir / "info.json"
    try:
        previous = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except (OSError, ValueError):
        previous = {}
    if isinstance(previous, dict) and previous.get("name") == info["name"]:
        info["splits"] = {**previous.get("splits", {}), **info["splits"]}
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(info, indent=1, ensure_ascii=False))


def write_text(path: Path, text: str) -> None:
    path.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
