"""Configuration: presets, precedence preset < file < command line, validation messages, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dinopre.base.errors import ConfigError
from dinopre.config.loading import build_config, config_from_dict, read_config_file
from dinopre.config.presets import PRESETS
from dinopre.config.settings import config_to_dict


def test_defaults_are_vit_small_patch16_for_both_presets() -> None:
    for preset in PRESETS:
        config = build_config(preset, cli_settings={"train_dir": ["x"]})
        m = config.model
        assert (m.patch_size, m.vit_embed_dim, m.vit_depth, m.vit_num_heads, m.vit_mlp_ratio) == (16, 384, 12, 6, 4.0)
        assert config.method.algorithm == "dino"


def test_presets_differ_where_documented() -> None:
    face = build_config("face", cli_settings={"train_dir": ["x"]})
    hands = build_config("hands", cli_settings={"train_dir": ["x"]})
    assert face.data.flip_prob == 0.5 and hands.data.flip_prob == 0.0  # handedness is kept for hands
    assert hands.data.global_crop_scale == (0.5, 1.0)
    assert face.run.output_dir == "work_dirs/dino_face" and hands.run.output_dir == "work_dirs/dino_hands"


def test_precedence_preset_then_file_then_command_line(tmp_path: Path) -> None:
    config_file = tmp_path / "run.toml"
    config_file.write_text('epochs = 7\nbatch_size = 16\n[model]\nout_dim = 1024\n')
    file_settings = read_config_file(config_file)
    config = build_config("face", file_settings=file_settings, cli_settings={"epochs": 3, "train_dir": ["d"]})
    assert config.optim.epochs == 3  # command line wins over the file
    assert config.optim.batch_size == 16  # the file wins over the preset
    assert config.model.out_dim == 1024
    assert config.model.image_size == PRESETS["face"]["image_size"]  # the preset wins over the defaults


def test_json_config_and_flat_or_sectioned_keys(tmp_path: Path) -> None:
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"optim": {"epochs": 5}, "teacher-temp": 0.05, "global_crop_scale": [0.3, 1]}))
    config = build_config("hands", file_settings=read_config_file(config_file), cli_settings={"train_dir": ["d"]})
    assert config.optim.epochs == 5
    assert config.method.teacher_temp == 0.05
    assert config.data.global_crop_scale == (0.3, 1.0)


def test_demo_makes_a_tiny_model_that_flags_still_override() -> None:
    config = build_config("face", demo=True, cli_settings={"epochs": 2})
    assert config.data.demo and config.model.vit_embed_dim < 384
    assert config.optim.epochs == 2
    assert not config.data.train_dir


def test_learning_rate_default_follows_the_linear_scaling_rule() -> None:
    config = build_config("face", cli_settings={"train_dir": ["d"], "batch_size": 128})
    assert config.optim.learning_rate is None
    assert config.peak_learning_rate == pytest.approx(5e-4 * 128 / 256)
    assert build_config("face", cli_settings={"train_dir": ["d"], "learning_rate": 1e-3}).peak_learning_rate == 1e-3


def test_round_trip_through_plain_dict_is_exact() -> None:
    config = build_config("hands", cli_settings={"train_dir": ["a", "b"], "local_crop_scale": (0.1, 0.3)})
    plain = config_to_dict(config)
    json.dumps(plain)  # only plain values
    assert config_from_dict(json.loads(json.dumps(plain))) == config


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"train_dir": ["d"], "epochs": 0}, "--epochs must be a positive integer"),
        ({"train_dir": ["d"], "batch_size": -4}, "--batch-size must be a positive integer"),
        ({"train_dir": ["d"], "patch_size": 15}, "does not divide --image-size"),
        ({"train_dir": ["d"], "local_crop_size": 50}, "does not divide --local-crop-size"),
        ({"train_dir": ["d"], "global_crop_scale": (0.9, 0.2)}, "MIN 0.9 greater than MAX 0.2"),
        ({"train_dir": ["d"], "local_crop_scale": (0.0, 0.2)}, "must lie in (0, 1]"),
        ({"train_dir": ["d"], "vit_num_heads": 5}, "not divisible by --vit-num-heads"),
        ({"train_dir": ["d"], "device": "gpu"}, "--device must be"),
        ({"train_dir": ["d"], "flip_prob": 1.5}, "probability"),
        ({"train_dir": ["d"], "teacher_temp": 0}, "--teacher-temp must be positive"),
        ({}, "No training data"),
        ({"train_dir": ["d"], "epochs": "ten"}, "Setting 'epochs' must be an integer"),
        ({"train_dir": ["d"], "learning_rate": "abc"}, "Setting 'learning_rate' must be a number"),
        ({"train_dir": ["d"], "num_workers": "4"}, "Setting 'num_workers' must be an integer"),
        ({"train_dir": ["d"], "global_crop_scale": ["a", "b"]}, "Setting 'global_crop_scale' must be a number"),
        ({"train_dir": ["d"], "global_crop_scale": [0.2, 0.5, 0.9]}, "takes 2 values"),
        ({"train_dir": ["d"], "export_backbone": 5}, "Setting 'export_backbone' must be a string"),
        ({"train_dir": ["d"], "norm_last_layer": "yes"}, "must be true or false"),
    ],
)
def test_invalid_settings_give_one_clear_sentence(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        build_config("face", cli_settings=settings)
    assert message in str(info.value)
    assert str(info.value).endswith(".")


def test_unknown_keys_in_a_file_are_refused_with_a_suggestion(tmp_path: Path) -> None:
    config_file = tmp_path / "bad.toml"
    config_file.write_text("epoch = 3\n")
    with pytest.raises(ConfigError, match="Did you mean 'epochs'"):
        read_config_file(config_file)
    config_file.write_text("[model]\nepochs = 3\n")  # a real key in the wrong section
    with pytest.raises(ConfigError, match="Unknown setting 'model.epochs'"):
        read_config_file(config_file)


@pytest.mark.parametrize(("name", "text", "message"), [
    ("missing.toml", None, "does not exist"),
    ("bad.toml", "epochs = = 3", "not valid TOML"),
    ("bad.json", "{", "not valid JSON"),
    ("list.json", "[1, 2]", "must hold a table"),
    ("run.yaml", "epochs: 3", "must end in .toml or .json"),
])
def test_unreadable_config_files(tmp_path: Path, name: str, text: str | None, message: str) -> None:
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_config_file(path)


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(ConfigError, match="choose one of: face, hands"):
        build_config("body", cli_settings={"train_dir": ["d"]})


def test_ibot_settings_are_validated() -> None:
    config = build_config("face", cli_settings={"train_dir": ["d"], "algorithm": "ibot"})
    assert config.method.patch_mask_ratio == (0.1, 0.5) and config.method.mask_probability == 0.5
    assert config.model.shared_head and config.resolved_patch_out_dim == config.model.out_dim
    separate = build_config("face", cli_settings={"train_dir": ["d"], "algorithm": "ibot", "shared_head": False,
                                                   "patch_out_dim": 1024})
    assert separate.resolved_patch_out_dim == 1024
    bad = [
        ({"patch_out_dim": 1024, "out_dim": 8192}, "pass --no-shared-head"),
        ({"patch_mask_ratio": (0.6, 0.2)}, "--patch-mask-ratio takes MIN MAX"),
        ({"patch_mask_ratio": (0.1, 1.0)}, "--patch-mask-ratio takes MIN MAX"),
        ({"mask_probability": 1.5}, "--mask-probability must be in [0, 1]"),
        ({"mask_shape": "circle"}, "--mask-shape must be block or rand"),
        ({"augment_on": "gpu"}, "--augment-on must be one of device, workers"),
        ({"teacher_patch_temp": 0.0}, "--teacher-patch-temp must be positive"),
    ]
    for settings, message in bad:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            build_config("face", cli_settings={"train_dir": ["d"], "algorithm": "ibot", **settings})
