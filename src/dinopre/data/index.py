"""A compact index of many files: a handful of flat arrays instead of one Python object per file.

A list of 10^6 `Path` objects costs about 800 bytes per file and, worse, every data worker that reads it writes to
the pages it touches (reference counts, and the cyclic garbage collector's bookkeeping), so each worker slowly
copies the whole list (the copy-on-write growth of PyTorch issue #13246). Here the files of one `--train-dir` are:

- `folders`: each folder's path prefix (ending in its separator), stored once;
- `folder`: per file, the number of its folder (int32);
- `names` and `offsets`: per file, its name's bytes in one buffer (uint8) and where each name starts (int64);
- `sizes`, `mtimes`: per file, its size in bytes and modification time in ns (int64);
- `verdicts`: per file, what the blank check found (`dinopre.data.blank`; uint8);
- `starts`: for the members of a tar shard, where each member's data starts (int64); None for folders.

About 50 bytes per file of a typical crop folder, none of it Python objects, so workers share the pages untouched.
The same arrays are the on-disk cache (`write_index` / `read_index`): a JSON header and the raw arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

SUPPORTED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAGIC = b"DINOPRE-INDEX\n"
# Sorting builds an (n, longest name) byte matrix; above this many bytes the listing is sorted in Python instead.
_MATRIX_LIMIT = 1 << 30


@dataclass(frozen=True, eq=False)
class FileIndex:
    """The files of one root, in training order (see the module docstring for the fields)."""

    folders: tuple[bytes, ...]
    folder: np.ndarray
    names: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    mtimes: np.ndarray
    verdicts: np.ndarray
    starts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.sizes)

    def name(self, i: int) -> bytes:
        """The name of entry `i` (relative to its folder), as bytes."""
        return self.names[self.offsets[i]:self.offsets[i + 1]].tobytes()

    def path(self, i: int) -> bytes:
        """The full path of entry `i` (its folder's prefix and its name), as bytes."""
        return self.folders[self.folder[i]] + self.name(i)

    def paths(self) -> Iterator[bytes]:
        """Every entry's full path, in order."""
        buffer, offsets, folder = self.names.tobytes(), self.offsets.tolist(), self.folder.tolist()
        for i, prefix in enumerate(folder):
            yield self.folders[prefix] + buffer[offsets[i]:offsets[i + 1]]

    def runs(self) -> Iterator[tuple[int, int, int]]:
        """(start, end, folder) of each run of consecutive entries in the same folder."""
        if not len(self):
            return
        edges = np.flatnonzero(np.diff(self.folder)) + 1
        bounds = [0, *edges.tolist(), len(self)]
        for start, end in zip(bounds[:-1], bounds[1:]):
            yield start, end, int(self.folder[start])

    def select(self, keep: np.ndarray) -> FileIndex:
        """The entries where `keep` (bool, one per entry) is True, in the same order."""
        lengths = np.diff(self.offsets)
        names = self.names[np.repeat(keep, lengths)]
        offsets = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
        np.cumsum(lengths[keep], out=offsets[1:])
        starts = self.starts[keep] if self.starts is not None else None
        return FileIndex(self.folders, self.folder[keep], names, offsets, self.sizes[keep], self.mtimes[keep],
                         self.verdicts[keep], starts)

    def same_listing(self, other: FileIndex) -> bool:
        """Whether both list the same paths in the same order (sizes and times aside)."""
        return (self.folders == other.folders and np.array_equal(self.folder, other.folder)
                and np.array_equal(self.offsets, other.offsets) and np.array_equal(self.names, other.names))


def concat_indexes(parts: list[FileIndex]) -> FileIndex:
    """One index of several, in order (each part's folders kept, renumbered)."""
    if not parts:
        return empty_index()
    folder_bases = np.cumsum([0] + [len(p.folders) for p in parts[:-1]])
    name_bases = np.cumsum([0] + [len(p.names) for p in parts[:-1]])
    offsets = np.concatenate([[0]] + [p.offsets[1:] + base for p, base in zip(parts, name_bases)])
    with_starts = all(p.starts is not None for p in parts)
    return FileIndex(tuple(f for p in parts for f in p.folders),
                     np.concatenate([p.folder + base for p, base in zip(parts, folder_bases)]).astype(np.int32),
                     np.concatenate([p.names for p in parts]), offsets.astype(np.int64),
                     np.concatenate([p.sizes for p in parts]), np.concatenate([p.mtimes for p in parts]),
                     np.concatenate([p.verdicts for p in parts]),
                     np.concatenate([p.starts for p in parts]) if with_starts else None)


def empty_index() -> FileIndex:
    """An index of no files."""
    return FileIndex((), np.zeros(0, np.int32), np.zeros(0, np.uint8), np.zeros(1, np.int64), np.zeros(0, np.int64),
                     np.zeros(0, np.int64), np.zeros(0, np.uint8))


# ============ building: listings of folders, sorted as paths sort ============


class Listing:
    """The entries of one folder as it is listed (unsorted): names in one buffer, sizes and times in arrays."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.names, self.ends = bytearray(), array("q")
        self.sizes, self.mtimes, self.starts = array("q"), array("q"), array("q")

    def add(self, name: bytes, size: int, mtime: int, start: int = 0) -> None:
        self.names += name
        self.ends.append(len(self.names))
        self.sizes.append(size)
        self.mtimes.append(mtime)
        self.starts.append(start)

    def __len__(self) -> int:
        return len(self.ends)


def build_index(listings: list[Listing], relative: list[bytes], *, with_starts: bool = False) -> FileIndex:
    """One index of every listed entry, sorted the way `pathlib.Path` objects sort: part by part.

    Args:
        listings: the folders' entries.
        relative: each listing's path under the root, ending in its separator ("" for the root itself); paths are
            sorted by this followed by the name.
        with_starts: keep the listings' `starts` (tar members' data offsets).
    """
    unsorted = listed_index(listings, with_starts=with_starts)
    return _take(unsorted, _path_order(unsorted, relative))


def listed_index(listings: list[Listing], *, with_starts: bool = False) -> FileIndex:
    """One index of every listed entry, in the order listed."""
    counts = np.array([len(listing) for listing in listings], dtype=np.int64)
    folder = np.repeat(np.arange(len(listings), dtype=np.int32), counts)
    names = np.frombuffer(b"".join(bytes(listing.names) for listing in listings), dtype=np.uint8).copy()
    ends = np.concatenate([np.asarray(listing.ends, dtype=np.int64) + base for listing, base in
                           zip(listings, _name_bases(listings))]) if listings else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], ends]).astype(np.int64)
    return FileIndex(tuple(listing.prefix for listing in listings), folder, names, offsets,
                     _joined(listings, "sizes"), _joined(listings, "mtimes"), np.zeros(len(folder), np.uint8),
                     _joined(listings, "starts") if with_starts else None)


def _name_bases(listings: list[Listing]) -> list[int]:
    bases, total = [], 0
    for listing in listings:
        bases.append(total)
        total += len(listing.names)
    return bases


def _joined(listings: list[Listing], field: str) -> np.ndarray:
    parts = [np.asarray(getattr(listing, field), dtype=np.int64) for listing in listings]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _path_order(index: FileIndex, relative: list[bytes]) -> np.ndarray:
    """The permutation that sorts the entries as their paths sort part by part (what sorting `Path`s does).

    Part-by-part order is the order of the path strings with the separator read as the smallest character, and
    for valid UTF-8 the order of the bytes is the order of the characters. So the relative paths, with "/" turned
    into byte 1, sort as bytes (numpy, on a matrix of rows padded with zeros). Names that are not valid UTF-8, or
    that hold byte 1, are sorted in Python by their parts instead.
    """
    n = len(index)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = np.diff(index.offsets)
    heads = [rel.replace(b"/", b"\x01") for rel in relative]
    head_lengths = np.array([len(h) for h in heads], dtype=np.int64)
    width = max(1, int((head_lengths[index.folder] + lengths).max()))
    if n * width > _MATRIX_LIMIT or not _plain_utf8(index, relative):
        return _python_order(index, relative)
    matrix = np.zeros((n, width), dtype=np.uint8)
    for f, head in enumerate(heads):  # the folder part
        if head:
            rows = index.folder == f
            matrix[rows, :len(head)] = np.frombuffer(head, dtype=np.uint8)
    starts, shift = index.offsets[:-1], head_lengths[index.folder]
    for j in range(int(lengths.max())):  # the name part, one column at a time
        rows = np.flatnonzero(lengths > j)
        matrix[rows, shift[rows] + j] = index.names[starts[rows] + j]
    return np.argsort(matrix.view(f"S{width}").ravel(), kind="stable")


def _plain_utf8(index: FileIndex, relative: list[bytes]) -> bool:
    """Whether every name and folder is valid UTF-8 without byte 1 (so byte order is `Path` order)."""
    text = index.names.tobytes()
    if b"\x01" in text or any(b"\x01" in rel for rel in relative):
        return False
    starts = index.offsets[:-1][np.diff(index.offsets) > 0]
    if np.any((index.names[starts] & 0xC0) == 0x80):  # a name that starts inside a character
        return False
    try:
        text.decode("utf-8")
        for rel in relative:
            rel.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _python_order(index: FileIndex, relative: list[bytes]) -> np.ndarray:
    buffer, offsets, folder = index.names.tobytes(), index.offsets.tolist(), index.folder.tolist()

    def parts(i: int) -> tuple[str, ...]:
        return tuple(os.fsdecode(relative[folder[i]] + buffer[offsets[i]:offsets[i + 1]]).split("/"))

    return np.array(sorted(range(len(index)), key=parts), dtype=np.int64)


def _take(index: FileIndex, order: np.ndarray) -> FileIndex:
    """The entries in another order."""
    lengths = np.diff(index.offsets)[order]
    offsets = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    names = np.empty(int(offsets[-1]), dtype=np.uint8)
    chunk = 1 << 16
    for first in range(0, len(order), chunk):  # gathers in chunks: an index per byte of every name at once is big
        part = order[first:first + chunk]
        starts, sizes = index.offsets[part], lengths[first:first + chunk]
        within = np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        names[offsets[first]:offsets[first + len(part)]] = index.names[np.repeat(starts, sizes) + within]
    starts = index.starts[order] if index.starts is not None else None
    return FileIndex(index.folders, index.folder[order], names, offsets, index.sizes[order], index.mtimes[order],
                     index.verdicts[order], starts)


# ============ the cache file: a JSON header, then the raw arrays ============


def is_image_name(name: str | bytes) -> bool:
    """Whether a file name has a supported image extension (any case)."""
    if isinstance(name, bytes):
        return name.lower().endswith(tuple(ext.encode() for ext in SUPPORTED_EXTENSIONS))
    return name.lower().endswith(SUPPORTED_EXTENSIONS)


def cache_dir() -> Path:
    """Where file indexes are cached."""
    if os.environ.get("DINOPRE_CACHE_DIR"):
        return Path(os.environ["DINOPRE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dinopre"


def cache_file(kind: str, path: Path) -> Path:
    """The cache file of a folder's (`kind` "index") or a shard's ("shard") index: named by the hash of its real
    path, so the same folder given two ways shares it."""
    key = hashlib.sha256(os.fsencode(path.resolve())).hexdigest()[:24]
    return cache_dir() / f"{kind}-{key}.idx"


_ARRAYS = (("folder", np.int32), ("names", np.uint8), ("offsets", np.int64), ("sizes", np.int64),
           ("mtimes", np.int64), ("verdicts", np.uint8), ("starts", np.int64))


def write_index(path: Path, index: FileIndex, header: dict[str, Any]) -> None:
    """Write `index` with `header` (plain JSON values) atomically; a failure only costs the next run a rescan."""
    record = {**header, "folders": [os.fsdecode(f) for f in index.folders],
              "lengths": {name: len(getattr(index, name)) for name, _ in _ARRAYS
                          if getattr(index, name) is not None}}
    text = json.dumps(record).encode("ascii")  # ensure_ascii: surrogate escapes of odd names are plain ASCII
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(MAGIC + struct.pack("<Q", len(text)) + text)
            for name, dtype in _ARRAYS:
                values = getattr(index, name)
                if values is not None:
                    handle.write(np.ascontiguousarray(values, dtype=dtype).tobytes())
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def read_index(path: Path) -> tuple[FileIndex, dict[str, Any]] | None:
    """An index and its header as `write_index` wrote them; None for a missing, damaged or foreign file."""
    try:
        with open(path, "rb") as handle:
            if handle.read(len(MAGIC)) != MAGIC:
                return None
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > 1 << 31:
                return None
            header = json.loads(handle.read(size).decode("ascii"))
            arrays = {name: _read_array(handle, dtype, header["lengths"].get(name)) for name, dtype in _ARRAYS}
            if handle.read(1):
                return None
        folders = tuple(os.fsencode(str(f)) for f in header["folders"])
        index = FileIndex(folders, *(arrays[name] for name, _ in _ARRAYS))
        return (index, header) if _consistent(index) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error, UnicodeError):
        return None  # a damaged or foreign index only costs a rescan


def _read_array(handle: BinaryIO, dtype: type, count: Any) -> np.ndarray | None:
    if count is None:
        return None
    if not isinstance(count, int) or count < 0:
        raise ValueError("bad length")
    values = np.empty(count, dtype=dtype)
    if handle.readinto(memoryview(values).cast("B")) != values.nbytes:
        raise ValueError("short array")
    return values


def _consistent(index: FileIndex) -> bool:
    """Whether the arrays fit together (a file cut or edited by hand is not trusted)."""
    n = len(index.sizes)
    lengths_ok = (len(index.folder) == n == len(index.mtimes) == len(index.verdicts) == len(index.offsets) - 1
                  and (index.starts is None or len(index.starts) == n))
    if not lengths_ok or index.offsets[0] != 0 or index.offsets[-1] != len(index.names):
        return False
    if n and (np.any(np.diff(index.offsets) < 0) or index.folder.min() < 0
              or index.folder.max() >= len(index.folders)):
        return False
    return True
