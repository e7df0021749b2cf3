"""The compact file index (dinopre.data.index) and the fingerprint computed from it (dinopre.data.fingerprint):
the same order as sorting `Path` objects and the same hashes as dinopre 0.1's list of paths, so checkpoints written
before the index existed still resume; the cache file's round trip and its refusals of damaged files.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from dinopre.data.fingerprint import decimal_lines, digests, records
from dinopre.data.index import (
    FileIndex,
    Listing,
    build_index,
    concat_indexes,
    listed_index,
    read_index,
    write_index,
)
from dinopre.data.scan import scan_roots


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DINOPRE_CACHE_DIR", str(tmp_path / "cache"))


ODD_NAMES = ["a/b.png", "a-c.png", "a/x/z.png", "a/y.png", "a.png/q.jpg", "A.PNG", "é.png", "z/ü/1.png", "a b.png",
             "a!.png", "a/\x01x.png", "日本/語.jpg", "a/b/c/d/e.tif"]


def _odd_folder(root: Path, *, invalid_utf8: bool) -> Path:
    for name in ODD_NAMES:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (len(name.encode()) + 40))
    if invalid_utf8:
        with open(os.fsencode(root) + b"/caf\xe9.png", "wb") as handle:
            handle.write(b"y" * 50)
    return root


def _old_walk_order(root: Path) -> list[Path]:
    """dinopre 0.1's order: every image path, sorted as `Path` objects sort."""
    return sorted(Path(folder) / name for folder, _, names in os.walk(root) for name in names
                  if name.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")))


def _old_fingerprint(roots: list[str], files: list[Path]) -> tuple[str, str, str, str]:
    """dinopre 0.1's fingerprint of a list of paths (pipeline.fingerprint as it was), the reference."""
    names, sizes, mtimes, legacy = (hashlib.sha256() for _ in range(4))
    bases = [os.fsencode(Path(root).expanduser()) for root in roots]
    for path in files:
        raw = os.fsencode(path)
        root = next((i for i, base in enumerate(bases) if raw.startswith(base)), -1)
        names.update(b"%d/%s\n" % (root, raw[len(bases[root]):] if root >= 0 else raw))
        info = path.stat()
        sizes.update(b"%d\n" % info.st_size)
        mtimes.update(b"%d\n" % info.st_mtime_ns)
    legacy.update(b"\n".join(os.fsencode(path) for path in files))
    return names.hexdigest(), sizes.hexdigest(), mtimes.hexdigest(), legacy.hexdigest()


@pytest.mark.parametrize("invalid_utf8", [False, True], ids=["utf8-numpy-sort", "odd-bytes-python-sort"])
def test_the_order_is_that_of_sorted_paths(tmp_path: Path, invalid_utf8: bool) -> None:
    """Part by part, as `Path` sorts: `a/b.png` before `a-c.png`, a folder's files beside its sub-folders by name."""
    root = _odd_folder(tmp_path / "data", invalid_utf8=invalid_utf8)
    assert scan_roots([str(root)], find_blank=False).files == _old_walk_order(root)


@pytest.mark.parametrize("roots", [["data"], ["data", "data2"], ["data2", "data"], ["data/a", "data"],
                                   ["data/", "./data2"]],
                         ids=["one", "two", "reversed", "a-root-inside-another", "as-typed"])
def test_the_fingerprint_is_the_one_of_dinopre_0_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  roots: list[str]) -> None:
    """The same bytes are hashed as from a list of paths, including the quirks (a root whose path is a prefix of
    another root's files names them), so a checkpoint written before the compact index resumes."""
    monkeypatch.chdir(tmp_path)
    _odd_folder(tmp_path / "data", invalid_utf8=True)
    _odd_folder(tmp_path / "data2", invalid_utf8=False)
    scan = scan_roots(roots, find_blank=False)
    parts = [(root.index, None) for root in scan.roots]
    assert digests(parts, tuple(roots)) == _old_fingerprint(roots, scan.files)


def test_decimal_lines_and_records_write_what_python_would() -> None:
    values = np.array([0, 1, -1, 9, 10, 99, 100, -10, 2**63 - 1, -(2**63 - 1), 1_700_000_000_123_456_789])
    assert decimal_lines(values) == b"".join(b"%d\n" % v for v in values.tolist())
    assert decimal_lines(np.zeros(0, dtype=np.int64)) == b""
    listing = Listing(b"/x/")
    for name in (b"a.png", b"bb.jpg", b"\xe9.png"):
        listing.add(name, 1, 2)
    index = listed_index([listing])
    assert records(index, 0, 3, b"0//") == b"0//a.png\n0//bb.jpg\n0//\xe9.png\n"
    assert records(index, 1, 2, b"") == b"bb.jpg\n"


def _index() -> FileIndex:
    first, second = Listing(b"/d/"), Listing(b"/d/s/")
    for name, size in ((b"b.png", 3), (b"a.png", 1)):
        first.add(name, size, size * 10)
    second.add(b"c.jpg", 5, 50, start=512)
    return build_index([first, second], [b"", b"s/"], with_starts=True)


def test_paths_selection_and_joining() -> None:
    index = _index()
    assert list(index.paths()) == [b"/d/a.png", b"/d/b.png", b"/d/s/c.jpg"]
    assert index.sizes.tolist() == [1, 3, 5] and index.starts.tolist() == [0, 0, 512]
    picked = index.select(np.array([True, False, True]))
    assert list(picked.paths()) == [b"/d/a.png", b"/d/s/c.jpg"] and picked.mtimes.tolist() == [10, 50]
    joined = concat_indexes([index, picked])
    assert list(joined.paths()) == list(index.paths()) + list(picked.paths())
    assert [run for run in joined.runs()] == [(0, 2, 0), (2, 3, 1), (3, 4, 2), (4, 5, 3)]


def test_the_cache_file_round_trip_and_damage(tmp_path: Path) -> None:
    """What is written is read back exactly; a file cut short or with arrays that do not fit is refused (None)."""
    index, path = _index(), tmp_path / "x.idx"
    write_index(path, index, {"note": "é"})
    back, header = read_index(path)
    assert header["note"] == "é" and list(back.paths()) == list(index.paths())
    for name in ("folder", "names", "offsets", "sizes", "mtimes", "verdicts", "starts"):
        assert np.array_equal(getattr(back, name), getattr(index, name)), name
    data = path.read_bytes()
    for damaged in (data[:-1], data + b"x", b"garbage", b""):
        path.write_bytes(damaged)
        assert read_index(path) is None
    broken = FileIndex(index.folders, index.folder + 5, index.names, index.offsets, index.sizes, index.mtimes,
                       index.verdicts)  # folder numbers beyond the folders
    write_index(path, broken, {})
    assert read_index(path) is None


def test_a_large_flat_folder_costs_about_fifty_bytes_per_file() -> None:
    """10^5 names of the extractor's kind in one folder: the index's arrays, all of its memory, stay small."""
    listing = Listing(b"/data/face/")
    for i in range(100_000):
        listing.add(b"vid%05d_f%06d.jpg" % (i // 1000, i % 1000), 15_000, 1_700_000_000 * 10**9)
    index = build_index([listing], [b""])
    size = sum(getattr(index, name).nbytes for name in ("folder", "names", "offsets", "sizes", "mtimes", "verdicts"))
    assert size / len(index) < 60
    assert index.name(0) == b"vid00000_f000000.jpg" and index.name(99_999) == b"vid00099_f000999.jpg"
