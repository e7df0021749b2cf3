"""Finding the training images: recursive, ordered scans, the cached index and its invalidation, progress,
symlink loops, unreadable folders, and the errors for a missing, wrong or empty root.

Every test that scans points `DINOPRE_CACHE_DIR` at a temporary folder, so the user's cache is never touched.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from dinopre.base.errors import DataError
from dinopre.data.index import MAGIC, read_index
from dinopre.data.scan import ScanResult, cache_dir, scan_roots

OLD_NS = 1_000_000_000 * 10**9  # 2001-09-09: a directory time no edit made today can produce


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, private index cache."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DINOPRE_CACHE_DIR", str(folder))
    assert cache_dir() == folder
    return folder


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def _rel(result: ScanResult, root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in result.files]


def _age_folders(root: Path, step: int = 0) -> None:
    """Set every folder's time to a fixed old value, so the edit that follows surely changes it (any timestamp
    granularity)."""
    stamp = OLD_NS + step * 10**9
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, ns=(stamp, stamp))


def _index_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("index-*.idx")) if cache.exists() else []


def _rewrite_header(index: Path, change) -> None:
    """Edit the JSON header of a cached index in place (its arrays unchanged)."""
    data = index.read_bytes()
    start = len(MAGIC) + 8
    (size,) = struct.unpack("<Q", data[len(MAGIC):start])
    header = json.loads(data[start:start + size])
    change(header)
    text = json.dumps(header).encode()
    index.write_bytes(MAGIC + struct.pack("<Q", len(text)) + text + data[start + size:])


# ============ what a scan finds ============


def test_scan_is_recursive_case_insensitive_and_sorted(tmp_path: Path, cache: Path) -> None:
    """Every supported extension in any case, at any depth, sorted; other files are ignored."""
    root = tmp_path / "data"
    _touch(root, "b/2.JPG", "a/1.png", "a/deep/deeper/3.TiFf", "c.bmp", "d.JPEG", "e.Tif", "f.jpg",
           "notes.txt", "a/x.jpeg.bak", "clip.gif", "face.webp", "README")
    result = scan_roots([str(root)])
    assert _rel(result, root) == ["a/1.png", "a/deep/deeper/3.TiFf", "b/2.JPG", "c.bmp", "d.JPEG", "e.Tif", "f.jpg"]
    assert result.files == sorted(result.files)
    assert result.unreadable_dirs == [] and result.cached_roots == 0


def test_several_roots_keep_their_order_each_sorted(tmp_path: Path, cache: Path) -> None:
    """Roots are listed in the order given (not merged and re-sorted), each root's files sorted."""
    left, right = tmp_path / "left", tmp_path / "right"
    _touch(left, "z.png", "a.png")
    _touch(right, "m.jpg", "b.jpg")
    result = scan_roots([str(right), str(left)])
    assert result.files == [right / "b.jpg", right / "m.jpg", left / "a.png", left / "z.png"]


def test_a_root_that_is_a_symlink_is_followed(tmp_path: Path, cache: Path) -> None:
    """`--train-dir link` where link points at the real folder finds its images."""
    real = tmp_path / "real"
    _touch(real, "s/1.png", "2.jpg")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    assert _rel(scan_roots([str(tmp_path / "link")]), tmp_path / "link") == ["2.jpg", "s/1.png"]


def test_symlink_loops_do_not_hang_or_duplicate(tmp_path: Path, cache: Path) -> None:
    """A link from a sub-folder back to the root (and one to itself) neither hangs nor lists files twice."""
    root = tmp_path / "data"
    _touch(root, "a/1.png", "b/2.png")
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    (root / "b" / "self").symlink_to(root / "b", target_is_directory=True)
    result = scan_roots([str(root)])
    assert _rel(result, root) == ["a/1.png", "b/2.png"]


