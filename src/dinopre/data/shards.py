"""Tar shards as training data: finding a shard set, indexing each shard's members once, reading them in any order.

10^7 small files are what cluster file systems handle worst; the usual remedy is a few thousand images per tar
(the WebDataset layout). `--train-dir` takes a folder of `.tar` files, one `.tar`, or a brace pattern such as
`'data/face-{000000..000999}.tar'` (quoted, so that the shell leaves it alone). Every regular member named like an
image is one training image; members that share a key (`x.jpg`, `x.png`) are separate images; other members are
ignored. Nothing is ever extracted to disk.

Each shard's member index (name, data offset, size, time) is read from its tar headers once and cached like a
folder's index (keyed by the shard's path, invalidated by its size, time and inode), so reads are random access
(`os.pread` at the member's offset): the global data order, multi-process slicing and bit-exact resume work as with
folders. A member named with `..` or an absolute path, or that is a link or device, is skipped and reported; one
that the shard cuts short stays in the index and is reported like a broken file when it is read.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from dinopre.base.errors import DataError
from dinopre.data.blank import FLAT_RANGE, SCAN_SIZE_BOUND, check_small
from dinopre.data.images import BadImageError, load_rgb
from dinopre.data.index import (
    FileIndex,
    Listing,
    cache_file,
    concat_indexes,
    is_image_name,
    listed_index,
    read_index,
    write_index,
)

_CACHE_VERSION = 1
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
MAX_SHARDS = 10_000_000  # a pattern that expands to more is a typo


@dataclass
class ShardSet:
    """The members of the shards of one root."""

    index: FileIndex  # folders: each shard's path followed by ":"; starts: each member's data offset
    names: tuple[bytes, ...]  # each shard's file name, as the run's fingerprint names it
    problems: list[tuple[str, str]] = field(default_factory=list)  # (shard or "shard:member", reason)
    cached: int = 0  # 1 when every shard's index came from the cache


def is_shard_root(root: str) -> bool:
    """Whether a --train-dir names shards by itself: a brace pattern (that is not an existing path) or a .tar file
    (a folder holding .tar files is found out when it is listed)."""
    text = os.path.expanduser(root)
    if os.path.isdir(text):
        return False
    return text.lower().endswith(".tar") or bool(_BRACES.search(text))


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in order: `{000..003}` counts (keeping the zero padding), `{a,b}`
    lists; several groups combine.

    Raises:
        DataError: the pattern stands for more than MAX_SHARDS names.
    """
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    choices = _choices(match.group(1))
    rest = expand_braces(tail)
    if len(choices) * len(rest) > MAX_SHARDS:
        raise DataError(f"'{pattern}' stands for more than {MAX_SHARDS:,} shards; check the pattern.")
    return [head + choice + end for choice in choices for end in rest]


def _choices(group: str) -> list[str]:
    numbers = _RANGE.match(group)
    if numbers is None:
        return group.split(",")
    first, last = numbers.groups()
    width = len(first.lstrip("-")) if first.lstrip("-").startswith("0") else 0
    low, high = int(first), int(last)
    if abs(high - low) >= MAX_SHARDS:
        raise DataError(f"'{{{group}}}' stands for more than {MAX_SHARDS:,} shards; check the pattern.")
    step = 1 if high >= low else -1
    return [f"{value:0{width}d}" for value in range(low, high + step, step)]


def shard_paths(root: str) -> list[Path]:
    """The shards of a root: its brace pattern expanded, the .tar file itself, or a folder's .tar files (sorted).

    Raises:
        DataError: a pattern that matches no file, a shard missing from a pattern, or no shard at all.
    """
    text = os.path.expanduser(root)
    if os.path.isdir(text):
        return sorted((Path(entry.path) for entry in os.scandir(text)
                       if entry.name.lower().endswith(".tar") and entry.is_file()), key=lambda p: p.name)
    paths = [Path(name) for name in expand_braces(text)]
    present = [path.is_file() for path in paths]
    if not any(present):
        raise DataError(f"No shard matches '{root}'; check the --train-dir path or pattern (quote a brace pattern "
                        "so that the shell leaves it alone).")
    if not all(present):
        missing = paths[present.index(False)]
        raise DataError(f"Shard '{missing}' of '{root}' does not exist ({present.count(False)} of {len(paths)} "
                        "missing); restore it or narrow the pattern.")
    return paths


def index_shard_set(root: str, progress: Callable[[int], None] | None = None, already: int = 0, *,
                    use_cache: bool = True, find_blank: bool = True) -> ShardSet:
    """Index every shard of a root (from the cache where a shard did not change).

    Raises:
        DataError: the root names no shard (see `shard_paths`).
    """
    paths = shard_paths(root)
    if not paths:
        raise DataError(f"Folder '{root}' holds no .tar shard.")
    parts, problems, cached, found = [], [], 0, already
    for path in paths:
        index, shard_problems, from_cache = _shard_index(path, use_cache, find_blank)
        parts.append(index)
        problems += shard_problems
        cached += from_cache
        if progress is not None and (found + len(index)) // 10_000 > found // 10_000:
            progress(found + len(index))
        found += len(index)
    return ShardSet(concat_indexes(parts), tuple(os.fsencode(p.name) for p in paths), problems,
                    int(cached == len(paths)))


# ============ one shard ============


