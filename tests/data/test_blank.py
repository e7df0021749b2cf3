"""Blank crops (dinopre.data.blank): found at scan time and cached, left out before the sampler, listed apart from
broken files, kept with --keep-blank, caught at decode time above the size bound, left out of --eval-dir, preview
and attention; a folder with a third of its crops blank trains exactly like the same folder without them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from PIL import Image

import dinopre.data.scan
from dinopre.base.errors import DataError
from dinopre.base.events import RunFinished, RunStarted
from dinopre.config.loading import build_config
from dinopre.data.blank import DECODED, FLAT, NOT_CHECKED, NOT_FLAT, SCAN_SIZE_BOUND, SCANNED, BlankImageError, is_flat
from dinopre.data.pipeline import build_source
from dinopre.data.scan import scan_roots


class Recorder:
    def __init__(self) -> None:
        self.events: list[object] = []

    def emit(self, event: object) -> None:
        self.events.append(event)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DINOPRE_CACHE_DIR", str(tmp_path / "cache"))


def _black(path: Path, size: int = 224, colour: tuple[int, int, int] = (0, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, "JPEG", quality=95)
    return path


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 24 face crops twice, named like the extractor's frames: alone, and with 12 black frames between."""
    from dinopre.data.demo import write_synthetic_folder

    base = tmp_path_factory.mktemp("crops")
    made = write_synthetic_folder(base / "made", "face", 24, size=48)
    clean, mixed = base / "clean", base / "mixed"
    clean.mkdir()
    mixed.mkdir()
    for i, path in enumerate(sorted(made)):
        shutil.copy2(path, clean / f"v_f{3 * i:06d}.jpg")
        shutil.copy2(path, mixed / f"v_f{3 * i:06d}.jpg")
        if i % 2:
            _black(mixed / f"v_f{3 * i + 1:06d}.jpg")  # a third of the folder is blank
    return {"clean": clean, "mixed": mixed}


def test_flat_means_a_small_range_in_every_channel() -> None:
    assert is_flat(Image.new("RGB", (8, 8), (10, 200, 30)))
    near = np.full((8, 8, 3), 100, dtype=np.uint8)
    near[0, 0] = (104, 96, 100)
    assert is_flat(Image.fromarray(near))
    near[0, 0, 2] = 105
    assert not is_flat(Image.fromarray(near))
    assert is_flat(Image.new("L", (8, 8), 3))


def test_a_black_jpeg_is_small_and_decodes_flat(tmp_path: Path) -> None:
    """The extractor's all-black 224 px crop is well under the bound and decodes to exact zeros."""
    path = _black(tmp_path / "x.jpg")
    assert path.stat().st_size < SCAN_SIZE_BOUND / 2
    assert np.asarray(Image.open(path)).max() == 0


