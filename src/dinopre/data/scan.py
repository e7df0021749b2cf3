"""Finding the training images: recursive scan of several folders (or tar shard sets), a cached index, progress,
blank crops, problems reported.

The index of a folder is cached (in `$DINOPRE_CACHE_DIR`, else `$XDG_CACHE_HOME/dinopre`, else
`~/.cache/dinopre`) together with the modification time of every sub-folder. Adding, removing or renaming a file
changes its folder's modification time, so a second run only stats the folders (10^3-10^4 of them for 10^6-10^7
crops, cf. lightly-train#151) and rescans when anything changed. The index is a compact `FileIndex` (flat arrays,
`dinopre.data.index`), in memory and on disk; an index cached by an older dinopre (JSON) is rebuilt, never read.

Symbolic links to folders are followed (datasets are often assembled from links), each real folder once: a link
back to an ancestor or to a folder already listed is skipped, so loops cannot hang the scan and no image is listed
twice. Only regular files (or links to one) are images: a FIFO, socket or device named like an image would block
or fail its reader, so it is skipped and reported, as are broken links and unreadable sub-folders. File names are
kept exactly as the OS gives them (names that are not valid UTF-8 included). Each file's size and modification time
are recorded, so a resumed run notices images rewritten in place. Files small enough to be blank crops are decoded
once and the verdict is cached with the index (`dinopre.data.blank`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dinopre.base.errors import DataError
from dinopre.data import shards
from dinopre.data.blank import FLAT, FLAT_RANGE, SCAN_SIZE_BOUND, check_small, reused_verdicts
from dinopre.data.images import load_rgb
from dinopre.data.index import (
    SUPPORTED_EXTENSIONS,
    FileIndex,
    Listing,
    build_index,
    cache_dir,
    cache_file,
    is_image_name,
    read_index,
    write_index,
)

__all__ = ["SUPPORTED_EXTENSIONS", "ScanResult", "cache_dir", "scan_image_files", "scan_roots", "usable_files"]

_CACHE_VERSION = 3  # 2 and before: one JSON file of full paths (index-KEY.json), never read again


@dataclass
class RootScan:
    """What was found under one root: a folder of images, or a set of tar shards."""

    index: FileIndex
    kind: str = "folder"  # "folder" or "shards"
    shard_names: tuple[bytes, ...] = ()  # shards: each shard's name as the run's fingerprint names it


@dataclass
class ScanResult:
    """What a scan found."""

    roots: list[RootScan] = field(default_factory=list)
    unreadable_dirs: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): named like images, unusable
    shard_problems: list[tuple[str, str]] = field(default_factory=list)  # (shard or "shard:member", reason)
    linked_dirs: int = 0  # symbolic links to folders followed
    cached_roots: int = 0  # roots whose index came from the cache

    @property
    def count(self) -> int:
        """The images found (blank ones included)."""
        return sum(len(root.index) for root in self.roots)

    @property
    def files(self) -> list[Path]:
        """Every image as a `Path`, in order (one Python object per file: for small scans and tests)."""
        return [Path(os.fsdecode(path)) for root in self.roots for path in root.index.paths()]

    @property
    def stats(self) -> list[tuple[int, int]]:
        """(size, mtime_ns) of every image, in order."""
        return [(size, mtime) for root in self.roots
                for size, mtime in zip(root.index.sizes.tolist(), root.index.mtimes.tolist())]


@dataclass
class _Walk:
    """One root's listing."""

    listings: list[Listing] = field(default_factory=list)
    relative: list[bytes] = field(default_factory=list)  # each listing's path under the root
    dir_times: dict[str, int] = field(default_factory=dict)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    linked_dirs: int = 0
    found: int = 0
    shards: int = 0  # .tar files at the root's top level: the root is a shard set


