"""`dinopre pack`: tar shards (the WebDataset layout) from folders of crops, for file systems that handle 10^7 small
files badly.

Every image is decoded once: blank crops (one flat colour, whatever their size) and files that cannot be decoded
are left out and listed with their reason in `left_out.json`; `pack.json` records the inputs, the settings and each
shard. Members are named by their path under their input folder (under the folder's name when several are packed),
keep their file's modification time, and follow the folders' sorted order or, with a shuffle seed, a seeded
permutation across shards. The shards are written into a temporary folder beside the output and renamed into
place at the end, so an interrupted pack leaves no half-written output; an existing output, or one inside an input
folder, is refused.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from dinopre.base.errors import ConfigError, DataError
from dinopre.data.blank import BLANK_REASON, is_flat
from dinopre.data.images import BadImageError, load_rgb
from dinopre.data.index import FileIndex
from dinopre.data.scan import scan_roots

MANIFEST, LEFT_OUT = "pack.json", "left_out.json"
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_WINDOW = 256  # images decoded at once (bounded memory, whatever the number of files)


@dataclass
class PackResult:
    """What `pack_folders` wrote."""

    output: Path
    shards: list[Path] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # members of each shard
    members: int = 0
    blank: int = 0
    undecodable: int = 0

    @property
    def left_out(self) -> int:
        return self.blank + self.undecodable

    def pattern(self) -> str:
        """The brace pattern of the shards, for --train-dir."""
        first, last = self.shards[0].name, self.shards[-1].name
        stem = first.rsplit("-", 1)[0]
        return str(self.output / f"{stem}-{{{first.rsplit('-', 1)[1][:-4]}..{last.rsplit('-', 1)[1][:-4]}}}.tar")


def parse_size(text: str) -> int:
    """A size such as `1GB`, `500MB`, `1.5G`, `64KiB` or `1000000` in bytes (KB, MB, GB are powers of 1000).

    Raises:
        ConfigError: not a size, or under 1 KB.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ConfigError(f"--shard-size '{text}' is not a size; write it like 1GB, 500MB or 2GiB.")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size < 1000:
        raise ConfigError(f"--shard-size {text} is under 1 KB; shards of a few hundred MB to a few GB suit most file "
                          "systems.")
    return size


def check_paths(folders: list[Path], output: Path) -> None:
    """Refuse missing inputs, an existing output and an output inside an input.

    Raises:
        DataError: an input folder is missing or not a folder.
        ConfigError: the output exists, or lies inside an input folder.
    """
    if not folders:
        raise ConfigError("Give the folders to pack, then the output folder.")
    for folder in folders:
        if not folder.is_dir():
            raise DataError(f"'{folder}' is not a folder of images; give folders to pack, then the output folder.")
    if output.exists() or output.is_symlink():
        raise ConfigError(f"'{output}' already exists; pack writes a new folder and never overwrites, so choose "
                          "another output folder or remove this one.")
    target = output.resolve()
    for folder in folders:
        if target.is_relative_to(folder.resolve()):
            raise ConfigError(f"'{output}' lies inside the input folder '{folder}'; write the shards outside the "
                              "folders being packed.")


def pack_folders(folders: list[Path], output: Path, *, shard_size: int = 10**9, shuffle_seed: int | None = None,
                 progress: Callable[[int, int], None] | None = None, threads: int | None = None) -> PackResult:
    """Write the images of `folders` into tar shards in the new folder `output`.

    Args:
        folders: folders of crops, searched recursively.
        output: the folder to create.
        shard_size: the largest shard in bytes (a single larger image gets a shard of its own).
        shuffle_seed: spread the images over the shards in a seeded random order instead of the sorted one.
        progress: called with (images done, images in all) as the packing goes.
        threads: decoding threads (default: one per CPU).

    Raises:
        UserError: see `check_paths`; no image under the folders.
    """
    check_paths(folders, output)
    scan = scan_roots([str(folder) for folder in folders], find_blank=False)
    for folder, root in zip(folders, scan.roots):
        if root.kind == "shards":
            raise ConfigError(f"'{folder}' holds .tar shards already; pack reads folders of images.")
    order = np.arange(scan.count) if shuffle_seed is None else np.random.default_rng(shuffle_seed).permutation(
        scan.count)
    members = _Members(scan.roots, folders)
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    staging.mkdir(parents=True)
    try:
        result = _write(members, order, staging, output, shard_size, folders, progress, threads)
        _write_manifest(staging, result, folders, shard_size, shuffle_seed)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.shards = [output / shard.name for shard in result.shards]
    return result


