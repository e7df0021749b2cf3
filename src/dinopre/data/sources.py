"""Image sources over compact indexes: the files of a scanned folder or the members of a shard set, blank crops
left out (or kept with `--keep-blank`), several roots joined into one.

A source holds only `FileIndex` arrays (and, for shards, a few open descriptors), so the data workers it is forked
into share its pages without copying them (`dinopre.data.index`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from dinopre.data.blank import FLAT, SCANNED, reject_flat
from dinopre.data.images import load_rgb
from dinopre.data.index import FileIndex
from dinopre.data.shards import ShardReader


class IndexSource:
    """The images of one root's index: a folder's files, or a shard set's members (`shards=True`).

    Args:
        index: the entries to serve, in training order.
        shards: the entries are tar members (read at their offsets) rather than files.
        keep_blank: serve flat images too; otherwise one met when decoding raises `BlankImageError`.
    """

    def __init__(self, index: FileIndex, *, shards: bool = False, keep_blank: bool = False) -> None:
        self.index, self.keep_blank = index, keep_blank
        self.reader = ShardReader(index) if shards else None

    def __len__(self) -> int:
        return len(self.index)

    def load(self, index: int) -> Image.Image:
        if self.reader is not None:
            image = self.reader.load(index)
        else:
            image = load_rgb(os.fsdecode(self.index.path(index)))
        return image if self.keep_blank else reject_flat(image)

    def describe(self, index: int) -> str:
        # Printable even when the name is not valid UTF-8 (the bytes become U+FFFD); a member is `shard.tar:name`.
        return self.index.path(index).decode("utf-8", errors="replace")


class JoinedSource:
    """Several sources as one, in order (the roots of a run)."""

    def __init__(self, parts: list[IndexSource]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0] + [len(part) for part in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _part(self, index: int) -> tuple[IndexSource, int]:
        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[k], index - int(self.starts[k])

    def load(self, index: int) -> Image.Image:
        part, within = self._part(index)
        return part.load(within)

    def describe(self, index: int) -> str:
        part, within = self._part(index)
        return part.describe(within)


@dataclass(frozen=True)
class BlankFiles:
    """The blank crops a scan left out, listed without one Python object each (a third of 10^7 crops may be)."""

    indexes: tuple[FileIndex, ...] = ()

    def __len__(self) -> int:
        return sum(len(index) for index in self.indexes)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """(path, reason) of each, in scan order."""
        for index in self.indexes:
            for path in index.paths():
                yield path.decode("utf-8", errors="replace"), SCANNED


def split_blank(index: FileIndex, keep_blank: bool) -> tuple[FileIndex, FileIndex]:
    """(the entries to train on, the blank entries left out) of one root's index."""
    flat = index.verdicts == FLAT
    if keep_blank or not flat.any():
        return index, index.select(np.zeros(len(index), dtype=bool))
    return index.select(~flat), index.select(flat)
