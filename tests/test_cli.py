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
    for command in ("train", "resume", "export", "inspect-checkpoint", "verify-backbone", "eval", "attention",
                    "preview", "plot"):
        assert command in result.output
    train_help = invoke("train", "--help").output
    assert "--train-dir" in train_help and "--global-crop-scale" in train_help
    assert "lower --teacher-temp" in train_help  # advice for a stalled loss


def _unwrapped(help_text: str) -> str:
    """Rendered help as one line of words: without the panels' borders and the wrapping of the 120-column terminal."""
    return " ".join(help_text.replace("│", " ").split())


def test_help_keeps_bracketed_defaults_and_install_hints() -> None:
    # Rich reads "[...]" as markup and drops it unless escaped: "Peak lr after warmup ." was what users saw.
    train_help = _unwrapped(invoke("train", "--help").output)
    assert "Peak lr after warmup [default: 5e-4 x batch / 256]." in train_help
    assert "[model] [data] [optim] [method] [run] tables" in train_help
    assert 'pip install "dinopre[tensorboard]" (or [wandb], [mlflow])' in train_help
    assert "[default: the recipe's: 0.1 under auto, 0 under reference]" in train_help
    assert "[default: 0 under both recipes: no gain measured at the original tool's budget]" in train_help
    assert 'pip install "dinopre[plots]"' in _unwrapped(invoke("plot", "--help").output)


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
    assert "epoch 1/1 done" in result.output and "best            loss " in result.output
    assert "epoch 1/1 features: RankMe" in result.output  # the label-free signals of the teacher
    assert f"dinopre resume {out}" in result.output  # what to run next
    assert (out / "checkpoint_last.pt").is_file() and (out / "params.json").is_file()


def test_quiet_prints_nothing(tmp_path: Path) -> None:
    result = invoke("train", "face", "--demo", "--epochs", "1", "--quiet", "--output-dir", str(tmp_path / "q"))
    assert result.exit_code == 0
    assert result.output == ""


def test_a_collapse_is_recorded_even_with_quiet(tmp_path: Path) -> None:
    import json

    out = tmp_path / "collapsed"
    result = invoke("train", "face", "--demo", "--epochs", "1", "--quiet", "--teacher-temp", "5",
                    "--warmup-teacher-temp", "5", "--output-dir", str(out))
    assert result.exit_code == 0 and result.output == ""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    warning = next(r for r in records if r["type"] == "warning")
    assert warning["collapse"] == "uniform" and "lower --teacher-temp" in warning["message"]


def _keeps_config(seen: dict):
    """A stand-in for `engine.fit` that keeps the configuration it is given and trains nothing."""
    def fit(config, reporter, overwrite=False, resume_from=None, inputs=(), hooks=()):
        from dinopre.train.engine import FitResult

        seen.setdefault("c", config)
        return FitResult(Path("x"), 0.0, 0, [])
    return fit


def test_flags_override_the_config_file_which_overrides_the_preset(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    monkeypatch.setattr("dinopre.train.engine.fit", _keeps_config(seen))
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
    # settings out of any sensible range: one sentence before anything is allocated
    (["train", "face", "--demo", "--seed", "-1"], "--seed must be 0 or more"),
    (["train", "face", "--demo", "--drloc-weight", "-0.5"], "--drloc-weight must be 0 (off) or positive"),
    (["train", "face", "--demo", "--seed", str(2**64)], "--seed 18446744073709551616 is beyond"),
    (["train", "face", "--demo", "--vit-mlp-ratio", "0.01"], "gives an MLP of 0 units"),
    (["train", "face", "--demo", "--vit-mlp-ratio", "inf"], "must be a finite number"),
    (["train", "face", "--demo", "--learning-rate", "1e308"], "--learning-rate 1e+308 is beyond"),
    (["train", "face", "--demo", "--warmup-epochs", "1000000000"], "--warmup-epochs 1000000000.0 is beyond"),
    (["train", "face", "--demo", "--epochs", "10000000000000"], "--epochs 10000000000000 is beyond"),
    (["train", "face", "--demo", "--image-size", "1000000000"], "--image-size 1000000000 is beyond"),
    (["train", "face", "--demo", "--config", "{tmp}/infinite.json"], "must be a finite number"),
    (["train", "face", "--demo", "--config", "{tmp}/deep.json"], "nested too deeply"),
    (["train", "face", "--demo", "--config", "{tmp}/deep.toml"], "nested too deeply"),
])
def test_user_errors_exit_2_with_one_sentence(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("x")
    (tmp_path / "infinite.json").write_text('{"learning_rate": Infinity}')
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "deep.toml").write_text("x = " + "[" * 100_000 + "]" * 100_000)
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
    monkeypatch.setattr("dinopre.train.engine.fit", _keeps_config(seen))
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


