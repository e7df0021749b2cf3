"""Faults injected into real runs (README "Data, interruptions and failures"): broken data, signals, kill -9 at
random moments, a full disk, unwritable folders, hostile or damaged checkpoints, risky settings, and bad invocations
of every command.

Runs use tiny models (conftest `TINY`) through `engine.fit`, the Typer app in-process, or the installed `dinopre`
console script in a subprocess of its own process group where a real process and real signals are needed.
Every test points `DINOPRE_CACHE_DIR` at a temporary folder.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY
from helpers import Recorder, face_config
from PIL import Image
from typer.testing import CliRunner

from dinopre.base.errors import DataError, RunDirError
from dinopre.base.events import RunFinished
from dinopre.cli import app
from dinopre.config.loading import build_config
from dinopre.config.recipe import resolve
from dinopre.config.validation import advisories
from dinopre.data.dataset import MAX_FALLBACKS
from dinopre.files.checkpoint import KIND_TRAINING
from dinopre.train.engine import fit

REPO = Path(__file__).resolve().parents[1]
DINOPRE = str(Path(sys.executable).parent / "dinopre")
runner = CliRunner()


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep every scan of this module away from the user's index cache."""
    folder = tmp_path / "scan-cache"
    monkeypatch.setenv("DINOPRE_CACHE_DIR", str(folder))
    return folder


def invoke(*args: str | Path) -> Any:
    return runner.invoke(app, [str(a) for a in args], prog_name="dinopre")


def _one_error_line(output: str) -> str:
    """The output of a user error: exactly one line, starting with 'Error:', and no traceback."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    return errors[0]


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(NO_COLOR="1", DINOPRE_CACHE_DIR=str(cache))
    return env


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _tmp_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob(".*tmp*"))


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config file that shrinks the demo set to 128 images (4 steps of 32 per epoch) so processes stay short."""
    path = tmp_path_factory.mktemp("cfg") / "small_demo.toml"
    path.write_text("demo_images = 128\n")
    return path


@pytest.fixture(scope="module")
def tiny_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The conftest TINY settings as a --config file (for settings that have no flag, e.g. head_bottleneck_dim)."""
    path = tmp_path_factory.mktemp("cfg") / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path


# ============ broken and odd files in a real training folder ============


def _png_claiming(width: int, height: int) -> bytes:
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (8, 8), 7).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _write_odd_files(folder: Path) -> list[Path]:
    """Valid images in unusual modes and sizes: all must train, none may be listed as bad."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    gradient = np.repeat(np.linspace(0, 65535, 48).astype(np.uint16)[None, :], 48, axis=0)
    Image.fromarray(gradient).save(folder / "gray16.png")
    rgba = rng.integers(0, 256, (48, 48, 4), dtype=np.uint8)
    rgba[:, :24, 3] = 0
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    # CMYK, 4 x 4 and 1 x 300: each of two colours, since an image of one flat colour is a blank crop, left out
    cmyk = Image.new("CMYK", (48, 48), (10, 200, 150, 20))
    cmyk.paste((200, 10, 150, 20), (0, 0, 24, 48))
    cmyk.save(folder / "cmyk.jpg")
    palette = Image.fromarray(rng.integers(0, 16, (48, 48), dtype=np.uint8), "P")
    palette.putpalette(list(rng.integers(0, 256, 768)))
    palette.save(folder / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), "RGB").save(folder / "rotated.jpg",
                                                                                  exif=exif.tobytes())
    tiny = Image.new("RGB", (4, 4), (200, 30, 30))
    tiny.putpixel((0, 0), (30, 30, 200))
    tiny.save(folder / "tiny4x4.png")
    strip = Image.new("RGB", (1, 300), (30, 200, 30))
    strip.paste((200, 30, 30), (0, 0, 1, 150))
    strip.save(folder / "strip1x300.png")
    Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8), "L").save(folder / "GRAY.JPG")
    return sorted(folder.iterdir())


