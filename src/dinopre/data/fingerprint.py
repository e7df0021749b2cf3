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
    buffer = index.names[index.offsets[start]:index.offsets[end]].tobytes()
    cuts = (index.offsets[start:end + 1] - index.offsets[start]).tolist()
    own = [buffer[a:b] for a, b in zip(cuts, cuts[1:])]
    if head is not None:
        names.update(b"".join([head + name + b"\n" for name in own]))
    else:
        names.update(b"".join([_file_name(prefix + name, bases) + b"\n" for name in own]))
    sizes.update(b"".join([b"%d\n" % value for value in index.sizes[start:end].tolist()]))
    mtimes.update(b"".join([b"%d\n" % value for value in index.mtimes[start:end].tolist()]))
    legacy.update(("" if first else "\n").encode() + b"\n".join([prefix + name for name in own]))