def test_the_scan_decodes_small_files_once_and_caches_the_verdict(crops: dict[str, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first = scan_roots([str(crops["mixed"])])
    verdicts = dict(zip((p.name for p in first.files), first.roots[0].index.verdicts.tolist()))
    assert sum(v == FLAT for v in verdicts.values()) == 12 and verdicts["v_f000004.jpg"] == FLAT
    assert verdicts["v_f000000.jpg"] == NOT_FLAT  # a small real crop: decoded, not flat
    decoded = []
    monkeypatch.setattr(dinopre.data.scan, "load_rgb", lambda path: decoded.append(path))
    again = scan_roots([str(crops["mixed"])])
    assert again.cached_roots == 1 and decoded == []
    assert again.roots[0].index.verdicts.tolist() == first.roots[0].index.verdicts.tolist()


def test_a_rescan_reuses_the_verdicts_of_unchanged_files(crops: dict[str, Path], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A resume lists the folder afresh (no cached listing) but decodes only the small files that changed."""
    folder = tmp_path / "mixed"
    shutil.copytree(crops["mixed"], folder)
    scan_roots([str(folder)])
    _black(folder / "v_f000004.jpg", colour=(9, 9, 9))  # rewritten: another size or time
    decoded = []
    real = dinopre.data.scan.load_rgb
    monkeypatch.setattr(dinopre.data.scan, "load_rgb", lambda path: decoded.append(path) or real(path))
    fresh = scan_roots([str(folder)], use_cache=False)
    assert [p.name for p in decoded] == ["v_f000004.jpg"] and fresh.cached_roots == 0
    assert (fresh.roots[0].index.verdicts == FLAT).sum() == 12


def test_large_files_are_not_decoded_at_scan_time(tmp_path: Path) -> None:
    """A flat image above the bound (here an uncompressed BMP) is left for the decoder to catch."""
    folder = tmp_path / "data"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "black.bmp")
    _black(folder / "small.jpg")
    result = scan_roots([str(folder)])
    assert result.roots[0].index.verdicts.tolist() == [NOT_CHECKED, FLAT]
    data = build_source(build_config("face", cli_settings={"train_dir": [str(folder)]}))
    assert len(data.source) == 1 and len(data.blank) == 1
    with pytest.raises(BlankImageError, match="found when decoded"):
        data.source.load(0)


def test_blanks_are_left_out_before_the_sampler_and_reported(crops: dict[str, Path]) -> None:
    data = build_source(build_config("face", cli_settings={"train_dir": [str(crops["mixed"])]}))
    assert len(data.source) == 24 and len(data.blank) == 12
    assert data.description.endswith("24 images under " + str(crops["mixed"]) + ", 12 blank crop(s) left out")
    assert any(w.startswith("12 blank crop(s) (one flat colour, e.g. '") and "--keep-blank" in w
               for w in data.warnings)
    assert {Path(path).name for path, _ in data.blank} == {f"v_f{3 * i + 1:06d}.jpg" for i in range(1, 24, 2)}
    assert {reason for _, reason in data.blank} == {SCANNED}
    kept = build_source(build_config("face", cli_settings={"train_dir": [str(crops["mixed"])], "keep_blank": True}))
    assert len(kept.source) == 36 and len(kept.blank) == 0
    assert kept.source.describe(2).endswith("v_f000004.jpg") and is_flat(kept.source.load(2))


def test_a_folder_of_only_blanks_is_a_data_error(tmp_path: Path) -> None:
    for i in range(3):
        _black(tmp_path / "data" / f"{i}.jpg")
    with pytest.raises(DataError, match="Every image under .* is a blank crop .*--keep-blank"):
        build_source(build_config("face", cli_settings={"train_dir": [str(tmp_path / "data")]}))


@pytest.mark.slow
def test_a_third_blank_trains_exactly_like_the_folder_without_them(crops: dict[str, Path], tmp_path: Path) -> None:
    """Same files, same order, same draws: the epoch losses, KoLeo included, agree to the bit; the blanks are
    listed in blank_files.json and counted at the start and the end, apart from broken files."""
    results, recorders = {}, {}
    for name in ("clean", "mixed"):
        settings = {**TINY, "train_dir": [str(crops[name])], "output_dir": str(tmp_path / name), "koleo_weight": 0.1}
        recorders[name] = Recorder()
        from dinopre.train.engine import fit

        results[name] = fit(build_config("face", cli_settings=settings), recorders[name])
    import torch

    trained_on = {name: torch.load(tmp_path / name / "checkpoint_last.pt", weights_only=True)["data"]
                  for name in results}
    for key in ("count", "names", "sizes", "mtimes"):  # the same files (named under their folder), nothing else
        assert trained_on["mixed"][key] == trained_on["clean"][key]
    assert results["mixed"].epoch_losses == results["clean"].epoch_losses
    assert results["mixed"].epoch_parts == results["clean"].epoch_parts
    assert all("koleo" in parts for parts in results["mixed"].epoch_parts)
    listed = json.loads((tmp_path / "mixed" / "blank_files.json").read_text())
    assert len(listed) == 12 and {record["reason"] for record in listed} == {SCANNED}
    assert not (tmp_path / "mixed" / "bad_files.json").exists()
    assert not (tmp_path / "clean" / "blank_files.json").exists()
    started = next(e for e in recorders["mixed"].events if isinstance(e, RunStarted))
    assert started.num_images == 24 and any("12 blank crop(s)" in w for w in started.warnings)
    finished = next(e for e in recorders["mixed"].events if isinstance(e, RunFinished))
    assert (finished.bad_files, finished.blank_files) == (0, 12)
    assert finished.blank_files_report == tmp_path / "mixed" / "blank_files.json"


def test_a_blank_met_when_decoded_is_listed_with_the_blanks_and_does_not_stop_a_strict_run(tmp_path: Path) -> None:
    from dinopre.data.demo import write_synthetic_folder
    from dinopre.train.engine import fit

    folder = tmp_path / "data"
    write_synthetic_folder(folder, "face", 15, size=48)
    Image.new("RGB", (64, 64)).save(folder / "zz_black.bmp")  # above the bound: found when decoded
    settings = {**TINY, "train_dir": [str(folder)], "output_dir": str(tmp_path / "run"), "strict_data": True,
                "epochs": 1}
    recorder = Recorder()
    fit(build_config("face", cli_settings=settings), recorder)
    listed = json.loads((tmp_path / "run" / "blank_files.json").read_text())
    assert listed == [{"file": str(folder / "zz_black.bmp"), "reason": DECODED}]
    finished = next(e for e in recorder.events if isinstance(e, RunFinished))
    assert (finished.bad_files, finished.blank_files) == (0, 1)


def test_the_probe_preview_and_attention_leave_blanks_out(tmp_path: Path) -> None:
    from dinopre.train.evaluation import scan_labelled
    from dinopre.viz.attention import collect_images

    for name in ("a", "b"):
        for i in range(4):
            noise = np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
            (tmp_path / "probe" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(noise).save(tmp_path / "probe" / name / f"{i}.png")
        _black(tmp_path / "probe" / name / "blank.jpg")
    for i in range(3):
        _black(tmp_path / "probe" / "c" / f"{i}.jpg")  # a class of blanks only: empty
    labelled = scan_labelled(tmp_path / "probe", 0, 0.25)
    assert labelled.classes == ("a", "b") and len(labelled.train_files) + len(labelled.test_files) == 8
    assert "blank.jpg" not in {p.name for p in collect_images([tmp_path / "probe"], 100)}
    with pytest.raises(DataError, match="No image"):
        collect_images([tmp_path / "probe" / "c"], 10)


def test_preview_of_a_folder_with_blanks_is_the_preview_of_the_folder_without_them(crops: dict[str, Path],
                                                                                     tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dinopre.cli import app

    pictures = {}
    for name in ("clean", "mixed"):
        pictures[name] = tmp_path / f"{name}.png"
        result = CliRunner().invoke(app, ["preview", "face", "--train-dir", str(crops[name]), "--images", "6",
                                          "--image-size", "32", "--patch-size", "8", "--local-crop-size", "16",
                                          "--num-local-crops", "2", "--cell-size", "32", "-o", str(pictures[name])])
        assert result.exit_code == 0, result.output
    assert pictures["mixed"].read_bytes() == pictures["clean"].read_bytes()


def test_old_checkpoints_continue_with_their_blanks() -> None:
    """A checkpoint written before blank detection trained on every file of its folders: it continues so (under
    `train --resume` with the same flags too, instead of being refused for a setting it never had)."""
    import dataclasses

    from test_old_checkpoints import OLD_CHECKPOINT

    from dinopre.config.settings import config_to_dict
    from dinopre.files.state import load_training_checkpoint
    from dinopre.train.resume import continued_config, saved_config

    committed = load_training_checkpoint(OLD_CHECKPOINT)
    old = config_to_dict(build_config("face", cli_settings={"train_dir": ["d"]}))
    del old["data"]["keep_blank"]
    assert saved_config({"config": old}).data.keep_blank
    demo = config_to_dict(build_config("face", demo=True))
    del demo["data"]["keep_blank"]
    assert not saved_config({"config": demo}).data.keep_blank
    requested = build_config("face", cli_settings={"train_dir": ["d"]})  # `train --resume` with the same flags
    assert continued_config(requested, dataclasses.replace(committed, config=old)).data.keep_blank
    assert not continued_config(requested, dataclasses.replace(committed, config=config_to_dict(requested))
                                ).data.keep_blank


@pytest.mark.slow
def test_a_run_from_before_blank_detection_resumes_on_its_blanks(crops: dict[str, Path], tmp_path: Path) -> None:
    """A checkpoint without `keep_blank` trained on every file: `train --resume` with the same flags continues on
    them (its fingerprint counts them) instead of refusing the folder as changed."""
    import torch

    from dinopre.train.engine import fit

    settings = {**TINY, "train_dir": [str(crops["mixed"])], "output_dir": str(tmp_path / "run"), "epochs": 1}
    fit(build_config("face", cli_settings={**settings, "keep_blank": True}), Recorder())
    path = tmp_path / "run" / "checkpoint_last.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["data"]["keep_blank"]  # as dinopre wrote it before blank crops were left out
    torch.save(state, path)
    result = fit(build_config("face", cli_settings={**settings, "epochs": 2}), Recorder(), resume_from=path)
    assert len(result.epoch_losses) == 2
    assert torch.load(path, weights_only=True)["config"]["data"]["keep_blank"] is True