# ============ one list of flags ============

# Options of `train` that are not settings of the configuration.
TRAIN_ONLY = {"preset", "demo", "config", "resume", "overwrite", "quiet"}


def _options(command: str) -> set[str]:
    import typer

    return {param.name for param in typer.main.get_command(app).commands[command].params}


def _file_only_in_readme() -> set[str]:
    """The settings the README says only a config file reaches."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    paragraph = text.split("Settings only reachable through a file:", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"`([a-z_0-9]+)`", paragraph))


def test_train_options_settings_and_the_readme_agree() -> None:
    """Every `train` option is a setting (so it reaches the configuration, none is dropped), and every setting
    without an option is listed in the README as reachable through a config file only."""
    from dinopre.config.settings import FIELD_SECTION

    options = _options("train")
    assert options - TRAIN_ONLY <= set(FIELD_SECTION), options - TRAIN_ONLY - set(FIELD_SECTION)
    assert set(FIELD_SECTION) - options == _file_only_in_readme()


def test_resume_options_are_exactly_the_settings_a_resume_may_change() -> None:
    from dinopre.config.validation import RESUME_MAY_CHANGE

    options = _options("resume") - {"target", "quiet", "init_from"}  # hidden: --init-from is refused with a reason
    paths = {"output_dir", "export_backbone", "stream"}  # fixed by the run directory being resumed
    assert options == RESUME_MAY_CHANGE - paths


def test_every_train_option_reaches_the_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give every setting-option a non-default value on the command line: each arrives in the config."""
    from dinopre.config.settings import FIELD_SECTION

    seen = {}

    def fake_fit(config, reporter, **kwargs):
        seen["config"] = config
        from dinopre.train.engine import FitResult

        return FitResult(Path("x"), 0.0, 0, [])

    monkeypatch.setattr("dinopre.train.engine.fit", fake_fit)
    values = {"train_dir": ["d"], "num_local_crops": "3", "local_crop_size": "32", "global_crop_scale": ["0.3", "0.9"],
              "local_crop_scale": ["0.1", "0.3"], "flip_prob": "0.25", "num_workers": "3", "augment_on": "workers",
              "strict_data": None, "keep_blank": None, "image_size": "64", "patch_size": "8", "vit_embed_dim": "48",
              "vit_depth": "2",
              "vit_num_heads": "3", "vit_mlp_ratio": "2.0", "drop_path_rate": "0.05", "out_dim": "128",
              "head_hidden_dim": "96", "norm_last_layer": False, "shared_head": False, "patch_out_dim": "64",
              "zero_mean_patches": None, "init_from": "source.pth", "head_warmup_epochs": "1", "layer_decay": "0.8",
              "epochs": "3", "batch_size": "16", "learning_rate": "0.002", "min_lr": "1e-5", "warmup_epochs": "2",
              "weight_decay": "0.05", "weight_decay_end": "0.3", "clip_grad_norm": "1.5",
              "freeze_last_layer_epochs": "2", "algorithm": "ibot", "student_temp": "0.2", "teacher_temp": "0.05",
              "warmup_teacher_temp": "0.03", "warmup_teacher_temp_epochs": "2", "center_momentum": "0.8",
              "centering": "sinkhorn", "koleo_weight": "0.1", "teacher_view": "gray", "recipe": "reference",
              "contrast_weight": "0.5", "drloc_weight": "0.25",
              "teacher_momentum_base": "0.99", "teacher_momentum_final": "0.999", "patch_mask_ratio": ["0.2", "0.4"],
              "mask_probability": "0.7", "mask_shape": "rand", "patch_loss_weight": "0.5",
              "teacher_patch_temp": "0.06", "eval_dir": "probe", "eval_every": "2", "best_by": "loss",
              "output_dir": "out", "export_backbone": "bb.pt", "checkpoint_every": "5", "stream": "hand_left",
              "compile": None, "seed": "7", "device": "cpu", "precision": "fp32", "log_interval": "3",
              "logger": ["tensorboard"], "rendezvous_timeout": "60"}
    settings = _options("train") - TRAIN_ONLY
    assert settings == set(values), settings ^ set(values)  # a new option needs a value here
    args = ["train", "hands"]
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            args.append(flag)
        elif value is False:
            args.append("--no-" + name.replace("_", "-"))
        else:
            args += [flag, *value] if isinstance(value, list) else [flag, value]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    config = seen["config"]
    defaults = build_default("hands")
    for name in values:
        section = FIELD_SECTION[name]
        assert getattr(getattr(config, section), name) != getattr(getattr(defaults, section), name), name


def build_default(preset: str):
    from dinopre.config.loading import build_config

    return build_config(preset, cli_settings={"train_dir": ["elsewhere"]})