def scan_roots(roots: tuple[str, ...] | list[str], progress: Callable[[int], None] | None = None,
               use_cache: bool = True, find_blank: bool = True) -> ScanResult:
    """Every supported image under the given folders (or in the given shard sets), in a deterministic order.

    Files are sorted by path within each root; roots keep the order given. A root that is a brace pattern of tar
    shards, a `.tar` file or a folder holding `.tar` files is read as shards (`dinopre.data.shards`).

    Args:
        roots: folders to scan.
        progress: called with the number of images found so far, every 10,000 files.
        use_cache: read and write the cached index (without it, blank verdicts of unchanged files are still reused).
        find_blank: decode the files small enough to be blank crops (their verdicts are kept in the index).

    Raises:
        DataError: a root is missing or not a folder, or no supported image exists under the roots.
    """
    result = ScanResult()
    for root in roots:
        index = None if shards.is_shard_root(root) else _scan_folder(Path(root).expanduser(), root, result,
                                                                       progress, use_cache, find_blank)
        if index is not None:
            result.roots.append(RootScan(index))
            continue
        found = shards.index_shard_set(root, progress, result.count, use_cache=use_cache, find_blank=find_blank)
        result.roots.append(RootScan(found.index, "shards", found.names))
        result.shard_problems.extend(found.problems)
        result.cached_roots += found.cached
    if not result.count:
        listed = ", ".join(f"'{r}'" for r in roots)
        raise DataError(
            f"No images found under {listed}; supported extensions are {' '.join(SUPPORTED_EXTENSIONS)} (any case)."
        )
    return result


def _scan_folder(root_path: Path, given: str, result: ScanResult, progress: Callable[[int], None] | None,
                 use_cache: bool, find_blank: bool) -> FileIndex | None:
    """The index of a folder of images; None when the folder holds .tar shards at its top level instead."""
    if not root_path.exists():
        raise DataError(f"Training folder '{given}' does not exist; check the --train-dir path.")
    if not root_path.is_dir():
        raise DataError(f"--train-dir '{given}' is not a folder; pass a folder of images.")
    cached = _read_cache(root_path) if use_cache else None
    if cached is not None:
        result.cached_roots += 1
        index, skipped, linked = cached.index, cached.skipped, cached.linked_dirs
        if find_blank and _check_blank(index):
            _write_cache(root_path, index, cached.dir_times, skipped, linked)
    else:
        walk = _walk(root_path, progress, already=result.count)
        if walk.shards:
            return None
        index, skipped, linked = build_index(walk.listings, walk.relative), walk.skipped, walk.linked_dirs
        if find_blank:
            _reuse_verdicts(root_path, index)
            _check_blank(index)
        if use_cache and not walk.unreadable:
            _write_cache(root_path, index, walk.dir_times, skipped, linked)
        result.unreadable_dirs.extend(walk.unreadable)
    result.skipped_files.extend(skipped)
    result.linked_dirs += linked
    return index


def scan_image_files(roots: tuple[str, ...] | list[str]) -> list[Path]:
    """The images under the given folders (no cache, no progress, blank ones included); see `scan_roots`."""
    return scan_roots(roots, use_cache=False, find_blank=False).files


def usable_files(roots: tuple[str, ...] | list[str]) -> list[Path]:
    """The images under the given folders that are not blank crops (cached index): what --eval-dir and
    `dinopre attention` read."""
    result = scan_roots(roots)
    return [Path(os.fsdecode(path)) for root in result.roots for path, verdict
            in zip(root.index.paths(), root.index.verdicts.tolist()) if verdict != FLAT]


def _walk(root: Path, progress: Callable[[int], None] | None, already: int) -> _Walk:
    """List `root` depth first with os.scandir, following links to folders once per real folder."""
    walk = _Walk()
    seen: set[tuple[int, int]] = set()
    pending = [str(root)]
    base = os.path.join(str(root), "")
    while pending:
        folder = pending.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:
                continue  # a link loop, or a second link to a folder already listed
            seen.add((info.st_dev, info.st_ino))
            walk.dir_times[folder] = info.st_mtime_ns
            _list(folder, walk, pending, progress, already, top=folder == str(root))
        except OSError as exc:
            walk.unreadable.append((folder, exc.strerror or str(exc)))
            continue
        if walk.shards:
            return walk  # a folder of shards: dinopre.data.shards reads it
        walk.relative.append(os.fsencode(os.path.join(folder[len(base):], "")) if folder != str(root) else b"")
    return walk


def _list(folder: str, walk: _Walk, pending: list[str], progress: Callable[[int], None] | None,
          already: int, top: bool) -> None:
    """Add one folder's images to the walk (nothing of it when its listing fails part way)."""
    listing = Listing(os.fsencode(os.path.join(folder, "")))
    marks = (len(pending), len(walk.skipped), walk.linked_dirs, walk.found)
    try:
        with os.scandir(folder) as entries:  # iterated, not listed: a flat folder of 10^7 entries stays small
            for entry in entries:
                if top and entry.name.lower().endswith(".tar") and entry.is_file():
                    walk.shards += 1
                elif _visit(entry, listing, walk, pending) and progress is not None and walk.found % 10_000 == 0:
                    progress(already + walk.found)
    except OSError:
        del pending[marks[0]:], walk.skipped[marks[1]:]
        walk.linked_dirs, walk.found = marks[2], marks[3]
        raise
    walk.listings.append(listing)