def _write_broken_files(folder: Path) -> list[Path]:
    """Files that cannot be decoded, one of each kind a real dataset collects."""
    import io

    folder.mkdir(parents=True)
    noise = np.random.default_rng(6).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg, png = io.BytesIO(), io.BytesIO()
    Image.fromarray(noise, "RGB").save(jpeg, "JPEG")
    Image.fromarray(noise, "RGB").save(png, "PNG")
    contents = {
        "empty.jpg": b"",
        "random.png": bytes(np.random.default_rng(7).integers(0, 256, 3000, dtype=np.uint8)),
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
        "truncated.png": png.getvalue()[: len(png.getvalue()) // 2],
        "notes.tiff": b"not an image, just notes\n" * 10,
        "page.JPEG": b"<html><body>403 Forbidden</body></html>",
        "bomb.png": _png_claiming(20000, 20000),
        "header.bmp": b"BM" + bytes(40),
    }
    for name, content in contents.items():
        (folder / name).write_bytes(content)
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """32 good face JPEGs + 8 odd-but-valid images + 8 broken files = 48 = 6 batches of 8, so every file is visited
    in every epoch."""
    from dinopre.data.demo import write_synthetic_folder

    root = tmp_path_factory.mktemp("mixed")
    write_synthetic_folder(root / "good", "face", 32, size=48)
    odd = _write_odd_files(root / "odd")
    broken = _write_broken_files(root / "broken")
    return {"root": root, "odd": odd, "broken": broken}


def test_a_folder_with_broken_and_odd_files_trains_and_lists_exactly_the_broken_ones(
        mixed_folder: dict[str, Any], tmp_path: Path) -> None:
    """Training completes; bad_files.json lists exactly the 8 broken files with reasons, no odd-but-valid one; the
    RunFinished count matches; a second run (loading in a worker process) gives bit-identical teacher weights."""
    runs = {}
    for name, workers in (("a", 0), ("b", 1)):
        out = tmp_path / name
        recorder = Recorder()
        result = fit(face_config(TINY, mixed_folder["root"], output_dir=str(out), num_workers=workers), recorder)
        assert len(result.epoch_losses) == 2 and all(np.isfinite(result.epoch_losses))
        runs[name] = (recorder, _load(out / "checkpoint_last.pt"), json.loads((out / "bad_files.json").read_text()))

    recorder, state, report = runs["a"]
    listed = {record["file"]: record["reason"] for record in report}
    assert set(listed) == {str(p) for p in mixed_folder["broken"]}
    assert all(reason and "\n" not in reason for reason in listed.values())
    assert "decompression bomb" in listed[str(mixed_folder["root"] / "broken" / "bomb.png")]
    assert not set(listed) & {str(p) for p in mixed_folder["odd"]}
    finished = [e for e in recorder.events if isinstance(e, RunFinished)]
    assert len(finished) == 1 and finished[0].bad_files == len(mixed_folder["broken"])
    assert finished[0].bad_files_report == tmp_path / "a" / "bad_files.json"
    assert state["epoch"] == 2

    _, state_b, report_b = runs["b"]
    assert report_b == report
    assert all(torch.equal(state["teacher"][k], state_b["teacher"][k]) for k in state["teacher"])
    assert state["epoch_losses"] == state_b["epoch_losses"]


def test_strict_data_stops_at_a_broken_file_and_names_it(mixed_folder: dict[str, Any], tmp_path: Path) -> None:
    """With strict_data the run raises DataError naming one of the broken files and what to do."""
    with pytest.raises(DataError) as info:
        fit(face_config(TINY, mixed_folder["root"], output_dir=str(tmp_path / "run"), strict_data=True), Recorder())
    message = str(info.value)
    assert any(f"'{p}' cannot be used (" in message for p in mixed_folder["broken"]), message
    assert "drop --strict-data" in message
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()


def test_strict_data_through_the_cli_exits_2_with_one_error_line(mixed_folder: dict[str, Any], tmp_path: Path,
                                                                  tiny_json: Path) -> None:
    """`dinopre train face --train-dir D --strict-data` exits 2 with one `Error:` line naming a broken file."""
    result = invoke("train", "face", "--train-dir", mixed_folder["root"], "--config", tiny_json, "--strict-data",
                    "-q", "--output-dir", tmp_path / "run")
    assert result.exit_code == 2, result.output
    line = _one_error_line(result.output)
    assert any(str(p) in line for p in mixed_folder["broken"]), line
    assert result.output.strip() == line


def test_a_folder_of_only_broken_files_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    """A folder where every one of 120 files is broken stops at the first batch with 'looks broken'."""
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(MAX_FALLBACKS + 20):
        (folder / f"img_{i:03d}.jpg").write_bytes(b"" if i % 2 else b"\xff\xd8 not really")
    with pytest.raises(DataError, match="the training folder looks broken"):
        fit(face_config(TINY, folder, output_dir=str(tmp_path / "run")), Recorder())
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()


def test_a_small_folder_of_only_broken_files_is_also_an_error(tmp_path: Path) -> None:
    """Eight broken files (one batch) must not train a model on blank placeholder images, and the error does not
    claim that more files failed than there are."""
    folder = tmp_path / "junk"
    folder.mkdir()
    for i in range(8):
        (folder / f"img_{i}.png").write_bytes(b"")
    with pytest.raises(DataError, match="the training folder looks broken") as info:
        fit(face_config(TINY, folder, output_dir=str(tmp_path / "run")), Recorder())
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()
    assert "100 files" not in str(info.value), str(info.value)


def test_one_corrupted_subfolder_does_not_kill_a_mostly_good_run(tmp_path: Path, face_folder: Path) -> None:
    """112 good crops plus one sub-folder of 104 truncated files (contiguous in scan order) trains to the end and
    lists the 104 files."""
    folder = tmp_path / "data"
    for copy in range(2):
        shutil.copytree(face_folder, folder / f"good{copy}")
    (folder / "good2").mkdir()
    for path in sorted((face_folder / "signer_a").iterdir())[:16]:
        shutil.copy(path, folder / "good2" / path.name)
    (folder / "copy_failed").mkdir()
    for i in range(104):
        (folder / "copy_failed" / f"crop_{i:03d}.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(20))
    result = fit(face_config(TINY, folder, output_dir=str(tmp_path / "run"), epochs=1), Recorder())
    assert len(result.epoch_losses) == 1
    assert len(json.loads((tmp_path / "run" / "bad_files.json").read_text())) == 104


# ============ signals in a real process ============


def _start(args: list[str | Path], cache: Path, log: Path | None = None) -> subprocess.Popen:
    """Start the dinopre console script in its own process group (signals to the group never reach pytest)."""
    out = open(log, "w") if log is not None else subprocess.PIPE  # noqa: SIM115 - closed with the process
    return subprocess.Popen([DINOPRE, *map(str, args)], stdout=out, stderr=subprocess.STDOUT if log else out,
                            text=True, start_new_session=True, env=_env(cache))


def _wait_until(condition: Callable[[], bool], process: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            output = process.communicate()[0] if process.stdout else ""
            raise AssertionError(f"the process ended ({process.returncode}) before {what}: {output}")
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns


@pytest.mark.slow
def test_sigterm_and_sigint_save_exit_with_shell_codes_and_resume(tmp_path: Path, small_demo: Path,
                                                                  private_cache: Path) -> None:
    """SIGTERM mid-run: exit 143, stderr says `dinopre resume X`, the checkpoint loads (weights_only) at a step that
    may be mid-epoch. Resume, then Ctrl-C to the process group (workers too): exit 130, clean save, no traceback.
    A final `dinopre resume X --epochs N` finishes with exit 0."""
    run = tmp_path / "X"
    last = run / "checkpoint_last.pt"
    steps_per_epoch = 128 // 32
    process = _start(["train", "face", "--demo", "--config", small_demo, "--epochs", "50", "--output-dir", run, "-q",
                      "--num-workers", "1", "--checkpoint-every", "0"], private_cache)
    _wait_until(last.exists, process, 120, "the first epoch's checkpoint")
    time.sleep(0.25)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert f"dinopre resume {run}" in stderr and "Stopped by SIGTERM" in stderr and "Traceback" not in stderr
    state = _load(last)
    assert state["global_step"] >= steps_per_epoch and 0 <= state["step_in_epoch"] < steps_per_epoch
    assert state["global_step"] == state["epoch"] * steps_per_epoch + state["step_in_epoch"]
    assert _tmp_files(run) == []

    before = _file_id(last)
    process = _start(["resume", run, "-q"], private_cache)
    _wait_until(lambda: _file_id(last) != before, process, 120, "a checkpoint of the resumed run")
    time.sleep(0.25)
    os.killpg(process.pid, signal.SIGINT)  # like Ctrl-C in a terminal: the trainer and its loader worker
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and f"dinopre resume {run}" in stderr and "SIGINT" in stderr
    resumed = _load(last)
    assert resumed["global_step"] > state["global_step"] and _tmp_files(run) == []
    assert resumed["global_step"] == resumed["epoch"] * steps_per_epoch + resumed["step_in_epoch"]

    final_epochs = resumed["epoch"] + 1
    done = subprocess.run([DINOPRE, "resume", str(run), "--epochs", str(final_epochs), "-q"], capture_output=True,
                          text=True, timeout=120, env=_env(private_cache))
    assert done.returncode == 0, done.stderr
    final = _load(last)
    assert final["epoch"] == final_epochs and final["step_in_epoch"] == 0 and len(final["epoch_losses"]) == final_epochs


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt before the training loop (e.g. while scanning) exits 130 with one Error line."""
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("dinopre.train.engine.fit", interrupted)
    result = invoke("train", "face", "--demo", "-q", "--output-dir", tmp_path / "run")
    assert result.exit_code == 130
    _one_error_line(result.output)


def test_ctrl_c_before_any_checkpoint_does_not_promise_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted before the first checkpoint, the message must not tell the user to resume a run that has none."""
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("dinopre.train.engine.fit", interrupted)
    result = invoke("train", "face", "--demo", "-q", "--output-dir", tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()
    assert "holds the last checkpoint" not in result.output and "RUN_DIR" not in result.output, result.output


# A process that sends itself a signal at a chosen moment after the last step: while the final checkpoint is
# written (`save` at the end of the last epoch) or while the backbone is exported; then it runs `dinopre ARGS`.
_SIGNAL_AFTER_THE_END = """
import os, signal, sys
import dinopre.train.engine as engine
signum, moment = getattr(signal, sys.argv[1]), sys.argv[2]
original = getattr(engine, moment)

def signalled(run, *args, **kwargs):
    if moment == "export" or (not kwargs["mid_epoch"] and run.epoch == run.config.optim.epochs):
        os.kill(os.getpid(), signum)
    return original(run, *args, **kwargs)

setattr(engine, moment, signalled)
from dinopre.cli import main
sys.argv = ["dinopre", *sys.argv[3:]]
main()
"""


@pytest.mark.parametrize(("signame", "moment"), [("SIGTERM", "save"), ("SIGINT", "export")],
                         ids=["sigterm-final-checkpoint", "sigint-export"])
def test_a_signal_after_the_last_step_lets_the_run_complete_with_exit_0(tmp_path: Path, small_demo: Path,
                                                                        private_cache: Path, signame: str,
                                                                        moment: str) -> None:
    """The run is complete once its last step is done: a scheduler's SIGTERM (or a Ctrl-C) while the final
    checkpoint or the export is written must not make it a stopped run (143 / 130, requeued by the README's SLURM
    script). It finishes writing, prints its summary and one line about the signal, and exits 0."""
    from processes import TINY_RUN, clean_env

    run, export = tmp_path / "run", tmp_path / "backbone.pt"
    tiny = [flag for flag in TINY_RUN if flag != "--quiet"]  # the summary is part of what is checked
    done = subprocess.run([sys.executable, "-c", _SIGNAL_AFTER_THE_END, signame, moment, "train", "face", *tiny,
                           "--config", str(small_demo), "--epochs", "1", "--output-dir", str(run),
                           "--export-backbone", str(export)],
                          capture_output=True, text=True, timeout=240, start_new_session=True,
                          env=clean_env(NO_COLOR="1", DINOPRE_CACHE_DIR=str(private_cache)))
    assert done.returncode == 0, done.stderr
    assert f"{signame} arrived after the last step and was ignored: the run is complete" in done.stderr
    assert "Traceback" not in done.stderr and "Stopped by" not in done.stderr
    assert f"backbone        {export}" in done.stdout  # the normal summary
    state = _load(run / "checkpoint_last.pt")
    assert state["epoch"] == 1 and state["step_in_epoch"] == 0 and export.is_file()
    assert json.loads(export.with_suffix(".json").read_text())["epoch"] == 1


# ============ kill -9 at random moments ============


@pytest.mark.slow
def test_sigkill_at_random_moments_never_breaks_the_checkpoint_or_resume(tmp_path: Path, small_demo: Path,
                                                                        private_cache: Path) -> None:
    """12 seeded SIGKILLs of the whole process group: half 0.5-3 s after launch (start-up, run-dir preparation),
    half 0-1.5 s after the process reached its training loop (steps, checkpoint writes every 2 steps). After each
    kill checkpoint_last.pt (if any) loads with weights_only=True and is consistent, and the next `dinopre resume`
    (or a fresh `train` when no checkpoint exists yet) never fails, even with half-written temporary files next to
    the checkpoint. A run that reaches its end starts the next round; the last one is resumed to completion and
    its checkpoint's epoch equals the planned epochs, with each epoch logged once."""
    rng = random.Random(20240607)
    planned, steps_per_epoch = 4, 128 // 32
    round_index = 0
    run = tmp_path / "run0"
    finished_rounds: list[int] = []

    def command(run_dir: Path) -> list[str | Path]:
        if (run_dir / "checkpoint_last.pt").exists():
            return ["resume", run_dir, "-q"]
        return ["train", "face", "--demo", "--config", small_demo, "--epochs", str(planned), "--checkpoint-every",
                "2", "--num-workers", "0", "-q", "--output-dir", run_dir]

    def complete(run_dir: Path) -> bool:
        path = run_dir / "checkpoint_last.pt"
        return path.exists() and _load(path)["epoch"] == planned

    for kill in range(12):
        if complete(run):  # this round's run got to its end between kills: start another one
            finished_rounds.append(round_index)
            round_index += 1
            run = tmp_path / f"run{round_index}"
        log = tmp_path / f"kill{kill}.log"
        params_before = _file_id(run / "params.json")
        process = _start(command(run), private_cache, log)
        if kill % 2:
            _wait_until(lambda: _file_id(run / "params.json") not in (None, params_before), process, 120,
                        "the training loop")
            delay = rng.uniform(0.0, 1.5)
        else:
            delay = rng.uniform(0.5, 3.0)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        if process.returncode != -signal.SIGKILL:
            assert process.returncode == 0, log.read_text()  # it finished before the kill: fine, never an error
        if (run / "checkpoint_last.pt").exists():
            state = _load(run / "checkpoint_last.pt")
            assert state["kind"] == KIND_TRAINING
            assert state["global_step"] == state["epoch"] * steps_per_epoch + state["step_in_epoch"]
        if (run / "checkpoint_best.pt").exists():
            _load(run / "checkpoint_best.pt")
        if run.is_dir():  # what a kill in the middle of a write leaves; the next start must not mind
            (run / f".checkpoint_last.pt.tmp-{900000 + kill}").write_bytes(b"PK\x03\x04 half a checkpoint")
            (run / f".metrics.jsonl.tmp-{900000 + kill}").write_text('{"type": "step", "ep')

    if not complete(run):
        final = subprocess.run([DINOPRE, *map(str, command(run))], capture_output=True, text=True, timeout=120,
                               env=_env(private_cache))
        assert final.returncode == 0, final.stderr
        assert _tmp_files(run) == []  # the leftovers of killed writes were cleaned up
    state = _load(run / "checkpoint_last.pt")
    assert state["epoch"] == planned and state["step_in_epoch"] == 0
    assert state["global_step"] == planned * steps_per_epoch and len(state["epoch_losses"]) == planned
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == list(range(1, planned + 1))  # no duplicates


# ============ a full disk, unwritable folders ============


def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one(
        face_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC half-way through the 2nd epoch's checkpoint write: RunDirError in one sentence naming the file and 'No
    space left'; checkpoint_last.pt (and best) still hold epoch 1 and load; no temporary file is left; the run
    resumes once space is freed."""
    import dinopre.files.checkpoint

    real_save = torch.save
    calls = {"n": 0}

    def save_until_the_disk_fills(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] >= 2:
            handle.write(b"\x00" * 4096)  # part of the file reached the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(dinopre.files.checkpoint.torch, "save", save_until_the_disk_fills)
    run = tmp_path / "run"
    with pytest.raises(RunDirError) as info:
        fit(face_config(TINY, face_folder, output_dir=str(run)), Recorder())
    message = str(info.value)
    # epoch 2 writes checkpoint_best.pt first when it is the best so far, else checkpoint_last.pt
    assert any(f"'{run / name}'" in message for name in ("checkpoint_last.pt", "checkpoint_best.pt")), message
    assert "the disk is full" in message
    assert "\n" not in message and message.endswith(".")
    state = _load(run / "checkpoint_last.pt")
    assert state["epoch"] == 1 and state["step_in_epoch"] == 0
    assert _load(run / "checkpoint_best.pt")["epoch"] == 1
    assert _tmp_files(run) == []

    monkeypatch.setattr(dinopre.files.checkpoint.torch, "save", real_save)  # space was freed
    fit(face_config(TINY, face_folder, output_dir=str(run)), Recorder(), resume_from=run)
    assert _load(run / "checkpoint_last.pt")["epoch"] == 2


class _TornWriter:
    """A file whose write stores half the text, then fails with ENOSPC (a full disk mid-append)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def __enter__(self) -> _TornWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()

    def write(self, text: str) -> int:
        self.handle.write(text[: len(text) // 2])
        self.handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fill_disk_on_metrics_append(monkeypatch: pytest.MonkeyPatch, failing_call: int) -> None:
    import builtins

    import dinopre.files.rundir

    real_open = builtins.open
    calls = {"n": 0}

    def open_metrics(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = real_open(file, mode, *args, **kwargs)
        if Path(file).name == "metrics.jsonl" and "a" in mode:
            calls["n"] += 1
            if calls["n"] == failing_call:
                return _TornWriter(handle)
        return handle

    monkeypatch.setattr(dinopre.files.rundir, "open", open_metrics, raising=False)


def test_disk_full_while_logging_is_a_run_dir_error(face_folder: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC while appending to metrics.jsonl in epoch 2 stops the run with a RunDirError naming the file."""
    _fill_disk_on_metrics_append(monkeypatch, failing_call=5)  # epoch 1 logs steps 2, 4, 6 and its epoch record
    run = tmp_path / "run"
    with pytest.raises(RunDirError, match=r"metrics\.jsonl.*the disk is full"):
        fit(face_config(TINY, face_folder, output_dir=str(run)), Recorder())
    assert _load(run / "checkpoint_last.pt")["epoch"] == 1


def test_resume_after_a_torn_metrics_line(face_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After the disk filled up mid-append (half a JSON line left on disk) and space was freed, the run resumes
    and metrics.jsonl holds only whole records, each epoch once."""
    _fill_disk_on_metrics_append(monkeypatch, failing_call=5)
    run = tmp_path / "run"
    with pytest.raises(RunDirError):
        fit(face_config(TINY, face_folder, output_dir=str(run)), Recorder())
    monkeypatch.undo()
    monkeypatch.setenv("DINOPRE_CACHE_DIR", str(tmp_path / "scan-cache"))
    fit(face_config(TINY, face_folder, output_dir=str(run)), Recorder(), resume_from=run)
    assert _load(run / "checkpoint_last.pt")["epoch"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2]


def test_leftover_temporary_files_of_a_killed_write_are_ignored_and_removed(face_folder: Path,
                                                                            tmp_path: Path) -> None:
    """Half-written `.checkpoint_last.pt.tmp-PID` / `.metrics.jsonl.tmp-PID` files (a kill -9 mid-write) neither
    break a resume nor pile up: the resumed run removes them."""
    run = tmp_path / "run"
    fit(face_config(TINY, face_folder, output_dir=str(run), epochs=1), Recorder())
    (run / ".checkpoint_last.pt.tmp-99999").write_bytes((run / "checkpoint_last.pt").read_bytes()[:2000])
    (run / ".checkpoint_best.pt.tmp-99999").write_bytes(b"")
    (run / ".metrics.jsonl.tmp-99999").write_text('{"type": "st')
    fit(face_config(TINY, face_folder, output_dir=str(run), epochs=2), Recorder(), resume_from=run)
    assert _load(run / "checkpoint_last.pt")["epoch"] == 2
    assert _tmp_files(run) == []


def test_an_unwritable_output_folder_is_refused_before_training(face_folder: Path, tmp_path: Path) -> None:
    """chmod 500 on the parent of --output-dir: RunDirError before any step (skipped where root writes anyway)."""
    parent = tmp_path / "readonly"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        if os.access(parent, os.W_OK):
            pytest.skip("running as a user (root) whom chmod 500 does not stop from writing")
        with pytest.raises(RunDirError, match="Cannot write to output folder"):
            fit(face_config(TINY, face_folder, output_dir=str(parent / "run")), Recorder())
        result = invoke("train", "face", "--demo", "-q", "--output-dir", parent / "run")
        assert result.exit_code == 2 and "Cannot write to output folder" in _one_error_line(result.output)
    finally:
        parent.chmod(0o755)


def test_an_output_folder_under_a_file_is_refused_before_training(face_folder: Path, tmp_path: Path) -> None:
    """--output-dir below a regular file (cannot be created, also as root): RunDirError naming the folder."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    recorder = Recorder()
    with pytest.raises(RunDirError) as info:
        fit(face_config(TINY, face_folder, output_dir=str(blocker / "run")), recorder)
    assert str(info.value) == (f"Cannot write to output folder '{blocker / 'run'}': Not a directory; choose another "
                               "--output-dir.")
    assert not any(type(e).__name__ == "StepLogged" for e in recorder.events)  # refused before any step


def test_an_unwritable_export_path_is_a_user_error(tmp_path: Path, small_demo: Path) -> None:
    """`train --export-backbone FILE/backbone.pt` (parent is a file) ends with exit 2 and one Error line."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = invoke("train", "face", "--demo", "--config", small_demo, "--epochs", "1", "-q", "--output-dir",
                    tmp_path / "run", "--export-backbone", blocker / "backbone.pt")
    assert result.exit_code == 2, (result.output, result.exception)
    assert str(blocker) in _one_error_line(result.output)


# ============ hostile and damaged checkpoints ============


class _Payload:
    """Pickles as a call to os.mkdir(marker): what a checkpoint crafted to run code would do on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (str(self.marker),)


def _hostile_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"kind": KIND_TRAINING, "format_version": 1, "config": {}, "epoch": 0, "student": _Payload(marker),
                "teacher": {"w": torch.zeros(2)}}, path)
    return path


@pytest.fixture(scope="module")
def trained_run(face_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished 1-epoch tiny run on the conftest faces, and its exported backbone."""
    from dinopre.files.export import export_checkpoint

    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DINOPRE_CACHE_DIR", str(root / "scan-cache"))
        fit(face_config(TINY, face_folder, output_dir=str(root / "run"), epochs=1), Recorder())
    backbone, *_ = export_checkpoint(root / "run" / "checkpoint_last.pt", root / "backbone.pt")
    return {"run": root / "run", "checkpoint": root / "run" / "checkpoint_last.pt", "backbone": backbone}


def test_a_checkpoint_crafted_to_run_code_is_refused_and_nothing_runs(tmp_path: Path,
                                                                      trained_run: dict[str, Path]) -> None:
    """A torch.save'd file whose unpickling would create a folder is refused by resume, export and inspect (exit 2,
    'refused'), and the folder never appears; the same file loaded unsafely does run the payload (control)."""
    control_marker = tmp_path / "control_ran"
    control = _hostile_checkpoint(tmp_path / "control.pt", control_marker)
    torch.load(control, weights_only=False)
    assert control_marker.is_dir()  # the payload is real

    marker = tmp_path / "payload_ran"
    (tmp_path / "hostile").mkdir()
    hostile = _hostile_checkpoint(tmp_path / "hostile" / "checkpoint_last.pt", marker)
    for args in (["resume", hostile, "--epochs", "3"], ["resume", hostile.parent], ["export", hostile,
                 tmp_path / "out.pt"], ["inspect-checkpoint", hostile]):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "nothing in it was run" in _one_error_line(result.output) or "without running" in result.output
        assert not marker.exists(), args
    assert not (tmp_path / "out.pt").exists()
    verify = invoke("verify-backbone", hostile)
    assert verify.exit_code == 1 and "FAIL loads strictly" in verify.output and not marker.exists()


def test_a_checkpoint_crafted_to_run_code_is_called_unsafe_not_corrupt(tmp_path: Path) -> None:
    """The refusal tells the user the file holds code-running objects (only load trusted files), not that it is
    truncated."""
    hostile = _hostile_checkpoint(tmp_path / "hostile.pt", tmp_path / "payload_ran")
    result = invoke("inspect-checkpoint", hostile)
    assert result.exit_code == 2 and not (tmp_path / "payload_ran").exists()
    assert "refused without running them" in _one_error_line(result.output), result.output


def _edited_checkpoint(source: Path, target_dir: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    target_dir.mkdir()
    state = _load(source)
    edit(state)
    torch.save(state, target_dir / "checkpoint_last.pt")
    return target_dir / "checkpoint_last.pt"


def _drop_key(state: dict[str, Any]) -> None:
    del state["student"]["backbone.norm.weight"]


def _change_shape(state: dict[str, Any]) -> None:
    state["student"]["backbone.pos_embed"] = torch.zeros(1, 3, 32)


@pytest.mark.parametrize(("edit", "named"), [(_drop_key, "backbone.norm.weight"),
                                             (_change_shape, "backbone.pos_embed")], ids=["missing-key", "shape"])
def test_a_checkpoint_of_another_architecture_is_refused(tmp_path: Path, trained_run: dict[str, Path],
                                                         edit: Callable[[dict[str, Any]], None], named: str) -> None:
    """A real checkpoint whose student weights no longer fit its config: `dinopre resume` exits 2 naming the
    parameter, writes nothing into the folder."""
    path = _edited_checkpoint(trained_run["checkpoint"], tmp_path / "edited", edit)
    result = invoke("resume", path, "--epochs", "2")
    assert result.exit_code == 2, result.output
    line = _one_error_line(result.output)
    assert "does not fit the model" in line and named in result.output
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint_last.pt"]


def test_a_checkpoint_of_another_architecture_gives_a_one_line_error(tmp_path: Path,
                                                                     trained_run: dict[str, Path]) -> None:
    """The refusal of a mismatched checkpoint is one line of output."""
    path = _edited_checkpoint(trained_run["checkpoint"], tmp_path / "edited", _drop_key)
    result = invoke("resume", path, "--epochs", "2", "-q")
    assert len(result.output.strip().splitlines()) == 1, result.output


def _truncated_checkpoint(run: Path, tmp: Path) -> Path:
    (tmp / "c.pt").write_bytes((run / "checkpoint_last.pt").read_bytes()[:5000])
    return tmp / "c.pt"


def _empty_file(run: Path, tmp: Path) -> Path:
    (tmp / "c.pt").write_bytes(b"")
    return tmp / "c.pt"


def _backbone_export(run: Path, tmp: Path) -> Path:
    return run.parent / "backbone.pt"


@pytest.mark.parametrize(("make", "message"), [
    (_truncated_checkpoint,
     "is not a readable checkpoint (truncated, corrupt or not written by torch.save); nothing in it was run."),
    (_empty_file, "is empty (0 bytes)"),
    (_backbone_export, "is not a dinopre training checkpoint."),
], ids=["truncated", "empty", "backbone-export"])
def test_damaged_or_wrong_files_given_to_resume_are_one_sentence_errors(
        tmp_path: Path, trained_run: dict[str, Path], make: Callable[[Path, Path], Path], message: str) -> None:
    """A truncated checkpoint, an empty file and a backbone export given to `dinopre resume` exit 2 with one line."""
    path = make(trained_run["run"], tmp_path)
    result = invoke("resume", path, "--epochs", "2")
    assert result.exit_code == 2, result.output
    assert message in _one_error_line(result.output) and result.output.strip().count("\n") == 0


# ============ risky settings ============


BASE = {"train_dir": ["d"]}


def _advise(preset: str, settings: dict[str, Any], images: int, demo: bool = False) -> list[str]:
    """The advisories a run of these settings on `images` images starts with (its recipe resolved)."""
    resolved = resolve(build_config(preset, demo=demo, cli_settings=settings), images)
    return advisories(resolved.config, images, set(resolved.derived))


@pytest.mark.parametrize("preset", ["face", "hands"])
@pytest.mark.parametrize("recipe", ["auto", "reference"])
def test_preset_defaults_give_no_advisories(preset: str, recipe: str) -> None:
    """The face and hands presets as shipped, on 50k images, warn about nothing; nor does the demo."""
    assert _advise(preset, {**BASE, "recipe": recipe}, 50_000) == []
    assert _advise(preset, {"recipe": recipe}, 512, demo=True) == []


@pytest.mark.parametrize(("preset", "settings", "images", "expected"), [
    ("face", {"teacher_temp": 0.1}, 50_000, "--teacher-temp 0.1 is above 0.07"),
    ("face", {"out_dim": 65536}, 5_000, "65536 prototypes for 5000 images"),
    ("face", {"epochs": 10, "warmup_epochs": 10}, 50_000, "--warmup-epochs 10 is not below --epochs 10"),
    ("face", {"epochs": 5, "warmup_epochs": 10}, 50_000, "--warmup-epochs 10 is not below --epochs 5"),
    ("hands", {"flip_prob": 0.5}, 50_000, "Horizontal flips turn right hands into left hands"),
    ("face", {"freeze_last_layer_epochs": 0}, 50_000, "--freeze-last-layer-epochs 0"),
    ("face", {"learning_rate": 0.5}, 50_000, "over 20 times DINO's"),
], ids=["teacher-temp", "out-dim", "warmup-equal", "warmup-above", "hands-flip", "no-freeze", "huge-lr"])
def test_each_risky_setting_gives_exactly_its_advisory(preset: str, settings: dict[str, Any], images: int,
                                                       expected: str) -> None:
    """One risky change from the preset defaults gives exactly one advisory, the one about it."""
    notes = _advise(preset, {**BASE, **settings}, images)
    assert len(notes) == 1 and expected in notes[0], notes


def test_out_dim_advisory_depends_on_the_dataset_size() -> None:
    """65536 prototypes are fine for 200k images, flagged for 5k."""
    settings = {**BASE, "out_dim": 65536}
    assert _advise("face", settings, 200_000) == [] and len(_advise("face", settings, 5_000)) == 1


def test_advisories_are_printed_when_a_demo_run_starts(tmp_path: Path, small_demo: Path) -> None:
    """`dinopre train face --demo --teacher-temp 0.1` prints the warning (and only it) and still trains."""
    result = invoke("train", "face", "--demo", "--config", small_demo, "--epochs", "2", "--teacher-temp", "0.1",
                    "--output-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --teacher-temp 0.1 is above 0.07, which DINO's authors found unstable; 0.04-0.07 "
                        "is the tested range."], result.output


# ============ bad invocations of every command ============


@pytest.fixture
def cli_files(tmp_path: Path, trained_run: dict[str, Path], face_folder: Path) -> dict[str, str]:
    """Placeholders for the invocation table: a copy of the trained run, its export, and damaged files."""
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run)
    files = {"tmp": tmp_path, "run": run, "ckpt": run / "checkpoint_last.pt", "backbone": trained_run["backbone"],
             "faces": face_folder, "empty": tmp_path / "empty.pt", "truncated": tmp_path / "truncated.pt",
             "tensor": tmp_path / "tensor.pt", "foreign": tmp_path / "foreign.pt", "existing": tmp_path / "exists.pt",
             "file": tmp_path / "a_file", "hostile": tmp_path / "hostile.pt"}
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(files["ckpt"].read_bytes()[:3000])
    torch.save(torch.zeros(3), files["tensor"])
    torch.save({"weights": torch.zeros(3), "note": "someone else's file"}, files["foreign"])
    files["existing"].write_bytes(b"keep me")
    files["file"].write_text("x")
    _hostile_checkpoint(files["hostile"], tmp_path / "payload_ran")
    configs = {
        "bad_toml": ("c.toml", "epochs = [1,\n"),
        "bad_json": ("c.json", "{\"epochs\": 3,}"),
        "list_json": ("l.json", "[1, 2]"),
        "typo_toml": ("typo.toml", "epoch = 3\n"),
        "type_toml": ("type.toml", "epochs = \"ten\"\n"),
        "section_toml": ("section.toml", "[model]\nepochs = 3\n"),
        "hands_toml": ("hands.toml", "preset = \"hands\"\n"),
        "yaml": ("c.yaml", "epochs: 3\n"),
    }
    for key, (name, text) in configs.items():
        (tmp_path / name).write_text(text)
        files[key] = tmp_path / name
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00\x01 not text")
    files["binary_toml"] = tmp_path / "binary.toml"
    files.update(_schema_breakers(files["ckpt"], tmp_path))
    files.update(_hostile_backbones(files["backbone"], tmp_path))
    (tmp_path / "settings.json").write_text(json.dumps({"epochs": 1}))
    files["settings"] = tmp_path / "settings.json"
    os.mkfifo(tmp_path / "fifo.pt")
    files["fifo"] = tmp_path / "fifo.pt"
    return {k: str(v) for k, v in files.items()}


def _schema_breakers(checkpoint: Path, folder: Path) -> dict[str, Path]:
    """Training checkpoints holding only plain values, each wrong in one part of its schema."""
    edits: dict[str, Callable[[dict[str, Any]], None]] = {
        "ck_version_type": lambda s: s.update(format_version="1"),
        "ck_no_config": lambda s: s.pop("config"),
        "ck_bad_config": lambda s: s.update(config={"model": 5}),
        "ck_center_shape": lambda s: s["loss"].update(center=torch.zeros(3)),
        "ck_center_width": lambda s: s["loss"].update(center=torch.zeros(1, 3)),
        "ck_rng_shape": lambda s: s["rng"].update(torch=torch.zeros(10, dtype=torch.uint8)),
        "ck_data_list": lambda s: s.update(data=[1, 2]),
        "ck_best_string": lambda s: s.update(best_loss="low"),
        "ck_negative_step": lambda s: s.update(step_in_epoch=-1),
        "ck_student_list": lambda s: s.update(student=[1, 2]),
    }
    return _edited_copies(checkpoint, folder, edits)


def _hostile_backbones(backbone: Path, folder: Path) -> dict[str, Path]:
    """Small exports whose metadata lies about the ViT, or whose weights are not weights."""
    edits: dict[str, Callable[[dict[str, Any]], None]] = {
        "bb_wide": lambda b: b["metadata"]["backbone"].update(embed_dim=8192),
        "bb_patch0": lambda b: b["metadata"]["backbone"].update(patch_size=0),
        "bb_heads0": lambda b: b["metadata"]["backbone"].update(num_heads=0),
        "bb_ratio_nan": lambda b: b["metadata"]["backbone"].update(mlp_ratio=float("nan")),
        "bb_model5": lambda b: b.update(model=5),
        "bb_no_backbone": lambda b: b["metadata"].pop("backbone"),
    }
    return _edited_copies(backbone, folder, edits)


def _edited_copies(source: Path, folder: Path, edits: dict[str, Callable[[Any], Any]]) -> dict[str, Path]:
    """One copy of `source` per edit, saved as folder/NAME.pt with that edit applied to the loaded object."""
    out = {}
    for name, edit in edits.items():
        obj = _load(source)
        edit(obj)
        out[name] = folder / f"{name}.pt"
        torch.save(obj, out[name])
    return out


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")

# (arguments, exit code, text the output must contain, kind): "error" = one `Error:` line and nothing else,
# "usage" = the parser's usage message, "report" = verify-backbone's PASS/FAIL lines.
INVOCATIONS = [
    # train
    pytest.param(["train", "face", "--demo", "--device", "cuda"], 2, "no usable CUDA GPU", "error", marks=NO_CUDA,
                 id="train-device-cuda"),
    pytest.param(["train", "face", "--demo", "--device", "tpu"], 2, "--device must be auto, cpu, cuda", "error",
                 id="train-device-tpu"),
    pytest.param(["train", "face", "--demo", "--config", "{bad_toml}"], 2, "is not valid TOML", "error",
                 id="train-config-toml-syntax"),
    pytest.param(["train", "face", "--demo", "--config", "{bad_json}"], 2, "is not valid JSON", "error",
                 id="train-config-json-syntax"),
    pytest.param(["train", "face", "--demo", "--config", "{list_json}"], 2, "must hold a table of settings", "error",
                 id="train-config-list"),
    pytest.param(["train", "face", "--demo", "--config", "{typo_toml}"], 2, "Did you mean 'epochs'?", "error",
                 id="train-config-typo"),
    pytest.param(["train", "face", "--demo", "--config", "{type_toml}"], 2, "Setting 'epochs' must be",
                 "error", id="train-config-wrong-type"),
    pytest.param(["train", "face", "--demo", "--config", "{section_toml}"], 2, "Unknown setting 'model.epochs'",
                 "error", id="train-config-wrong-section"),
    pytest.param(["train", "face", "--demo", "--config", "{hands_toml}"], 2, "is for preset 'hands'", "error",
                 id="train-config-other-preset"),
    pytest.param(["train", "face", "--demo", "--config", "{yaml}"], 2, "must end in .toml or .json", "error",
                 id="train-config-yaml"),
    pytest.param(["train", "face", "--demo", "--config", "{tmp}"], 2, "does not exist", "error",
                 id="train-config-directory"),
    pytest.param(["train", "face", "--demo", "--config", "{binary_toml}"], 2, "cannot be read as UTF-8 text", "error",
                 id="train-config-binary"),
    pytest.param(["train", "face", "--train-dir", "{file}"], 2, "is not a folder", "error", id="train-dir-is-file"),
    pytest.param(["train", "face", "--demo", "--output-dir", "{file}/run"], 2, "Cannot write to output folder",
                 "error", id="train-output-under-file"),
    pytest.param(["train", "face", "--demo", "--resume", "{tmp}/missing.pt"], 2, "does not exist", "error",
                 id="train-resume-missing"),
    pytest.param(["train", "face", "--train-dir", "{faces}", "--resume", "{ckpt}"], 2,
                 "with different settings (", "error", id="train-resume-other-settings"),
    pytest.param(["train", "face", "--demo", "--num-workers", "-1"], 2, "--num-workers must be 0 or more", "error",
                 id="train-negative-workers"),
    pytest.param(["train", "face", "--demo", "--teacher-temp", "0"], 2, "--teacher-temp must be positive", "error",
                 id="train-zero-temp"),
    pytest.param(["train", "face", "--demo", "--flip-prob", "1.5"], 2, "is a probability in [0, 1]", "error",
                 id="train-flip-prob"),
    pytest.param(["train", "face", "--demo", "--no-such-flag"], 2, "No such option: --no-such-flag", "usage",
                 id="train-unknown-flag"),
    pytest.param(["train", "face", "--demo", "--precision", "fp16"], 2, "fp16", "usage", id="train-precision-fp16"),
    pytest.param(["train", "face", "--demo", "--augment-on", "gpu"], 2, "gpu", "usage", id="train-augment-on-gpu"),
    pytest.param(["train"], 2, "Missing argument", "usage", id="train-no-preset"),
    # resume
    pytest.param(["resume", "{run}", "--epochs", "0"], 2, "--epochs must be a positive integer", "error",
                 id="resume-epochs-0"),
    pytest.param(["resume", "{run}", "--epochs", "2", "--device", "cuda"], 2, "no usable CUDA GPU", "error",
                 marks=NO_CUDA, id="resume-device-cuda"),
    pytest.param(["resume", "{run}", "--epochs", "2", "--num-workers", "-2"], 2, "--num-workers must be 0 or more",
                 "error", id="resume-negative-workers"),
    pytest.param(["resume", "{backbone}"], 2, "is not a dinopre training checkpoint", "error",
                 id="resume-backbone"),
    pytest.param(["resume", "{foreign}"], 2, "is not a dinopre training checkpoint", "error", id="resume-foreign"),
    pytest.param(["resume", "{tensor}"], 2, "is not a dinopre file (it holds a Tensor)", "error",
                 id="resume-tensor"),
    pytest.param(["resume", "{hostile}"], 2, "{hostile}", "error", id="resume-hostile"),
    pytest.param(["resume", "{run}", "--epochs", "many"], 2, "'--epochs'", "usage", id="resume-epochs-word"),
    pytest.param(["resume"], 2, "Missing argument", "usage", id="resume-no-target"),
    # export
    pytest.param(["export", "{ckpt}", "{tmp}/out.pt", "--format", "bogus"], 2, "bogus", "usage",
                 id="export-format-bogus"),
    pytest.param(["export", "{ckpt}", "{tmp}/out.pt", "--weights", "nobody"], 2, "nobody", "usage",
                 id="export-weights-nobody"),
    pytest.param(["export", "{ckpt}", "{existing}"], 2, "already exists; pass --force", "error",
                 id="export-existing"),
    pytest.param(["export", "{backbone}", "{tmp}/out.pt"], 2, "is not a dinopre training checkpoint", "error",
                 id="export-a-backbone"),
    pytest.param(["export", "{empty}", "{tmp}/out.pt"], 2, "is empty (0 bytes)", "error", id="export-empty"),
    pytest.param(["export", "{truncated}", "{tmp}/out.pt"], 2, "not a readable checkpoint", "error",
                 id="export-truncated"),
    pytest.param(["export", "{run}", "{tmp}/out.pt"], 2, "does not exist or is not a file", "error",
                 id="export-directory"),
    pytest.param(["export", "{ckpt}", "{file}/out.pt"], 2, "a_file", "error", id="export-output-under-file"),
    # inspect-checkpoint
    pytest.param(["inspect-checkpoint", "{tmp}"], 2, "does not exist or is not a file", "error",
                 id="inspect-directory"),
    pytest.param(["inspect-checkpoint", "{empty}"], 2, "is empty (0 bytes)", "error", id="inspect-empty"),
    pytest.param(["inspect-checkpoint", "{truncated}"], 2, "not a readable checkpoint", "error",
                 id="inspect-truncated"),
    pytest.param(["inspect-checkpoint", "{tensor}"], 2, "is not a dinopre file (it holds a Tensor)", "error",
                 id="inspect-tensor"),
    pytest.param(["inspect-checkpoint", "{foreign}"], 2, "is not a backbone export", "error", id="inspect-foreign"),
    pytest.param(["inspect-checkpoint", "{hostile}"], 2, "{hostile}", "error", id="inspect-hostile"),
    pytest.param(["inspect-checkpoint", "{ckpt}", "--yaml"], 2, "No such option: --yaml", "usage",
                 id="inspect-unknown-flag"),
    # verify-backbone
    pytest.param(["verify-backbone", "{ckpt}"], 1, "is a training checkpoint, not a backbone", "report",
                 id="verify-training-checkpoint"),
    pytest.param(["verify-backbone", "{foreign}"], 1, "FAIL loads strictly", "report", id="verify-foreign"),
    pytest.param(["verify-backbone", "{empty}"], 1, "FAIL loads strictly", "report", id="verify-empty"),
    pytest.param(["verify-backbone", "{backbone}", "--checkpoint", "{tmp}/missing.pt"], 2,
                 "does not exist or is not a file", "error", id="verify-missing-checkpoint"),
    pytest.param(["verify-backbone", "{backbone}", "--checkpoint", "{backbone}"], 1,
                 "FAIL same features as the checkpoint", "report", id="verify-checkpoint-is-backbone"),
    pytest.param(["verify-backbone", "{tmp}"], 2, "does not exist or is not a file", "error", id="verify-directory"),
    pytest.param(["verify-backbone", "{backbone}", "--image-size", "-8"], 2, "--image-size", "error",
                 id="verify-negative-size"),
    pytest.param(["verify-backbone", "{backbone}", "--image-size", "0"], 2, "--image-size", "error",
                 id="verify-zero-size"),
    pytest.param(["verify-backbone", "{backbone}", "--image-size", "1"], 2, "--image-size", "error",
                 id="verify-size-below-a-patch"),
    pytest.param(["verify-backbone", "{backbone}", "--image-size", "big"], 2, "'--image-size'", "usage",
                 id="verify-size-word"),
    # the program itself
    pytest.param(["fine-tune", "face"], 2, "No such command 'fine-tune'", "usage", id="unknown-command"),
    # hostile training checkpoints (plain values, each wrong in one place): one sentence from every reader
    *[pytest.param([command, "{" + name + "}", *extra], 2, text, "error", id=f"{command}-{name}")
      for name, text in (("ck_version_type", "format_version is not an integer"), ("ck_no_config", "has no config"),
                         ("ck_bad_config", "holds a configuration this dinopre cannot use"),
                         ("ck_center_shape", "loss center 'center' has the shape (3,)"),
                         ("ck_rng_shape", "generator state has the wrong shape"),
                         ("ck_data_list", "its data is not the fingerprint of its training images"),
                         ("ck_best_string", "best_loss is not a number"),
                         ("ck_negative_step", "step_in_epoch of 0 or more"),
                         ("ck_student_list", "student is not the student's weights"))
      for command, extra in (("resume", ["--epochs", "3"]), ("export", ["{tmp}/x.pt"]), ("inspect-checkpoint", []))],
    pytest.param(["resume", "{ck_center_width}", "--epochs", "3"], 2, "loss center 'center' has the shape (1, 3)",
                 "error", id="resume-center-of-another-width"),
    # hostile backbones: refused before anything is built from their numbers
    *[pytest.param(["verify-backbone", "{" + name + "}"], 1, text, "report", id=f"verify-{name}")
      for name, text in (("bb_wide", "cls_token has the shape (1, 1, 32) instead of (1, 1, 8192)"),
                         ("bb_patch0", "patch_size is 0"),
                         ("bb_heads0", "num_heads is 0"), ("bb_ratio_nan", "mlp_ratio is nan"),
                         ("bb_model5", "weights are not a mapping"), ("bb_no_backbone", "no backbone metadata"))],
    *[pytest.param(["inspect-checkpoint", "{" + name + "}"], 2, text, "error", id=f"inspect-{name}")
      for name, text in (("bb_wide", "do not match the ViT its metadata describes"), ("bb_heads0", "num_heads is 0"),
                         ("bb_model5", "weights are not a mapping"))],
    # outputs that must not be written, whatever --force says
    pytest.param(["export", "{ckpt}", "{ckpt}", "--force"], 2, "is the file being read", "error",
                 id="export-over-its-checkpoint"),
    pytest.param(["export", "{ckpt}", "{run}/params.pt", "--force"], 2, "is one of the files of the run", "error",
                 id="export-sidecar-over-params"),
    pytest.param(["export", "{ckpt}", "{tmp}/out.json"], 2, "ends in .json", "error", id="export-named-json"),
    pytest.param(["export", "{ckpt}", "{tmp}", "--force"], 2, "is a folder; give a file path", "error",
                 id="export-onto-a-folder"),
    pytest.param(["export", "{ckpt}", "{fifo}", "--force"], 2, "is not a regular file", "error",
                 id="export-onto-a-fifo"),
    pytest.param(["export", "{ckpt}", "{tmp}/settings.pt"], 2, "settings.json' already exists", "error",
                 id="export-sidecar-exists"),
    pytest.param(["train", "face", "--demo", "--config", "{settings}", "--export-backbone", "{tmp}/settings.pt",
                  "--overwrite"], 2, "is the file being read", "error", id="train-export-sidecar-over-config"),
    pytest.param(["train", "face", "--demo", "--export-backbone", "/dev/null", "--overwrite"], 2,
                 "is not a regular file", "error", id="train-export-onto-a-device"),
]


@pytest.mark.parametrize(("args", "code", "text", "kind"), INVOCATIONS)
def test_bad_invocations_exit_non_zero_without_a_traceback(cli_files: dict[str, str], args: list[str], code: int,
                                                          text: str, kind: str) -> None:
    """Every command refuses bad input with its exit code (2 user error, 1 failed verification), never a traceback;
    user errors print exactly one `Error:` line and nothing else, usage errors name the bad token."""
    args = [a.format(**cli_files) for a in args]
    if args[0] == "train" and "--output-dir" not in args:
        args += ["--output-dir", str(Path(cli_files["tmp"]) / "out")]
    result = invoke(*args)
    assert result.exit_code == code, (result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    expected = text.format(**cli_files)
    if kind == "error":
        line = _one_error_line(result.output)
        assert expected in line, line
        assert result.output.strip() == line, result.output
    elif kind == "usage":
        assert "Usage: dinopre" in result.output and expected in result.output, result.output
    else:
        assert "FAIL " in result.output and expected in " ".join(result.output.split()), result.output
        assert result.output.strip().splitlines()[-1] == "Verification failed."
    assert not Path(cli_files["tmp"], "payload_ran").exists()


LEGACY = "tools/pretrain_dino_face.py"


@pytest.mark.slow
@pytest.mark.parametrize(("args", "text"), [
    (["--train-dir", "{faces}", "--global-crop-scale", "0.5"], "argument --global-crop-scale: expected 2 arguments"),
    (["--train-dir", "{faces}", "--resume", "{tmp}/missing.pt", "--output-dir", "{tmp}/out"], "does not exist"),
    (["--train-dir", "{file}", "--output-dir", "{tmp}/out"], "is not a folder"),
], ids=["crop-scale-one-number", "resume-missing", "train-dir-is-file"])
def test_legacy_script_bad_invocations(tmp_path: Path, face_folder: Path, private_cache: Path, args: list[str],
                                       text: str) -> None:
    """`python tools/pretrain_dino_face.py` with bad input exits 2 with exactly one `Error:` line on stderr."""
    (tmp_path / "a_file").write_text("x")
    args = [a.format(faces=face_folder, tmp=tmp_path, file=tmp_path / "a_file") for a in args]
    result = subprocess.run([sys.executable, LEGACY, *args], cwd=REPO, env=_env(private_cache), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and text in lines[0], result.stderr