def test_linked_sub_folders_are_followed_and_counted(tmp_path: Path, cache: Path) -> None:
    """A dataset assembled from links to folders elsewhere finds every image, once."""
    store = tmp_path / "store"
    _touch(store, "signer1/1.png", "signer1/2.png", "signer2/3.jpg")
    root = tmp_path / "dataset"
    root.mkdir()
    (root / "s1").symlink_to(store / "signer1", target_is_directory=True)
    (root / "s2").symlink_to(store / "signer2", target_is_directory=True)
    (root / "again").symlink_to(store / "signer1", target_is_directory=True)  # the same folder twice: listed once
    _touch(root, "own.png")
    result = scan_roots([str(root)])
    assert sorted(p.name for p in result.files) == ["1.png", "2.png", "3.jpg", "own.png"]
    assert result.linked_dirs == 3
    cached = scan_roots([str(root)])
    assert cached.cached_roots == 1 and cached.files == result.files and cached.linked_dirs == 3


def test_files_named_like_images_that_are_not_regular_files_are_skipped_and_reported(tmp_path: Path,
                                                                                    cache: Path) -> None:
    """A FIFO would block its reader forever; a broken link cannot be read: both are skipped at scan time."""
    root = tmp_path / "data"
    _touch(root, "good.png", "real.jpg")
    os.mkfifo(root / "pipe.jpg")
    (root / "gone.png").symlink_to(tmp_path / "missing.png")
    (root / "alias.jpg").symlink_to(root / "real.jpg")  # a link to a regular file is an image
    result = scan_roots([str(root)])
    assert _rel(result, root) == ["alias.jpg", "good.png", "real.jpg"]
    reasons = {Path(path).name: reason for path, reason in result.skipped_files}
    assert set(reasons) == {"pipe.jpg", "gone.png"}
    assert "FIFO" in reasons["pipe.jpg"] and "broken" in reasons["gone.png"]
    assert scan_roots([str(root)]).skipped_files == result.skipped_files  # kept in the cached index too