def _visit(entry: os.DirEntry, listing: Listing, walk: _Walk, pending: list[str]) -> bool:
    """Sort one directory entry into sub-folders to list, images, and files named like images that are unusable;
    True when it was an image."""
    try:
        if entry.is_dir():  # follows links
            pending.append(entry.path)
            walk.linked_dirs += entry.is_symlink()
            return False
        if not is_image_name(entry.name):
            return False
        if entry.is_file():  # a regular file, or a link to one
            info = entry.stat()
            listing.add(os.fsencode(entry.name), info.st_size, info.st_mtime_ns)
            walk.found += 1
            return True
        if entry.is_symlink() and not os.path.exists(entry.path):
            walk.skipped.append((entry.path, "a broken symbolic link"))
        else:
            walk.skipped.append((entry.path, "not a regular file (a FIFO, socket or device)"))
    except OSError as exc:
        walk.skipped.append((entry.path, exc.strerror or str(exc)))
    return False


def _check_blank(index: FileIndex) -> bool:
    """Decode the small files of a folder index not checked yet; True when any was."""
    return check_small(index.sizes, index.verdicts, lambda i: load_rgb(Path(os.fsdecode(index.path(i))))) > 0


# ============ the cache ============


@dataclass
class _Cached:
    """A folder's cached index and what was found with it."""

    index: FileIndex
    dir_times: dict[str, int]
    skipped: list[tuple[str, str]]
    linked_dirs: int

    def fresh(self) -> bool:
        """Whether no folder under the root changed since the index was written."""
        try:
            return all(os.stat(folder).st_mtime_ns == mtime for folder, mtime in self.dir_times.items())
        except OSError:
            return False


def _load_cache(root: Path) -> _Cached | None:
    """The cached index of `root` as written (fresh or not); None for a missing, damaged or foreign one."""
    stored = read_index(cache_file("index", root))
    if stored is None:
        return None
    index, header = stored
    try:
        blank = header["blank"]
        if (header["version"] != _CACHE_VERSION or header["root"] != _text(root.resolve())
                or Path(header["as_given"]) != root or blank["bound"] != SCAN_SIZE_BOUND
                or blank["range"] != FLAT_RANGE):
            return None
        return _Cached(index, {str(folder): int(mtime) for folder, mtime in header["dirs"]},
                       [(str(p), str(reason)) for p, reason in header["skipped"]], int(header["linked_dirs"]))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # a damaged or foreign index only costs a rescan


def _read_cache(root: Path) -> _Cached | None:
    """The cached listing of `root` if no folder under it changed since it was written, else None."""
    cached = _load_cache(root)
    return cached if cached is not None and cached.fresh() else None


def _reuse_verdicts(root: Path, index: FileIndex) -> None:
    """Blank verdicts of an earlier index of the same files, where they did not change (a resume lists the folder
    afresh but need not decode its small files again)."""
    cached = _load_cache(root)
    if cached is None or not cached.index.same_listing(index):
        return
    old = cached.index
    index.verdicts[:] = reused_verdicts(index.sizes, index.mtimes, old.sizes, old.mtimes, old.verdicts)


def _text(path: Path | str) -> str:
    """A path as JSON can hold it: names that are not valid UTF-8 keep their bytes as surrogate escapes, which
    json writes as \\udcXX and reads back unchanged."""
    return os.fsdecode(os.fsencode(path))


def _write_cache(root: Path, index: FileIndex, dir_times: dict[str, int], skipped: list[tuple[str, str]],
                 linked: int) -> None:
    header = {"version": _CACHE_VERSION, "root": _text(root.resolve()), "as_given": _text(root),
              "dirs": [[_text(folder), mtime] for folder, mtime in dir_times.items()],
              "skipped": [[_text(p), reason] for p, reason in skipped], "linked_dirs": linked,
              "blank": {"bound": SCAN_SIZE_BOUND, "range": FLAT_RANGE}}
    path = cache_file("index", root)
    write_index(path, index, header)
    try:
        path.with_name(path.name.replace(".idx", ".json")).unlink(missing_ok=True)  # the index of dinopre 0.1
    except OSError:
        pass
