"""Tar shards as training data (dinopre.data.shards) and `dinopre pack` (dinopre.data.pack): brace patterns, the
cached member index, random-access reads that train exactly like the folder they came from, bad members reported,
nothing extracted, a changed shard refused on resume; pack's output and its refusals.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import TINY
from PIL import Image
from typer.testing import CliRunner

from dinopre.base.errors import ConfigError, DataError
from dinopre.cli import app
from dinopre.config.loading import build_config
from dinopre.data.blank import FLAT
from dinopre.data.images import BadImageError
from dinopre.data.pack import pack_folders, parse_size
from dinopre.data.pipeline import build_source
from dinopre.data.scan import scan_roots
from dinopre.data.shards import ShardReader, expand_braces, index_shard_set, read_members

runner = CliRunner()


class _Silent:
    def emit(self, event: object) -> None:
        pass


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DINOPRE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 face crops, 4 black crops and a broken file."""
    from dinopre.data.demo import write_synthetic_folder

    root = tmp_path_factory.mktemp("crops") / "face"
    write_synthetic_folder(root, "face", 24, size=48)
    for i in range(4):
        Image.new("RGB", (224, 224)).save(root / f"zz_black_{i}.jpg", quality=95)
    (root / "zz_broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture(scope="module")
def packed(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder packed into shards of about 20 KB (several members each)."""
    output = tmp_path_factory.mktemp("packed") / "shards"
    pack_folders([folder], output, shard_size=20_000)
    return output


def _tar(path: Path, members: dict[str, bytes | None], kinds: dict[str, bytes] | None = None) -> Path:
    """A tar of regular members (None: a directory) and, in `kinds`, members of another type by name."""
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                archive.addfile(info)
                continue
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, kind in (kinds or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "elsewhere.jpg"
            archive.addfile(info)
    return path


def _jpeg(seed: int) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


# ============ patterns and shard sets ============


def test_brace_patterns_expand_like_webdataset() -> None:
    assert expand_braces("d/face-{000..003}.tar") == [f"d/face-{i:03d}.tar" for i in range(4)]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("{8..10}.tar") == ["8.tar", "9.tar", "10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_a_pattern_matching_nothing_and_a_missing_shard_are_one_sentence_each(packed: Path, tmp_path: Path) -> None:
    pattern = str(tmp_path / "none-{000..009}.tar")
    with pytest.raises(DataError) as info:
        scan_roots([pattern])
    assert str(info.value).startswith(f"No shard matches '{pattern}';") and "\n" not in str(info.value)
    shards = sorted(packed.glob("*.tar"))
    gap = tmp_path / "gap"
    gap.mkdir()
    for i in (0, 2):
        shutil.copy(shards[i], gap / f"s-{i}.tar")
    with pytest.raises(DataError, match=r"Shard '.*s-1\.tar' of '.*' does not exist \(1 of 3 missing\)"):
        scan_roots([str(gap / "s-{0..2}.tar")])
    result = invoke("train", "face", "--train-dir", pattern, "--output-dir", str(tmp_path / "run"))
    assert result.exit_code == 2 and result.output.count("Error:") == 1 and "Traceback" not in result.output


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_a_folder_of_shards_a_pattern_and_one_tar_find_the_same_members(packed: Path) -> None:
    shards = sorted(packed.glob("*.tar"))
    pattern = str(packed / f"face-{{000000..{len(shards) - 1:06d}}}.tar")
    by_folder, by_pattern = scan_roots([str(packed)]), scan_roots([pattern])
    assert by_folder.count == by_pattern.count == 24 and len(shards) > 2
    assert [os.fsdecode(p) for p in by_folder.roots[0].index.paths()] == \
        [os.fsdecode(p) for p in by_pattern.roots[0].index.paths()]
    assert by_folder.roots[0].kind == "shards" and by_folder.roots[0].shard_names == tuple(
        os.fsencode(s.name) for s in shards)
    assert scan_roots([str(shards[0])]).count == len(read_members(shards[0])[0])


def test_the_member_index_is_cached_and_rebuilt_when_a_shard_changes(tmp_path: Path) -> None:
    shard = _tar(tmp_path / "a.tar", {"x.jpg": _jpeg(0), "y.jpg": _jpeg(1)})
    first = index_shard_set(str(shard))
    assert first.cached == 0 and index_shard_set(str(shard)).cached == 1
    _tar(shard, {"x.jpg": _jpeg(0), "y.jpg": _jpeg(1), "z.jpg": _jpeg(2)})
    again = index_shard_set(str(shard))
    assert again.cached == 0 and len(again.index) == 3


def test_reads_are_random_access_and_nothing_is_extracted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = {f"k{i}.{ext}": _jpeg(i) for i, ext in enumerate(["jpg", "png", "jpg"])}
    data["k0.png"] = _jpeg(9)  # shares a key with k0.jpg: a separate image
    data["k0.json"] = b"{}"  # not an image: ignored
    shard = _tar(tmp_path / "s.tar", data)
    monkeypatch.chdir(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*") if "cache" not in p.parts)
    index, problems = read_members(shard)
    reader = ShardReader(index)
    names = [index.name(i).decode() for i in range(len(index))]
    assert names == ["k0.jpg", "k1.png", "k2.jpg", "k0.png"] and problems == []
    for i in (3, 0, 2, 1):
        assert reader.read(i) == data[names[i]]
    assert sorted(p for p in tmp_path.rglob("*") if "cache" not in p.parts) == before


def test_bad_members_are_skipped_and_reported(tmp_path: Path) -> None:
    """`..`, absolute names and links are left out and reported; a member that is not an image stays and fails
    to decode (reported like a broken file); a shard cut short fails its last member."""
    shard = _tar(tmp_path / "s.tar", {"ok.jpg": _jpeg(0), "../up.jpg": _jpeg(1), "/abs.jpg": _jpeg(2),
                                      "fake.jpg": b"not an image", "dir.jpg": None},
                 {"link.jpg": tarfile.SYMTYPE})
    index, problems = read_members(shard)
    assert [index.name(i) for i in range(len(index))] == [b"ok.jpg", b"fake.jpg"]
    reasons = dict(problems)
    assert "'..' or an absolute path" in reasons[f"{shard}:../up.jpg"]
    assert "'..' or an absolute path" in reasons[f"{shard}:/abs.jpg"]
    assert "not a regular file" in reasons[f"{shard}:link.jpg"] and "not a regular file" in reasons[f"{shard}:dir.jpg"]
    with pytest.raises(BadImageError):
        ShardReader(index).load(1)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:1024 + 300])  # ok.jpg's header and part of its data
    index, problems = read_members(cut)
    assert len(index) == 1 and any("cut short" in reason for _, reason in problems)
    with pytest.raises(BadImageError, match="cut short"):
        ShardReader(index).load(0)
    warnings = build_source(build_config("face", cli_settings={"train_dir": [str(shard)]})).warnings
    assert any(w.startswith("4 tar member(s) or shard(s) cannot be used and are left out") for w in warnings)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["cut.tar", "s.tar"]  # nothing extracted
    not_tar = tmp_path / "junk.tar"
    not_tar.write_bytes(b"\x01" * 2000)
    index, problems = read_members(not_tar)
    assert len(index) == 0 and "not a readable tar archive" in problems[0][1]


def test_blank_members_are_found_and_left_out(tmp_path: Path) -> None:
    black = io.BytesIO()
    Image.new("RGB", (224, 224)).save(black, "JPEG")
    shard = _tar(tmp_path / "s.tar", {"a.jpg": _jpeg(0), "b.jpg": black.getvalue(), "c.jpg": _jpeg(1)})
    found = index_shard_set(str(shard))
    assert found.index.verdicts[1] == FLAT
    data = build_source(build_config("face", cli_settings={"train_dir": [str(shard)]}))
    assert len(data.source) == 2 and [path for path, _ in data.blank] == [f"{shard}:b.jpg"]
    assert data.source.describe(1) == f"{shard}:c.jpg"


# ============ training on shards ============


@pytest.fixture(scope="module")
def trained(folder: Path, packed: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """One epoch on the images pack kept, as a folder, as shards, and as shards read in a worker process."""
    from dinopre.train.engine import fit

    base = tmp_path_factory.mktemp("trained")
    clean = base / "clean"
    shutil.copytree(folder, clean, ignore=shutil.ignore_patterns("zz_*"))  # what pack kept
    losses = {}
    for name, root, workers in (("folder", clean, 0), ("shards", packed, 0), ("worker", packed, 1)):
        settings = {**TINY, "train_dir": [str(root)], "output_dir": str(base / name), "num_workers": workers,
                    "epochs": 1}
        losses[name] = fit(build_config("face", cli_settings=settings), _Silent()).epoch_losses
    return {"losses": losses, "runs": base}


@pytest.mark.slow
def test_shards_train_exactly_like_the_folder_they_were_packed_from(trained: dict) -> None:
    """The same images in the same order give the same losses; in a worker process too."""
    losses = trained["losses"]
    assert losses["shards"] == losses["folder"] == losses["worker"]


@pytest.mark.slow
def test_a_shard_changed_between_a_run_and_its_resume_is_refused(trained: dict, packed: Path) -> None:
    """Like a changed folder: one sentence, exit code 2, the checkpoint left as it was."""
    run = trained["runs"] / "shards"
    checkpoint = (run / "checkpoint_last.pt").read_bytes()
    shard = sorted(packed.glob("*.tar"))[0]
    saved = shard.read_bytes()
    try:
        with tarfile.open(shard, "a") as archive:  # one more member
            info = tarfile.TarInfo("extra.jpg")
            info.size = len(_jpeg(5))
            archive.addfile(info, io.BytesIO(_jpeg(5)))
        result = invoke("resume", run, "--epochs", "3")
        assert result.exit_code == 2 and "training images changed since the checkpoint" in result.output
        assert result.output.count("Error:") == 1 and "Traceback" not in result.output
        assert (run / "checkpoint_last.pt").read_bytes() == checkpoint
    finally:
        shard.write_bytes(saved)


# ============ pack ============


def test_pack_writes_shards_and_records_what_it_left_out(folder: Path, packed: Path) -> None:
    manifest = json.loads((packed / "pack.json").read_text())
    assert manifest["members"] == 24 and manifest["left_out"]["blank"] == 4
    assert manifest["left_out"]["undecodable"] == 1
    assert sum(s["members"] for s in manifest["shards"]) == 24
    assert all(s["bytes"] <= 20_000 for s in manifest["shards"] if s["members"] > 1)
    left = {Path(r["file"]).name: r["reason"] for r in json.loads((packed / "left_out.json").read_text())}
    assert set(left) == {f"zz_black_{i}.jpg" for i in range(4)} | {"zz_broken.jpg"}
    names = [index_shard_set(str(packed)).index.name(i).decode() for i in range(24)]
    assert names == sorted(p.name for p in folder.iterdir() if not p.name.startswith("zz_"))
    assert not list(packed.parent.glob(".shards.partial-*"))


def test_pack_shuffles_with_a_seed(folder: Path, tmp_path: Path) -> None:
    orders = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        pack_folders([folder], tmp_path / name, shard_size=10**9, shuffle_seed=seed)
        index = index_shard_set(str(tmp_path / name)).index
        orders.append([index.name(i) for i in range(len(index))])
    assert orders[0] == orders[1] != orders[2] and sorted(orders[0]) == sorted(orders[2])


def test_pack_refuses_an_existing_output_and_one_inside_its_input(folder: Path, packed: Path,
                                                                  tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="already exists; pack writes a new folder and never overwrites"):
        pack_folders([folder], packed)
    with pytest.raises(ConfigError, match="lies inside the input folder"):
        pack_folders([folder], folder / "shards")
    with pytest.raises(ConfigError, match="holds .tar shards already"):
        pack_folders([packed], tmp_path / "again")
    for args in (["pack", folder, packed], ["pack", folder, folder / "sub"],
                 ["pack", tmp_path / "nope", tmp_path / "o"], ["pack", folder, tmp_path / "o2", "--shard-size", "big"]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert result.output.count("Error:") == 1 and "Traceback" not in result.output, result.output
    assert not (folder / "sub").exists() and not (tmp_path / "o2").exists()


def test_shard_sizes_are_read_like_people_write_them() -> None:
    assert parse_size("1GB") == 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5g") == 1_500_000_000 and parse_size("64000") == 64_000
    for bad in ("big", "1XB", "10", "-1GB"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_the_pack_command_prints_what_it_wrote(folder: Path, tmp_path: Path) -> None:
    result = invoke("pack", folder, tmp_path / "out", "--shard-size", "1MB")
    assert result.exit_code == 0, result.output
    assert "Wrote 24 images into 1 shard(s)" in result.output and "left out 4 blank and 1 undecodable" in result.output
    assert (tmp_path / "out" / "face-000000.tar").is_file()
