"""Finding the training images: recursive scan of several folders, a cached index, progress, problems reported.

The index of a folder is cached (in `$DINOPRE_CACHE_DIR`, else `$XDG_CACHE_HOME/dinopre`, else
`~/.cache/dinopre`) together with the modification time of every sub-folder. Adding, removing or renaming a file
changes its folder's modification time, so a second run only stats the folders (10^3-10^4 of them for 10^6-10^7
crops, cf. lightly-train#151) and rescans when anything changed. Symbolic links to folders are not followed, so
link loops cannot hang the scan; sub-folders that cannot be read are reported, not fatal.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dinopre.errors import DataError

SUPPORTED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_CACHE_VERSION = 1


@dataclass
class ScanResult:
    """What a scan found."""

    files: list[Path] = field(default_factory=list)
    unreadable_dirs: list[tuple[str, str]] = field(default_factory=list)  # (folder, reason)
    cached_roots: int = 0  # roots whose index came from the cache


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
        cached = _read_cache(root_path) if use_cache else None
        if cached is not None:
            result.files.extend(cached)
            result.cached_roots += 1
        else:
            files, dir_times = _walk(root_path, result, progress, already=len(result.files))
            result.files.extend(files)
            if use_cache and not result.unreadable_dirs:
                _write_cache(root_path, files, dir_times)
    if not result.files:
        listed = ", ".join(f"'{r}'" for r in roots)
        raise DataError(
            f"No images found under {listed}; supported extensions are {' '.join(SUPPORTED_EXTENSIONS)} (any case)."
        )
    return result


def scan_image_files(roots: tuple[str, ...] | list[str]) -> list[Path]:
    """The images under the given folders (no cache, no progress); see `scan_roots`."""
    return scan_roots(roots, use_cache=False).files


def _walk(root: Path, result: ScanResult, progress: Callable[[int], None] | None,
          already: int) -> tuple[list[Path], dict[str, int]]:
    found: list[Path] = []
    dir_times: dict[str, int] = {}

    def unreadable(error: OSError) -> None:
        result.unreadable_dirs.append((str(error.filename), error.strerror or str(error)))

    for dirpath, _, names in os.walk(root, onerror=unreadable):
        try:
            dir_times[dirpath] = os.stat(dirpath).st_mtime_ns
        except OSError:
            continue
        for name in names:
            if name.lower().endswith(SUPPORTED_EXTENSIONS):
                found.append(Path(dirpath) / name)
                if progress is not None and len(found) % 10_000 == 0:
                    progress(already + len(found))
    found.sort()
    return found, dir_times


def _cache_file(root: Path) -> Path:
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
    return cache_dir() / f"index-{key}.json"


def _read_cache(root: Path) -> list[Path] | None:
    """The cached file list of `root` if no folder under it changed since it was written, else None."""
    try:
        cached = json.loads(_cache_file(root).read_text(encoding="utf-8"))
        if cached.get("version") != _CACHE_VERSION or cached.get("root") != str(root.resolve()):
            return None
        for folder, mtime in cached["dirs"].items():
            if os.stat(folder).st_mtime_ns != mtime:
                return None
        if Path(cached["as_given"]) != root:
            return None
        return [Path(p) for p in cached["files"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # a damaged or foreign index only costs a rescan


def _write_cache(root: Path, files: list[Path], dir_times: dict[str, int]) -> None:
    record = {"version": _CACHE_VERSION, "root": str(root.resolve()), "as_given": str(root),
              "dirs": dir_times, "files": [str(p) for p in files]}
    path = _cache_file(root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home or full disk only costs the next run a rescan
