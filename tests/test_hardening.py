"""What unlucky or hostile input does: every run ends by itself (no hang), nothing the user had is overwritten, a
run's folder has one live writer, and damaged inputs are one sentence. Each test failed before the fix it covers.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image
from typer.testing import CliRunner

from dinopre.base.errors import ConfigError, RunDirError
from dinopre.base.events import NullReporter
from dinopre.cli import app
from dinopre.config.loading import build_config
from dinopre.train.engine import fit

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _settings(folder: Path, out: Path, **extra: object) -> dict:
    return {**TINY, "train_dir": [str(folder)], "output_dir": str(out), **extra}


def _run_python(code: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


# ============ no hangs ============


def test_an_unexpected_error_with_live_workers_ends_the_process(face_folder: Path, tmp_path: Path) -> None:
    """A failure in the trainer while data workers run (which ignore SIGTERM) used to hang the process at exit;
    now the workers are killed and the error comes out."""
    code = f"""
        import dinopre.train.engine as engine
        from dinopre.config.loading import build_config
        from dinopre.base.events import NullReporter

        calls = {{"n": 0}}
        original = engine.train_step
        def failing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("boom in the trainer")
            return original(*args, **kwargs)
        engine.train_step = failing
        settings = {dict(_settings(face_folder, tmp_path / 'run', num_workers=2))!r}
        engine.fit(build_config("face", cli_settings=settings), NullReporter())
    """
    started = time.monotonic()
    result = _run_python(code, timeout=120)
    assert result.returncode != 0 and "boom in the trainer" in result.stderr
    assert time.monotonic() - started < 100


def test_a_fifo_named_like_an_image_is_skipped_and_reported(face_folder: Path, tmp_path: Path) -> None:
    """Reading a FIFO blocks forever; the scan leaves it out and says so."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(face_folder, data)
    os.mkfifo(data / "signer_a" / "stuck.jpg")
    result = runner.invoke(app, ["train", "face", "--train-dir", str(data), "--output-dir", str(tmp_path / "run"),
                                 "--config", str(_tiny_file(tmp_path)), "--epochs", "1", "--num-workers", "1"])
    assert result.exit_code == 0, result.output
    assert "not regular files and are left out" in result.output and "stuck.jpg" in result.output


def _tiny_file(folder: Path) -> Path:
    path = folder / "tiny.json"
    path.write_text(json.dumps({k: v for k, v in TINY.items() if k not in ("epochs", "num_workers")}))
    return path


# ============ one live writer per run folder ============


def _hold(folder: Path) -> subprocess.Popen:
    """Another process that holds the run folder's lock until killed."""
    code = f"""
        import sys, time
        from pathlib import Path
        from dinopre.files.rundir import RunDirectory
        held = RunDirectory(Path({str(folder)!r}))
        held.lock()
        print("locked", flush=True)
        time.sleep(600)
    """
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    return holder


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, face_folder: Path) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    fit(build_config("face", cli_settings=_settings(face_folder, out, epochs=1)), NullReporter())
    return out