def _shard_index(path: Path, use_cache: bool, find_blank: bool) -> tuple[FileIndex, list[tuple[str, str]], bool]:
    """A shard's member index, its problems, and whether it came from the cache."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise DataError(f"Shard '{path}' cannot be read ({exc.strerror or exc}).") from None
    stamp = {"version": _CACHE_VERSION, "path": os.fsdecode(os.fsencode(path.resolve())), "size": info.st_size,
             "mtime": info.st_mtime_ns, "inode": info.st_ino, "blank": {"bound": SCAN_SIZE_BOUND,
                                                                         "range": FLAT_RANGE}}
    stored = read_index(cache_file("shard", path)) if use_cache else None
    if stored is not None and all(stored[1].get(key) == value for key, value in stamp.items()):
        index, header = stored
        problems = [(str(name), str(reason)) for name, reason in header.get("problems", [])]
        if find_blank and _check_members(path, index):
            write_index(cache_file("shard", path), index, {**stamp, "problems": problems})
        return index, problems, True
    index, problems = read_members(path)
    if find_blank:
        _check_members(path, index)
    if use_cache:
        write_index(cache_file("shard", path), index, {**stamp, "problems": [list(p) for p in problems]})
    return index, problems, False


def read_members(path: Path) -> tuple[FileIndex, list[tuple[str, str]]]:
    """The image members of one tar (from its headers only) and the problems found: members skipped, a shard cut
    short or damaged, a file that is not a tar."""
    listing = Listing(os.fsencode(path) + b":")
    problems: list[tuple[str, str]] = []
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            _read_headers(handle, path, size, listing, problems)
    except tarfile.ReadError as exc:
        problems.append((str(path), f"not a readable tar archive ({exc}); its members are left out"))
    except OSError as exc:
        problems.append((str(path), f"cannot be read ({exc.strerror or exc}); its members are left out"))
    return listed_index([listing], with_starts=True), problems  # archive order: the order pack wrote


def _read_headers(handle: io.BufferedReader, path: Path, size: int, listing: Listing,
                  problems: list[tuple[str, str]]) -> None:
    archive = tarfile.open(fileobj=handle, mode="r:")
    count = 0
    while True:
        try:
            member = archive.next()
        except tarfile.ReadError as exc:
            problems.append((str(path), f"damaged after {count} members ({exc}); the rest is left out"))
            return
        if member is None:
            break
        archive.members.clear()  # the headers are all we keep: no TarInfo per member for 10^5 members
        count += 1
        _add_member(member, path, size, listing, problems)
    if archive.offset < size:  # the headers stopped before the end: a valid archive ends in zero blocks
        handle.seek(archive.offset)
        if any(handle.read(1024)):
            problems.append((str(path), f"damaged or cut short after {count} members; the rest is left out"))


def _add_member(member: tarfile.TarInfo, path: Path, size: int, listing: Listing,
                problems: list[tuple[str, str]]) -> None:
    name = member.name
    where = f"{path}:{name}"
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts:
        problems.append((where, "a member name with '..' or an absolute path; skipped"))
        return
    if not is_image_name(name):
        return
    if not member.isreg() or member.issparse():
        problems.append((where, "not a regular file (a link, device or sparse member); skipped"))
        return
    if member.offset_data + member.size > size:
        problems.append((str(path), f"cut short: it ends inside member '{name}'"))
    listing.add(os.fsencode(name), member.size, int(member.mtime), member.offset_data)


def _check_members(path: Path, index: FileIndex) -> bool:
    """Decode a shard's small members not checked yet; True when any was."""
    reader = ShardReader(index)
    return check_small(index.sizes, index.verdicts, lambda i: load_rgb(io.BytesIO(reader.read(i)))) > 0


# ============ reading members ============


class ShardReader:
    """Reads members by their index position with `os.pread` (no shared file position, so threads and forked
    worker processes may share the descriptors); at most MAX_OPEN shards are open at once, per process."""

    MAX_OPEN = 64

    def __init__(self, index: FileIndex) -> None:
        self.index = index
        self._open: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:  # a spawned worker opens its own descriptors
        return {"index": self.index}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["index"])

    def shard(self, i: int) -> bytes:
        """The path of entry i's shard."""
        return self.index.folders[self.index.folder[i]][:-1]

    def read(self, i: int) -> bytes:
        """The bytes of member i.

        Raises:
            BadImageError: the shard cannot be read or ends inside the member.
        """
        size, start = int(self.index.sizes[i]), int(self.index.starts[i])
        if self._pid != os.getpid():  # forked: a lock some other thread held at the fork would never be released
            self._lock, self._pid = threading.Lock(), os.getpid()
        try:
            with self._lock:  # held while reading: a descriptor is never closed under another thread's read
                data = os.pread(self._descriptor(int(self.index.folder[i])), size, start)
        except OSError as exc:
            raise BadImageError(f"its shard cannot be read ({exc.strerror or exc})") from None
        if len(data) < size:
            raise BadImageError(f"cut short: the shard ends {len(data)} bytes into its {size}")
        return data

    def load(self, i: int) -> Image.Image:
        """Member i decoded to RGB (raises BadImageError)."""
        return load_rgb(io.BytesIO(self.read(i)))

    def _descriptor(self, shard: int) -> int:
        fd = self._open.get(shard)
        if fd is not None:
            self._open.move_to_end(shard)
            return fd
        fd = os.open(self.index.folders[shard][:-1], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._open[shard] = fd
        if len(self._open) > self.MAX_OPEN:
            _, oldest = self._open.popitem(last=False)
            os.close(oldest)
        return fd
