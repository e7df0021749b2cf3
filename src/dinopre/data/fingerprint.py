"""The hashes a checkpoint keeps of its training images, computed from compact indexes.

The byte streams hashed are exactly those of dinopre 0.1 (`pipeline.DataFingerprint` compares them), so a
checkpoint written before the compact index resumes: per file, `ROOT/PATH-UNDER-IT\\n` (ROOT: the first
--train-dir whose path is a prefix of the file's path), `SIZE\\n` and `MTIME_NS\\n`, and, for checkpoints of
dinopre 0.1, the full paths joined by newlines. A tar member is named `ROOT/SHARD-NAME:MEMBER`. Files of one folder
are hashed together (one Python operation per file, none per byte), so 10^6 files take about a second.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from dinopre.data.index import FileIndex

_CHUNK = 1 << 16  # files hashed per join


def digests(parts: list[tuple[FileIndex, tuple[bytes, ...] | None]], roots: tuple[str, ...]) -> tuple[str, ...]:
    """(names, sizes, mtimes, legacy) hex digests of the files of a run.

    Args:
        parts: per root, its index and, for a shard set, each shard's name (None for a folder).
        roots: the --train-dir values as given.
    """
    hashes = [hashlib.sha256() for _ in range(4)]
    bases = [os.fsencode(Path(root).expanduser()) for root in roots]
    first = True
    for number, (index, shard_names) in enumerate(parts):
        heads = ([b"%d/%s:" % (number, name) for name in shard_names] if shard_names is not None
                 else [_folder_head(prefix, bases) for prefix in index.folders])
        for start, end, folder in index.runs():
            for low in range(start, end, _CHUNK):
                _hash_run(hashes, index, low, min(end, low + _CHUNK), heads[folder], bases, first)
                first = False
    return tuple(h.hexdigest() for h in hashes)


def _folder_head(prefix: bytes, bases: list[bytes]) -> bytes | None:
    """What precedes the name of every file of a folder in the names hash: `ROOT/` and the folder's path under that
    root; None when it depends on the file (a later root's path runs on into this folder's file names)."""
    for number, base in enumerate(bases):
        if len(base) <= len(prefix):
            if prefix.startswith(base):
                return b"%d/%s" % (number, prefix[len(base):])
        elif base.startswith(prefix):
            return None
    return b"-1/" + prefix


def _file_name(raw: bytes, bases: list[bytes]) -> bytes:
    number = next((i for i, base in enumerate(bases) if raw.startswith(base)), -1)
    return b"%d/%s" % (number, raw[len(bases[number]):] if number >= 0 else raw)


def _hash_run(hashes: list, index: FileIndex, start: int, end: int, head: bytes | None, bases: list[bytes],
              first: bool) -> None:
    names, sizes, mtimes, legacy = hashes
    prefix = index.folders[index.folder[start]]
    if head is not None:
        names.update(records(index, start, end, head))
    else:
        buffer = index.names[index.offsets[start]:index.offsets[end]].tobytes()
        cuts = (index.offsets[start:end + 1] - index.offsets[start]).tolist()
        names.update(b"".join([_file_name(prefix + buffer[a:b], bases) + b"\n" for a, b in zip(cuts, cuts[1:])]))
    sizes.update(decimal_lines(index.sizes[start:end]))
    mtimes.update(decimal_lines(index.mtimes[start:end]))
    legacy.update((b"" if first else b"\n") + records(index, start, end, prefix)[:-1])


def records(index: FileIndex, start: int, end: int, head: bytes) -> bytes:
    """`head + name + b"\\n"` for each entry in [start, end), built with numpy (no Python object per entry)."""
    lengths = np.diff(index.offsets[start:end + 1])
    count, width = end - start, len(head) + 1
    out = np.empty(int(lengths.sum()) + count * width, dtype=np.uint8)
    record_starts = index.offsets[start:end] - index.offsets[start] + np.arange(count) * width
    name_bytes = index.names[index.offsets[start]:index.offsets[end]]
    out[np.arange(len(name_bytes)) + np.repeat(np.arange(count) * width + len(head), lengths)] = name_bytes
    for i, byte in enumerate(head):
        out[record_starts + i] = byte
    out[record_starts + len(head) + lengths] = ord("\n")
    return out.tobytes()


def decimal_lines(values: np.ndarray) -> bytes:
    """`b"%d\\n"` of each value, joined, built with numpy (no Python object per value)."""
    values = np.asarray(values, dtype=np.int64)
    if not len(values):
        return b""
    negative = values < 0
    magnitude = np.abs(values).astype(np.uint64)
    powers = np.uint64(10) ** np.arange(1, 20, dtype=np.uint64)
    digits = np.searchsorted(powers, magnitude, side="right") + 1
    width = int(digits.max()) + 2  # a sign, the digits, a newline
    table = np.empty((len(values), width), dtype=np.uint8)
    table[:, -1] = ord("\n")
    rest = magnitude.copy()
    for column in range(width - 2, 0, -1):  # digits right-aligned; unused columns are cut below
        table[:, column] = (rest % np.uint64(10)).astype(np.uint8) + ord("0")
        rest //= np.uint64(10)
    first = width - 1 - digits - negative  # each row's first column: its sign or its first digit
    table[negative, first[negative]] = ord("-")
    return table[np.arange(width)[None, :] >= first[:, None]].tobytes()
