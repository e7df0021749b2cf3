"""The `dinopre` command: help, the demo run, the config passed to the core, and every bad invocation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dinopre.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), prog_name="dinopre")


def test_help_lists_every_command_and_advises() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("train", "resume", "export", "inspect-checkpoint", "verify-backbone"):
        assert command in result.output
    train_help = invoke("train", "--help").output
    assert "--train-dir" in train_help and "--global-crop-scale" in train_help
    assert "lower --teacher-temp" in train_help  # advice for a stalled loss


def test_help_does_not_import_torch() -> None:
    code = "import sys; from dinopre.cli import app; assert 'torch' not in sys.modules and 'PIL' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_python_dash_m_runs_the_same_program() -> None:
    result = subprocess.run([sys.executable, "-m", "dinopre", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("dinopre ")


@pytest.mark.parametrize("preset", ["face", "hands"])
def test_demo_trains_and_leaves_a_run_directory(tmp_path: Path, preset: str) -> None:
    out = tmp_path / "demo"
    result = invoke("train", preset, "--demo", "--epochs", "1", "--output-dir", str(out))
    assert result.exit_code == 0, result.output
    assert f"dinopre train {preset}" in result.output  # the resolved configuration is printed
    assert "epoch 1/1 done" in result.output and "best loss" in result.output
    assert f"dinopre resume {out}" in result.output  # what to run next
    assert (out / "checkpoint_last.pt").is_file() and (out / "params.json").is_file()


def test_quiet_prints_nothing(tmp_path: Path) -> None:
    result = invoke("train", "face", "--demo", "--epochs", "1", "--quiet", "--output-dir", str(tmp_path / "q"))
    assert result.exit_code == 0
    assert result.output == ""


def test_flags_override_the_config_file_which_overrides_the_preset(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    monkeypatch.setattr("dinopre.engine.fit",
                        lambda config, reporter, overwrite=False, resume_from=None: seen.setdefault("c", config))
    config_file = tmp_path / "c.toml"
    config_file.write_text("epochs = 9\nbatch_size = 12\n[data]\nnum_local_crops = 3\n")
    result = invoke("train", "hands", "--train-dir", "a", "--train-dir", "b", "--config", str(config_file),
                    "--epochs", "4", "--global-crop-scale", "0.3", "0.9", "--no-norm-last-layer", "--device", "cpu")
    assert result.exit_code == 0, result.output
    config = seen["c"]
    assert config.optim.epochs == 4 and config.optim.batch_size == 12 and config.data.num_local_crops == 3
    assert config.data.train_dir == ("a", "b") and config.data.global_crop_scale == (0.3, 0.9)
    assert config.model.norm_last_layer is False and config.data.flip_prob == 0.0  # hands preset kept


@pytest.mark.parametrize(("args", "message"), [
    (["train", "face"], "No training data"),
    (["train", "face", "--train-dir", "{tmp}/missing"], "does not exist"),
    (["train", "face", "--train-dir", "{tmp}/empty"], "No images found"),
    (["train", "face", "--train-dir", "{tmp}/texts"], "supported extensions are"),
    (["train", "face", "--demo", "--patch-size", "7"], "does not divide --image-size"),
    (["train", "face", "--demo", "--global-crop-scale", "0.9", "0.3"], "MIN 0.9 greater than MAX 0.3"),
    (["train", "face", "--demo", "--local-crop-scale", "0.5", "0.1"], "MIN 0.5 greater than MAX 0.1"),
    (["train", "face", "--demo", "--epochs", "0"], "--epochs must be a positive integer"),
    (["train", "face", "--demo", "--batch-size", "0"], "--batch-size must be a positive integer"),
    (["train", "face", "--demo", "--batch-size", "-3"], "--batch-size must be a positive integer"),
    (["train", "face", "--demo", "--device", "cuda:7"], "--device cuda:7"),
    (["train", "face", "--demo", "--config", "{tmp}/nope.toml"], "does not exist"),
    (["train", "face", "--demo", "--batch-size", "4096"], "fewer than --batch-size 4096"),
    (["resume", "{tmp}/somewhere"], "does not exist"),
    (["resume", "{tmp}/empty"], "holds no checkpoint_last.pt"),
    (["resume", "{tmp}/texts/notes.txt"], "not a readable checkpoint"),
    (["export", "{tmp}/a.pt", "{tmp}/b.pt"], "does not exist"),
    (["export", "{tmp}/texts/notes.txt", "{tmp}/b.pt"], "not a readable checkpoint"),
    (["inspect-checkpoint", "{tmp}/a.pt"], "does not exist"),
    (["inspect-checkpoint", "{tmp}/texts/notes.txt"], "not a readable checkpoint"),
    (["verify-backbone", "{tmp}/a.pt"], "does not exist"),
    (["train", "face", "--demo", "--checkpoint-every", "-1"], "--checkpoint-every must be"),
])
def test_user_errors_exit_2_with_one_sentence(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] == "train":
        args += ["--output-dir", str(tmp_path / "out")]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1


@pytest.mark.parametrize("args", [
    ["train", "body", "--demo"],
    ["train", "face", "--demo", "--epochs", "ten"],
    ["train", "face", "--demo", "--algorithm", "mae"],
])
def test_malformed_flags_are_usage_errors(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_an_existing_run_is_refused_with_what_to_do(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert invoke("train", "face", "--demo", "--epochs", "1", "-q", "--output-dir", str(out)).exit_code == 0
    result = invoke("train", "face", "--demo", "--epochs", "1", "-q", "--output-dir", str(out))
    assert result.exit_code == 2
    assert "dinopre resume" in result.output and "--overwrite" in result.output


def test_ibot_flags_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    monkeypatch.setattr("dinopre.engine.fit",
                        lambda config, reporter, overwrite=False, resume_from=None: seen.setdefault("c", config))
    result = invoke("train", "face", "--train-dir", "d", "--algorithm", "ibot", "--no-shared-head",
                    "--patch-out-dim", "4096", "--patch-mask-ratio", "0.2", "0.4", "--mask-probability", "0.7",
                    "--mask-shape", "rand", "--patch-loss-weight", "0.5", "--teacher-patch-temp", "0.06")
    assert result.exit_code == 0, result.output
    config = seen["c"]
    assert config.method.algorithm == "ibot" and not config.model.shared_head
    assert config.resolved_patch_out_dim == 4096 and config.method.patch_mask_ratio == (0.2, 0.4)
    assert (config.method.mask_probability, config.method.mask_shape) == (0.7, "rand")
    assert (config.method.patch_loss_weight, config.method.teacher_patch_temp) == (0.5, 0.06)


def test_ibot_demo_shows_both_loss_parts(tmp_path: Path) -> None:
    result = invoke("train", "face", "--demo", "--algorithm", "ibot", "--epochs", "1",
                    "--output-dir", str(tmp_path / "i"))
    assert result.exit_code == 0, result.output
    assert " cls " in result.output and " patch " in result.output and "t-patch-temp" in result.output