def test_names_that_are_not_utf8_are_kept_as_the_os_gives_them(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    odd = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not valid UTF-8
    (root / odd).write_bytes(b"x")
    _touch(root, "plain.png")
    result = scan_roots([str(root)])
    assert sorted(os.fsencode(p.name) for p in result.files) == [b"caf\xe9.png", b"plain.png"]
    assert all(p.exists() for p in result.files)
    assert scan_roots([str(root)]).files == result.files  # through the JSON cache and back


def test_sizes_and_modification_times_are_recorded(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.png").write_bytes(b"12345")
    result = scan_roots([str(root)])
    assert result.stats == [(5, (root / "a.png").stat().st_mtime_ns)]


# ============ the cached index ============


def test_second_scan_of_an_unchanged_folder_comes_from_the_cache(tmp_path: Path, cache: Path) -> None:
    """The second scan reads the index (cached_roots == 1) and returns the same list."""
    root = tmp_path / "data"
    _touch(root, "a/1.png", "a/2.png", "b/c/3.jpg", "4.bmp")
    first = scan_roots([str(root)])
    assert first.cached_roots == 0 and len(_index_files(cache)) == 1
    second = scan_roots([str(root)])
    assert second.cached_roots == 1 and second.files == first.files


def _edit_add(root: Path) -> None:
    _touch(root, "a/b/new.png")


def _edit_remove(root: Path) -> None:
    (root / "a" / "b" / "2.png").unlink()


def _edit_rename(root: Path) -> None:
    (root / "c" / "3.jpg").rename(root / "c" / "renamed.jpg")


def _edit_move(root: Path) -> None:
    (root / "a" / "b" / "1.png").rename(root / "c" / "moved.png")


def _edit_new_folder(root: Path) -> None:
    _touch(root, "a/b/fresh/9.tif")


def _edit_new_top_folder(root: Path) -> None:
    _touch(root, "z/9.jpeg")


def _edit_remove_folder(root: Path) -> None:
    (root / "c" / "3.jpg").unlink()
    (root / "c").rmdir()


@pytest.mark.parametrize(("edit", "expected"), [
    (_edit_add, ["a/b/1.png", "a/b/2.png", "a/b/new.png", "c/3.jpg", "top.png"]),
    (_edit_remove, ["a/b/1.png", "c/3.jpg", "top.png"]),
    (_edit_rename, ["a/b/1.png", "a/b/2.png", "c/renamed.jpg", "top.png"]),
    (_edit_move, ["a/b/2.png", "c/3.jpg", "c/moved.png", "top.png"]),
    (_edit_new_folder, ["a/b/1.png", "a/b/2.png", "a/b/fresh/9.tif", "c/3.jpg", "top.png"]),
    (_edit_new_top_folder, ["a/b/1.png", "a/b/2.png", "c/3.jpg", "top.png", "z/9.jpeg"]),
    (_edit_remove_folder, ["a/b/1.png", "a/b/2.png", "top.png"]),
], ids=["add-in-subfolder", "remove", "rename", "move-between-folders", "new-subfolder", "new-top-folder",
        "remove-folder"])
def test_a_changed_folder_is_rescanned(tmp_path: Path, cache: Path, edit, expected: list[str]) -> None:
    """Adding, removing, renaming or moving a file, or adding/removing a folder, makes the next scan rescan and
    return the new list (and the scan after that comes from the refreshed cache)."""
    root = tmp_path / "data"
    _touch(root, "a/b/1.png", "a/b/2.png", "c/3.jpg", "top.png")
    _age_folders(root)
    scan_roots([str(root)])
    assert scan_roots([str(root)]).cached_roots == 1
    edit(root)
    rescanned = scan_roots([str(root)])
    assert rescanned.cached_roots == 0
    assert _rel(rescanned, root) == expected
    again = scan_roots([str(root)])
    assert again.cached_roots == 1 and _rel(again, root) == expected


def test_each_root_has_its_own_cache_entry(tmp_path: Path, cache: Path) -> None:
    """With two roots, changing one rescans only that one."""
    left, right = tmp_path / "left", tmp_path / "right"
    _touch(left, "1.png")
    _touch(right, "2.png")
    _age_folders(left)
    _age_folders(right)
    scan_roots([str(left), str(right)])
    assert scan_roots([str(left), str(right)]).cached_roots == 2
    _touch(right, "3.png")
    result = scan_roots([str(left), str(right)])
    assert result.cached_roots == 1
    assert result.files == [left / "1.png", right / "2.png", right / "3.png"]


@pytest.mark.parametrize("content", [
    b"\x00\xff garbage \x13",
    b'{"version": 1, "root": ',
    b"[1, 2, 3]",
    b'{"version": 2, "root": "/elsewhere", "as_given": "/elsewhere", "dirs": {}, '
    b'"files": [["/elsewhere/x.png", 1, 1]], "skipped": [], "linked_dirs": 0}',
    b'{"version": 99}',
], ids=["binary", "truncated-json", "a-list", "another-root", "other-version"])
def test_a_corrupt_cache_file_is_ignored_and_replaced(tmp_path: Path, cache: Path, content: bytes) -> None:
    """A damaged or foreign index file is ignored (fresh scan, right list) and rewritten."""
    root = tmp_path / "data"
    _touch(root, "a/1.png", "2.png")
    scan_roots([str(root)])
    (index,) = _index_files(cache)
    index.write_bytes(content)
    result = scan_roots([str(root)])
    assert result.cached_roots == 0 and _rel(result, root) == ["2.png", "a/1.png"]
    assert [os.fsdecode(p) for p in read_index(index)[0].paths()] == [str(p) for p in result.files]
    assert scan_roots([str(root)]).cached_roots == 1


@pytest.mark.parametrize("drop", ["lengths", "as_given", "dirs", "folders"])
def test_a_cache_file_missing_keys_is_ignored(tmp_path: Path, cache: Path, drop: str) -> None:
    """An index with the right version and folder times but a missing key is ignored, not a crash."""
    root = tmp_path / "data"
    _touch(root, "1.png")
    scan_roots([str(root)])
    (index,) = _index_files(cache)
    _rewrite_header(index, lambda header: header.pop(drop))
    result = scan_roots([str(root)])
    assert _rel(result, root) == ["1.png"] and result.cached_roots == 0


def test_an_index_cut_short_is_ignored(tmp_path: Path, cache: Path) -> None:
    """A cached index whose arrays are cut short (a full disk, a copy interrupted) is rebuilt, not misread."""
    root = tmp_path / "data"
    _touch(root, "a/1.png", "2.png")
    scan_roots([str(root)])
    (index,) = _index_files(cache)
    index.write_bytes(index.read_bytes()[:-3])
    result = scan_roots([str(root)])
    assert result.cached_roots == 0 and _rel(result, root) == ["2.png", "a/1.png"]


def test_an_index_of_dinopre_0_1_is_rebuilt_and_removed(tmp_path: Path, cache: Path) -> None:
    """The JSON index of dinopre 0.1 (full paths) is never read: the folder is scanned, the new index written and
    the old one removed, even when the old one lists other files."""
    root = tmp_path / "data"
    _touch(root, "1.png", "2.png")
    scan_roots([str(root)])
    (index,) = _index_files(cache)
    old = index.with_name(index.name.replace(".idx", ".json"))
    old.write_text(json.dumps({"version": 2, "root": str(root.resolve()), "as_given": str(root), "dirs": {},
                               "files": [[str(root / "gone.png"), 1, 1]], "skipped": [], "linked_dirs": 0}))
    index.unlink()
    result = scan_roots([str(root)])
    assert result.cached_roots == 0 and _rel(result, root) == ["1.png", "2.png"]
    assert not old.exists() and _index_files(cache) == [index]


def test_use_cache_false_writes_and_reads_nothing(tmp_path: Path, cache: Path) -> None:
    """`use_cache=False` neither writes an index nor reports cached roots."""
    root = tmp_path / "data"
    _touch(root, "1.png")
    assert scan_roots([str(root)], use_cache=False).cached_roots == 0
    assert scan_roots([str(root)], use_cache=False).cached_roots == 0
    assert not cache.exists() or not any(cache.iterdir())


def test_an_unwritable_cache_only_costs_a_rescan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the cache folder cannot be created (its parent is a file), the scan still succeeds."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    monkeypatch.setenv("DINOPRE_CACHE_DIR", str(blocker / "cache"))
    root = tmp_path / "data"
    _touch(root, "1.png")
    for _ in range(2):
        result = scan_roots([str(root)])
        assert result.cached_roots == 0 and _rel(result, root) == ["1.png"]


# ============ progress on large folders ============


@pytest.fixture(scope="module")
def big_roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two roots of 10,000 empty .png files each, spread over sub-folders (created once for the module)."""
    roots = []
    for name in ("big_a", "big_b"):
        root = tmp_path_factory.mktemp(name)
        for folder in range(10):
            sub = root / f"part{folder}"
            sub.mkdir()
            for i in range(1000):
                (sub / f"{i:04d}.png").touch()
        roots.append(root)
    return roots[0], roots[1]


def test_progress_is_reported_with_growing_counts_on_large_folders(big_roots: tuple[Path, Path],
                                                                  cache: Path) -> None:
    """Scanning 2 x 10,000 files reports 10000 then 20000 (counts carry across roots); the cached rescan lists the
    same 20,000 files."""
    seen: list[int] = []
    roots = [str(big_roots[0]), str(big_roots[1])]
    result = scan_roots(roots, progress=seen.append)
    assert seen == [10_000, 20_000]
    assert len(result.files) == 20_000 and result.files[:10_000] == sorted(result.files[:10_000])
    again = scan_roots(roots, progress=seen.append)
    assert again.cached_roots == 2 and again.files == result.files


# ============ unreadable folders ============


def _data_with_locked_folder(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "data"
    _touch(root, "open/1.png", "locked/2.png", "3.png")
    return root, root / "locked"


def _check_unreadable_result(result: ScanResult, root: Path, locked: Path, cache: Path) -> None:
    assert _rel(result, root) == ["3.png", "open/1.png"]
    assert [folder for folder, _ in result.unreadable_dirs] == [str(locked)]
    assert "ermission denied" in result.unreadable_dirs[0][1]
    assert _index_files(cache) == []  # an incomplete list is never cached


def test_an_unreadable_subfolder_is_reported_not_fatal(tmp_path: Path, cache: Path) -> None:
    """chmod 000 on a sub-folder: the scan goes on, lists the folder in unreadable_dirs and writes no cache (skipped
    where root reads it anyway)."""
    root, locked = _data_with_locked_folder(tmp_path)
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("running as a user (root) whom chmod 000 does not stop from reading")
        _check_unreadable_result(scan_roots([str(root)]), root, locked, cache)
    finally:
        locked.chmod(0o755)


@pytest.fixture
def deny_listing(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """Folders whose listing fails with EACCES, as chmod 000 does for a normal user (works as root too)."""
    denied: set[str] = set()
    real_scandir = os.scandir

    def scandir(path: str = "."):
        if os.fspath(path) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    yield denied


def test_a_folder_that_cannot_be_listed_is_reported_not_fatal(tmp_path: Path, cache: Path,
                                                               deny_listing: set[str]) -> None:
    """A sub-folder whose listing fails with EACCES (simulated) is reported, the rest is found, nothing is cached."""
    root, locked = _data_with_locked_folder(tmp_path)
    deny_listing.add(str(locked))
    _check_unreadable_result(scan_roots([str(root)]), root, locked, cache)


def test_an_unreadable_folder_warns_at_start_and_stops_a_strict_run(tmp_path: Path, cache: Path,
                                                                     deny_listing: set[str]) -> None:
    """The run's start warns that the folder's images are left out; with --strict-data it is a DataError."""
    from dinopre.config.loading import build_config
    from dinopre.data.pipeline import build_source

    root, locked = _data_with_locked_folder(tmp_path)
    deny_listing.add(str(locked))
    data = build_source(build_config("face", cli_settings={"train_dir": [str(root)]}))
    assert len(data.source) == 2
    assert data.warnings == (f"Folder '{locked}' could not be read (Permission denied); its images are left out.",)
    with pytest.raises(DataError, match=r"Folder '.*locked' cannot be read .*drop --strict-data"):
        build_source(build_config("face", cli_settings={"train_dir": [str(root)], "strict_data": True}))


# ============ unusable roots ============


def test_a_missing_root_is_a_data_error(tmp_path: Path, cache: Path) -> None:
    """A root that does not exist names itself and the flag to check."""
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as info:
        scan_roots([str(missing)])
    assert str(info.value) == f"Training folder '{missing}' does not exist; check the --train-dir path."


def test_a_file_as_root_is_a_data_error(tmp_path: Path, cache: Path) -> None:
    """A root that is a file (even an image) is refused with a sentence saying to pass a folder."""
    image = tmp_path / "one.png"
    image.write_bytes(b"")
    with pytest.raises(DataError) as info:
        scan_roots([str(image)])
    assert str(info.value) == f"--train-dir '{image}' is not a folder; pass a folder of images."


def test_no_images_is_a_data_error_naming_roots_and_extensions(tmp_path: Path, cache: Path) -> None:
    """Folders holding only other files name every root and the supported extensions."""
    first, second = tmp_path / "a", tmp_path / "b"
    _touch(first, "notes.txt", "clip.gif", "sub/x.webp")
    second.mkdir()
    with pytest.raises(DataError) as info:
        scan_roots([str(first), str(second)])
    assert str(info.value) == (f"No images found under '{first}', '{second}'; supported extensions are "
                               ".png .jpg .jpeg .bmp .tif .tiff (any case).")
    assert _index_files(cache) != []  # an empty folder may be cached; it is still an error next time
    with pytest.raises(DataError, match="No images found"):
        scan_roots([str(first), str(second)])


def test_a_missing_second_root_is_an_error_even_if_the_first_has_images(tmp_path: Path, cache: Path) -> None:
    """One good root does not hide a mistyped second one."""
    good = tmp_path / "good"
    _touch(good, "1.png")
    with pytest.raises(DataError, match="does not exist"):
        scan_roots([str(good), str(tmp_path / "typo")])