class _Members:
    """The files to pack, addressed by their position in the scan: path, member name and time."""

    def __init__(self, roots: list, folders: list[Path]) -> None:
        self.indexes: list[FileIndex] = [root.index for root in roots]
        self.starts = np.cumsum([0] + [len(index) for index in self.indexes])
        self.bases = [len(os.fsencode(os.path.join(str(folder.expanduser()), ""))) for folder in folders]
        names = [os.fsencode(folder.expanduser().resolve().name or "root") for folder in folders]
        self.heads = [b"" if len(folders) == 1 else _unique(names, k) + b"/" for k in range(len(folders))]

    def locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, i - int(self.starts[k])

    def path(self, i: int) -> bytes:
        k, j = self.locate(i)
        return self.indexes[k].path(j)

    def member(self, i: int) -> tuple[str, int]:
        """The member name and modification time (s) of file i."""
        k, j = self.locate(i)
        index = self.indexes[k]
        return os.fsdecode(self.heads[k] + index.path(j)[self.bases[k]:]), int(index.mtimes[j]) // 10**9


def _unique(names: list[bytes], k: int) -> bytes:
    """The k-th folder's name, numbered when another folder has the same name."""
    return names[k] if names.count(names[k]) == 1 else names[k] + b"-%d" % k


def _checked(path: bytes) -> tuple[bytes | None, str]:
    """(the file's bytes, "") when it is a usable image, else (None, why it is left out)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        image = load_rgb(io.BytesIO(data))
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    except BadImageError as exc:
        return None, str(exc)
    return (None, BLANK_REASON) if is_flat(image) else (data, "")


class _ShardWriter:
    """Tar shards of at most `limit` bytes, opened one after the other."""

    def __init__(self, folder: Path, stem: str, limit: int) -> None:
        self.folder, self.stem, self.limit = folder, stem, limit
        self.paths: list[Path] = []
        self.archive: tarfile.TarFile | None = None
        self.size = self.count = 0
        self.counts: list[int] = []

    def add(self, name: str, data: bytes, mtime: int) -> None:
        cost = 512 + -(-len(data) // 512) * 512 + (1024 if len(name.encode("utf-8", "surrogateescape")) > 99 else 0)
        # A tar ends in two zero blocks and is padded to whole 10,240-byte records: the shard's size on disk.
        if self.archive is None or (self.count and -(-(self.size + cost + 1024) // 10240) * 10240 > self.limit):
            self._next()
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), mtime, 0o644
        self.archive.addfile(info, io.BytesIO(data))
        self.size += cost
        self.count += 1

    def _next(self) -> None:
        self.close()
        self.paths.append(self.folder / f"{self.stem}-{len(self.paths):06d}.tar")
        self.archive = tarfile.open(self.paths[-1], "w", format=tarfile.PAX_FORMAT)
        self.size = self.count = 0

    def close(self) -> None:
        if self.archive is not None:
            self.archive.close()
            self.counts.append(self.count)
            self.archive = None


def _write(members: _Members, order: np.ndarray, staging: Path, output: Path, shard_size: int, folders: list[Path],
           progress: Callable[[int, int], None] | None, threads: int | None) -> PackResult:
    stem = folders[0].expanduser().resolve().name or "shard"
    writer, result = _ShardWriter(staging, stem, shard_size), PackResult(output)
    with open(staging / LEFT_OUT, "w", encoding="utf-8") as left_out, \
            ThreadPoolExecutor(threads or os.cpu_count() or 1) as pool:
        records = _LeftOut(left_out)
        for start in range(0, len(order), _WINDOW):
            window = order[start:start + _WINDOW].tolist()
            for i, (data, reason) in zip(window, pool.map(lambda i: _checked(members.path(i)), window)):
                if data is None:
                    records.add(members.path(i).decode("utf-8", errors="replace"), reason)
                    result.blank += reason == BLANK_REASON
                    result.undecodable += reason != BLANK_REASON
                    continue
                name, mtime = members.member(i)
                writer.add(name, data, mtime)
                result.members += 1
            if progress is not None:
                progress(min(start + _WINDOW, len(order)), len(order))
        records.close()
    writer.close()
    if not result.members:
        raise DataError(f"No usable image under {', '.join(repr(str(f)) for f in folders)}: every one is blank or "
                        f"cannot be decoded (listed in {staging / LEFT_OUT}, removed now).")
    result.shards, result.counts = writer.paths, writer.counts
    return result


class _LeftOut:
    """left_out.json, written as the records come (a third of 10^7 crops may be blank)."""

    def __init__(self, handle: TextIO) -> None:
        self.handle, self.count = handle, 0

    def add(self, path: str, reason: str) -> None:
        self.handle.write(("[\n  " if not self.count else ",\n  ") + json.dumps({"file": path, "reason": reason}))
        self.count += 1

    def close(self) -> None:
        self.handle.write("\n]\n" if self.count else "[]\n")


def _write_manifest(staging: Path, result: PackResult, folders: list[Path], shard_size: int,
                    shuffle_seed: int | None) -> None:
    shards = [{"name": path.name, "members": count, "bytes": path.stat().st_size}
              for path, count in zip(result.shards, result.counts)]
    record = {"inputs": [str(folder.resolve()) for folder in folders], "shard_size": shard_size,
              "shuffle_seed": shuffle_seed, "members": result.members,
              "left_out": {"blank": result.blank, "undecodable": result.undecodable, "listed_in": LEFT_OUT},
              "shards": shards}
    (staging / MANIFEST).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