def test_a_live_run_folder_refuses_a_second_writer_until_its_holder_dies(finished_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    holder = _hold(run)
    try:
        refused = runner.invoke(app, ["resume", str(run), "--epochs", "2"])
        assert refused.exit_code == 2
        assert f"process {holder.pid} on {os.uname().nodename}" in refused.output
        assert "is in use by a live run" in refused.output
    finally:
        holder.kill()  # kill -9: the kernel drops the lock, nothing stale remains
        holder.wait()
    accepted = runner.invoke(app, ["resume", str(run), "--epochs", "2", "--quiet"])
    assert accepted.exit_code == 0, accepted.output


def test_exporting_a_live_run_leaves_its_folder_alone(finished_run: Path, tmp_path: Path) -> None:
    """Export used to 'prepare' the run folder (deleting the trainer's temporary checkpoint) and rewrite
    artifacts.json behind the trainer's back."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    in_progress = run / ".checkpoint_last.pt.tmp-99999"  # what a trainer writes while it saves
    in_progress.write_bytes(b"half a checkpoint")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".dinopre.lock"}
    holder = _hold(run)
    try:
        result = runner.invoke(app, ["export", str(run / "checkpoint_last.pt"), str(tmp_path / "bb.pt")])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 0, result.output
    assert "still training" in result.output
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.name != ".dinopre.lock"}
    assert after == before  # nothing in the live folder changed
    # once the run has ended, an export is recorded in its artifacts.json
    again = runner.invoke(app, ["export", str(run / "checkpoint_last.pt"), str(tmp_path / "bb2.pt")])
    assert again.exit_code == 0 and "still training" not in again.output
    assert any(name.endswith("bb2.pt") for name in json.loads((run / "artifacts.json").read_text()))


# ============ writes that fail ============


def test_a_full_disk_inside_torch_save_is_the_disk_full_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """torch.save turns a failed write into a RuntimeError; the cause is reported, not a traceback."""
    import builtins

    from dinopre.files.checkpoint import atomic_save

    real_open = builtins.open

    class Full:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 200_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    def full_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return Full(handle) if "w" in mode and "b" in mode and ".tmp-" in str(path) else handle

    monkeypatch.setattr(builtins, "open", full_open)
    target = tmp_path / "big.pt"
    target.write_bytes(b"previous")
    with pytest.raises(RunDirError, match="the disk is full"):
        atomic_save({"weights": torch.zeros(1_000_000)}, target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["big.pt"]


# ============ data folders ============


def test_file_names_that_are_not_utf8_train_and_are_reported_printably(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(8):
        name = os.fsdecode(b"caf\xe9_%d.png" % i)
        noise = np.random.default_rng(i).integers(0, 64, (40, 40, 3))  # not one flat colour: not a blank crop
        Image.fromarray((noise + (20 * i, 100, 150)).astype(np.uint8), "RGB").save(data / name)
    (data / os.fsdecode(b"bro\xefken.png")).write_bytes(b"not an image")
    result = fit(build_config("face", cli_settings=_settings(data, tmp_path / "run", epochs=1)), NullReporter())
    assert result.epoch_losses
    report = json.loads((tmp_path / "run" / "bad_files.json").read_text(encoding="utf-8"))
    assert report[0]["file"].endswith("bro\ufffdken.png")  # printable, the odd byte shown as U+FFFD


def test_thin_images_of_both_orientations_in_one_batch_stay_small() -> None:
    """A 1 x 65000 and a 65000 x 1 image used to pad the batch to 65000 x 65000 (50 GB); their views are still
    rendered from the right part of each image."""
    from dinopre.data.augment import ColorJitterSettings, MultiCropAugmentation
    from dinopre.data.batch_augment import BatchAugmentation, source_cap
    from dinopre.data.dataset import MultiCropDataset, SyntheticSource, collate_crops

    class Thin(SyntheticSource):
        def load(self, index: int) -> Image.Image:
            size = (1, 65000) if index == 0 else (65000, 1)
            return Image.new("RGB", size, (200, 30, 30) if index == 0 else (30, 30, 200))

    augmentation = MultiCropAugmentation(global_size=32, local_size=16, num_local_crops=2, global_scale=(0.4, 1.0),
                                         local_scale=(0.05, 0.4), jitter=ColorJitterSettings(prob=0.0),
                                         grayscale_prob=0.0)
    dataset = MultiCropDataset(Thin("face", 2), augmentation, 0, source_cap=source_cap(32))
    batch = collate_crops([dataset[(0, 0)], dataset[(0, 1)]])
    assert batch.images.numel() <= 2 * 3 * 4 * 65000  # within 4 x the largest image, not 65000^2
    global_views = batch.render(BatchAugmentation(augmentation)).global_crops
    red, blue = global_views[0].mean(dim=(1, 2)), global_views[1].mean(dim=(1, 2))
    assert red[0] > red[2] and blue[2] > blue[0]  # each view still shows its own image


@pytest.mark.parametrize("error", [TypeError("bad tile"), NotImplementedError("codec"), KeyError("marker"),
                                   MemoryError(), ZeroDivisionError()])
def test_any_decoder_failure_is_that_files_problem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  error: Exception) -> None:
    from PIL import ImageFile

    from dinopre.data.images import BadImageError, load_rgb

    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(path)

    def fail(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)
    with pytest.raises(BadImageError, match="decod"):
        load_rgb(path)


def test_resume_notices_images_rewritten_in_place(face_folder: Path, tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    shutil.copytree(face_folder, data)
    out = tmp_path / "run"
    fit(build_config("face", cli_settings=_settings(data, out, epochs=1)), NullReporter())
    victim = sorted((data / "signer_a").iterdir())[0]
    stamp = victim.stat()
    os.utime(victim, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))  # touched: same name and size
    touched = runner.invoke(app, ["resume", str(out), "--epochs", "2"])
    assert touched.exit_code == 0, touched.output
    assert "other modification times" in touched.output
    noise = np.random.default_rng(0).integers(0, 256, (77, 77, 3), dtype=np.uint8)  # not blank: still trained on
    Image.fromarray(noise, "RGB").save(victim, format="JPEG")  # rewritten: another size
    rewritten = runner.invoke(app, ["resume", str(out), "--epochs", "3"])
    assert rewritten.exit_code == 2 and "have another size since the checkpoint" in rewritten.output


def test_train_resume_takes_a_folder_given_as_an_absolute_path(face_folder: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(face_folder.parent)
    relative = face_folder.name
    out = tmp_path / "run"
    fit(build_config("face", cli_settings=_settings(Path(relative), out, epochs=1)), NullReporter())
    config = build_config("face", cli_settings=_settings(face_folder.resolve(), out, epochs=2))
    result = fit(config, NullReporter(), resume_from=out)
    assert len(result.epoch_losses) == 2
    other = tmp_path / "elsewhere"
    other.mkdir()
    with pytest.raises(ConfigError, match="train_dir: checkpoint"):
        fit(build_config("face", cli_settings=_settings(other, out, epochs=3)), NullReporter(), resume_from=out)


def test_a_runs_params_json_is_a_config_file(finished_run: Path, tmp_path: Path) -> None:
    """The README says a past run's settings can be reused: `--config RUN/params.json`."""
    from dinopre.config.loading import read_config_file

    settings = read_config_file(finished_run / "params.json")
    assert settings["vit_embed_dim"] == TINY["vit_embed_dim"] and settings["preset"] == "face"
    config = build_config("face", file_settings=settings, cli_settings={"output_dir": str(tmp_path / "again")})
    assert config.model.vit_depth == TINY["vit_depth"]


# ============ messages ============


def test_a_shape_mismatch_is_not_cut_mid_word(finished_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    state = torch.load(run / "checkpoint_last.pt", weights_only=True)
    state["student"] = {k: torch.zeros(v.numel() + 1) for k, v in state["student"].items()}
    torch.save(state, run / "checkpoint_last.pt")
    result = runner.invoke(app, ["resume", str(run), "--epochs", "2"])
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "does not fit the model" in message
    inner = message[message.index("(") + 1:message.rindex(")")]
    assert inner.endswith(("...", ".")) and not inner.endswith(" ..")


def test_ctrl_c_after_checkpoints_names_them(finished_run: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A second Ctrl-C used to say 'nothing was saved' after checkpoints had been written."""
    import shutil

    import dinopre.train.engine as engine

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    original = engine._end_epoch

    def interrupted(run_state, epoch, seconds):
        original(run_state, epoch, seconds)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_end_epoch", interrupted)
    result = runner.invoke(app, ["resume", str(run), "--epochs", "3"])
    assert result.exit_code == 130
    assert "nothing was saved" not in result.output
    assert "the last one (step" in result.output and f"dinopre resume {run}" in result.output
