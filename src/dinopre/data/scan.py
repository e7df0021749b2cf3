"""Finding the training images: recursive scan of several folders, a cached index, progress, problems reported.

The index of a folder is cached (in `$DINOPRE_CACHE_DIR`, else `$XDG_CACHE_HOME/dinopre`, else
`~/.cache/dinopre`) together with the modification time of every sub-folder. Adding, removing or renaming a file
changes its folder's modification time, so a second run only stats the folders (10^3-10^4 of them for 10^6-10^7
crops, cf. lightly-train#151) and rescans when anything changed.

Symbolic links to folders are followed (datasets are often assembled from links), each real folder once: a link
back to an ancestor or to a folder already listed is skipped, so loops cannot hang the scan and no image is listed
twice. Only regular files (or links to one) are images: a FIFO, socket or device named like an image would block
or fail its reader, so it is skipped and reported, as are broken links and unreadable sub-folders. File names are
kept exactly as the OS gives them (names that are not valid UTF-8 included). Each file's size and modification time
are recorded, so a resumed run notices images rewritten in place.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dinopre.base.errors import DataError

SUPPORTED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_CACHE_VERSION = 2


@dataclass
class ScanResult:
    """What a scan found."""

    files: list[Path] = field(default_factory=list)
    stats: list[tuple[int, int]] = field(default_factory=list)  # (size, mtime_ns) of each file
    unreadable_dirs: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): named like images, unusable
    linked_dirs: int = 0  # symbolic links to folders followed
    cached_roots: int = 0  # roots whose index came from the cache


@dataclass
class _Walk:
    """One root's listing."""

    files: list[tuple[Path, int, int]] = field(default_factory=list)  # (path, size, mtime_ns)
    dir_times: dict[str, int] = field(default_factory=dict)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    linked_dirs: int = 0


def cache_dir() -> Path:
    """Where file indexes are cached."""
    if os.environ.get("DINOPRE_CACHE_DIR"):
        return Path(os.environ["DINOPRE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dinopre"


def scan_roots(roots: tuple[str, ...] | list[str], progress: Callable[[int], None] | None = None,
               use_cache: bool = True) -> ScanResult:
    """Every supported image under the given folders, recursively, in a deterministic order.

    Files are sorted by path within each root; roots keep the order given.

    Args:
        roots: folders to scan.
        progress: called with the number of images found so far, every 10,000 files.
        use_cache: read and write the cached index.

    Raises:
        DataError: a root is missing or not a folder, or no supported image exists under the roots.
    """
    result = ScanResult()
    for root in roots:
        root_path = Path(root).expanduser()
        if not root_path.exists():
            raise DataError(f"Training folder '{root}' does not exist; check the --train-dir path.")
        if not root_path.is_dir():
            raise DataError(f"--train-dir '{root}' is not a folder; pass a folder of images.")
        walk = _read_cache(root_path) if use_cache else None
        if walk is not None:
            result.cached_roots += 1
        else:
            walk = _walk(root_path, progress, already=len(result.files))
            if use_cache and not walk.unreadable:
                _write_cache(root_path, walk)
        result.files.extend(path for path, _, _ in walk.files)
        result.stats.extend((size, mtime) for _, size, mtime in walk.files)
        result.unreadable_dirs.extend(walk.unreadable)
        result.skipped_files.extend(walk.skipped)
        result.linked_dirs += walk.linked_dirs
    if not result.files:
        listed = ", ".join(f"'{r}'" for r in roots)
        raise DataError(
            f"No images found under {listed}; supported extensions are {' '.join(SUPPORTED_EXTENSIONS)} (any case)."
        )
    return result


def scan_image_files(roots: tuple[str, ...] | list[str]) -> list[Path]:
    """The images under the given folders (no cache, no progress); see `scan_roots`."""
    return scan_roots(roots, use_cache=False).files


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(SUPPORTED_EXTENSIONS)


def _walk(root: Path, progress: Callable[[int], None] | None, already: int) -> _Walk:
    """List `root` depth first with os.scandir, following links to folders once per real folder."""
    walk = _Walk()
    seen: set[tuple[int, int]] = set()
    pending = [str(root)]
    while pending:
        folder = pending.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen:
                continue  # a link loop, or a second link to a folder already listed
            seen.add((info.st_dev, info.st_ino))
            walk.dir_times[folder] = info.st_mtime_ns
            with os.scandir(folder) as entries:
                listed = list(entries)
        except OSError as exc:
            walk.unreadable.append((folder, exc.strerror or str(exc)))
            continue
        for entry in listed:
            if _visit(entry, walk, pending) and progress is not None and len(walk.files) % 10_000 == 0:
                progress(already + len(walk.files))
    walk.files.sort()
    return walk


def _visit(entry: os.DirEntry, walk: _Walk, pending: list[str]) -> bool:
    """Sort one directory entry into sub-folders to list, images, and files named like images that are unusable;
    True when it was an image."""
    try:
        if entry.is_dir():  # follows links
            pending.append(entry.path)
            walk.linked_dirs += entry.is_symlink()
            return False
        if not _is_image_name(entry.name):
            return False
        if entry.is_file():  # a regular file, or a link to one
            info = entry.stat()
            walk.files.append((Path(entry.path), info.st_size, info.st_mtime_ns))
            return True
        if entry.is_symlink() and not os.path.exists(entry.path):
            walk.skipped.append((entry.path, "a broken symbolic link"))
        else:
            walk.skipped.append((entry.path, "not a regular file (a FIFO, socket or device)"))
    except OSError as exc:
        walk.skipped.append((entry.path, exc.strerror or str(exc)))
    return False


def _cache_file(root: Path) -> Path:
    key = hashlib.sha256(os.fsencode(root.resolve())).hexdigest()[:24]
    return cache_dir() / f"index-{key}.json"


def _read_cache(root: Path) -> _Walk | None:
    """The cached listing of `root` if no folder under it changed since it was written, else None."""
    try:
        cached = json.loads(_cache_file(root).read_text(encoding="utf-8"))
        if cached.get("version") != _CACHE_VERSION or cached.get("root") != _text(root.resolve()):
            return None
        if Path(cached["as_given"]) != root:
            return None
        for folder, mtime in cached["dirs"].items():
            if os.stat(folder).st_mtime_ns != mtime:
                return None
        files = [(Path(p), int(size), int(mtime)) for p, size, mtime in cached["files"]]
        skipped = [(str(p), str(reason)) for p, reason in cached["skipped"]]
        return _Walk(files, {}, [], skipped, int(cached["linked_dirs"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # a damaged or foreign index only costs a rescan


def _text(path: Path | str) -> str:
    """A path as JSON can hold it: names that are not valid UTF-8 keep their bytes as surrogate escapes, which
    json writes as \\udcXX and reads back unchanged."""
    return os.fsdecode(os.fsencode(path))


def _write_cache(root: Path, walk: _Walk) -> None:
    record = {"version": _CACHE_VERSION, "root": _text(root.resolve()), "as_given": _text(root),
              "dirs": {_text(folder): mtime for folder, mtime in walk.dir_times.items()},
              "files": [[_text(p), size, mtime] for p, size, mtime in walk.files],
              "skipped": [[_text(p), reason] for p, reason in walk.skipped], "linked_dirs": walk.linked_dirs}
    path = _cache_file(root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")  # ensure_ascii: escaped surrogates are plain ASCII
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home or full disk only costs the next run a rescan
