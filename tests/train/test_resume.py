"""Continuing a run: settings that shape its random numbers and that older checkpoints lack continue as they were."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from test_old_checkpoints import OLD_CHECKPOINT, SETTINGS
from typer.testing import CliRunner

from dinopre.base.errors import ConfigError
from dinopre.cli import app
from dinopre.config.loading import build_config
from dinopre.files.state import load_training_checkpoint
from dinopre.train.resume import continued_config, load_resume_state, saved_config


def test_a_checkpoint_from_before_the_scopes_continues_per_process(tmp_path: Path) -> None:
    """It drew drop path from each process's generator and computed KoLeo per process: so does its continuation
    (tests/test_old_checkpoints.py checks the weights bit for bit)."""
    state = load_training_checkpoint(OLD_CHECKPOINT)
    assert "regulariser_scope" not in state.config["method"] and "drop_path_scope" not in state.config["model"]
    saved = saved_config(state)
    assert (saved.method.regulariser_scope, saved.model.drop_path_scope) == ("process", "process")
    requested = build_config("face", demo=True, cli_settings={**SETTINGS, "output_dir": str(tmp_path)})
    assert requested.method.regulariser_scope is None  # unset: the checkpoint's
    load_resume_state(OLD_CHECKPOINT, requested)  # no difference to refuse
    continued = continued_config(requested, state)
    assert (continued.method.regulariser_scope, continued.model.drop_path_scope) == ("process", "process")
    other = build_config("face", demo=True, cli_settings={**SETTINGS, "output_dir": str(tmp_path),
                                                          "regulariser_scope": "global"})
    with pytest.raises(ConfigError, match="regulariser_scope: checkpoint 'process', requested 'global'"):
        load_resume_state(OLD_CHECKPOINT, other)


# ============ a finished run, output paths, params.json (issue 22) ============

# A tiny demo run of 2 steps per epoch, as `dinopre train` flags.
TINY_FLAGS = ["--demo", "--image-size", "32", "--patch-size", "8", "--vit-embed-dim", "32", "--vit-depth", "2",
              "--vit-num-heads", "2", "--num-local-crops", "2", "--local-crop-size", "16", "--out-dim", "64",
              "--head-hidden-dim", "64", "--batch-size", "8", "--num-workers", "0", "-q"]


def _dinopre(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="dinopre")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 1-epoch run started in folder A (a name with a space) with `--export-backbone b.pt`, relative."""
    root = tmp_path_factory.mktemp("finished")
    start = root / "dir A"
    start.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DINOPRE_CACHE_DIR", str(root / "cache"))
        patch.chdir(start)
        config = start / "small.toml"
        config.write_text("demo_images = 16\nhead_bottleneck_dim = 16\n")
        done = _dinopre("train", "face", *TINY_FLAGS, "--config", config, "--epochs", "1", "--output-dir",
                        "my runs/x", "--export-backbone", "b.pt")
        assert done.exit_code == 0, done.output
    return start


@pytest.fixture
def run_copy(finished: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the finished run's starting folder, and a working directory B elsewhere."""
    copy = tmp_path / "dir A"
    shutil.copytree(finished, copy)
    params = json.loads((copy / "my runs" / "x" / "params.json").read_text())
    assert params["config"]["run"]["export_backbone"] == str(finished / "b.pt")  # absolute from the start
    elsewhere = tmp_path / "dir B"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("DINOPRE_CACHE_DIR", str(tmp_path / "cache"))
    return copy


def test_resuming_a_finished_run_says_it_is_complete_and_how_to_export_it(run_copy: Path) -> None:
    """A requeued job or a "resume until done" loop ends with exit 0, and the export command pastes as printed."""
    run = run_copy / "my runs" / "x"
    for args in (["resume", run], ["resume", run, "--epochs", "1"]):
        done = _dinopre(*args)
        assert done.exit_code == 0, done.output
        assert f"'{run}' is complete: it has done all its 1 epochs." in done.output
        assert f"dinopre export '{run / 'checkpoint_best.pt'}' '{run / 'backbone.pt'}'" in done.output
        assert f"dinopre resume '{run}' --epochs N (N > 1)" in done.output
    assert _dinopre("resume", run, "-q").output == ""  # quiet: nothing but errors
    assert torch.load(run / "checkpoint_last.pt", weights_only=True)["global_step"] == 2  # nothing trained


def test_train_resume_of_a_finished_run_is_complete_too(run_copy: Path) -> None:
    run = run_copy / "my runs" / "x"
    done = _dinopre("train", "face", *TINY_FLAGS[:-1], "--config", run_copy / "small.toml", "--epochs", "1",
                    "--resume", run / "checkpoint_last.pt")
    assert done.exit_code == 0, done.output
    assert "is complete: it has done all its 1 epochs" in done.output


def test_a_resume_from_another_folder_exports_where_the_run_said(run_copy: Path, finished: Path) -> None:
    """Started in A with a relative --export-backbone, resumed in B with more epochs: the export is A's b.pt (where
    params.json said it would be, absolute since the start), none appears in B."""
    run = run_copy / "my runs" / "x"
    export = finished / "b.pt"  # the original place: the copy's checkpoint names it
    before = export.stat().st_mtime_ns
    done = _dinopre("resume", run, "--epochs", "2", "-q")
    assert done.exit_code == 0, done.output
    assert not Path("b.pt").exists() and export.stat().st_mtime_ns != before
    assert json.loads(export.with_suffix(".json").read_text())["epoch"] == 2
    assert torch.load(run / "checkpoint_last.pt", weights_only=True)["config"]["run"]["export_backbone"] == str(export)


def test_a_hand_edited_params_json_is_named_once_and_rewritten(run_copy: Path) -> None:
    """The checkpoint wins: one warning names the edited settings, and params.json says the checkpoint's again."""
    run = run_copy / "my runs" / "x"
    path = run / "params.json"
    params = json.loads(path.read_text())
    original = params["config"]["optim"]["learning_rate"]
    params["config"]["optim"]["learning_rate"] = 0.5
    params["config"]["model"]["vit_depth"] = 12
    path.write_text(json.dumps(params))
    done = _dinopre("resume", run, "--epochs", "2")
    assert done.exit_code == 0, done.output
    warnings = [line for line in done.output.splitlines() if "params.json differs" in line]
    assert len(warnings) == 1, done.output
    assert "params.json differs from the checkpoint in vit_depth, learning_rate (edited by hand?)" in warnings[0]
    rewritten = json.loads(path.read_text())["config"]
    assert rewritten["optim"]["learning_rate"] == original and rewritten["model"]["vit_depth"] == 2
    again = _dinopre("resume", run, "--epochs", "3")
    assert again.exit_code == 0 and "params.json differs" not in again.output  # once: it agrees again
