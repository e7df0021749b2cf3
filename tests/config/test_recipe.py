"""Recipes: `reference` is exactly the settings dinopre always used; `auto` derives only what the user left unset,
from the run's shape, and says why; a resumed run keeps what its recipe chose."""

from __future__ import annotations

import pytest

from dinopre.base.errors import ConfigError
from dinopre.config.loading import build_config
from dinopre.config.recipe import AUTO_RULES, REFERENCE_REASON, resolve, run_shape
from dinopre.config.settings import RECIPE_SETTINGS, setting

# The original tool's budget (the recipe issue): 2,000 images of 64 px, batch 64, 10 epochs (310 steps).
LEGACY = {"train_dir": ["d"], "epochs": 10, "batch_size": 64, "image_size": 64, "patch_size": 8, "vit_embed_dim": 128,
          "vit_depth": 4, "vit_num_heads": 4, "num_local_crops": 4, "local_crop_size": 32, "num_workers": 2}

# What dinopre resolved these settings to before recipes existed (face / hands presets on top of DINO's defaults).
BEFORE_RECIPES = {
    "face": {"drop_path_rate": 0.1, "out_dim": 8192, "head_hidden_dim": 2048, "head_bottleneck_dim": 256,
             "global_crop_scale": (0.4, 1.0), "local_crop_scale": (0.05, 0.4), "learning_rate": None,
             "warmup_epochs": 10, "freeze_last_layer_epochs": 1, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04,
             "warmup_teacher_temp_epochs": 0, "centering": "ema", "koleo_weight": 0.0,
             "teacher_momentum_base": 0.996,
             # options added with the recipes, off under `reference` as before them
             "teacher_view": "rgb", "contrast_weight": 0.0, "drloc_weight": 0.0, "zero_mean_patches": False,
             # and with --init-from: no head warm-up, no layer decay
             "head_warmup_epochs": 0.0, "layer_decay": 1.0},
}
BEFORE_RECIPES["hands"] = {**BEFORE_RECIPES["face"], "global_crop_scale": (0.5, 1.0), "local_crop_scale": (0.1, 0.5)}


@pytest.mark.parametrize("preset", ["face", "hands"])
def test_the_reference_recipe_reproduces_the_settings_from_before(preset: str) -> None:
    resolved = resolve(build_config(preset, cli_settings={**LEGACY, "recipe": "reference"}), 2000)
    assert {name: setting(resolved.config, name) for name in RECIPE_SETTINGS} == BEFORE_RECIPES[preset]
    assert resolved.notes() == []  # nothing derived to explain
    assert set(resolved.derived.values()) == {REFERENCE_REASON}


def test_auto_derives_every_unset_setting_with_a_reason() -> None:
    resolved = resolve(build_config("face", cli_settings=LEGACY), 2000)
    config = resolved.config
    assert config.method.recipe == "auto"
    assert all(setting(config, name) is not None for name in RECIPE_SETTINGS)
    assert set(AUTO_RULES) <= set(resolved.derived)
    notes = resolved.notes()
    # every rule says why, but continued pretraining's two, which keep the reference values without --init-from
    said = {note.split(" ", 1)[0] for note in notes}
    assert set(AUTO_RULES) - said == {"head_warmup_epochs", "layer_decay"}
    assert any(note.startswith(f"out_dim {config.model.out_dim} (2,000 images") for note in notes)


def test_auto_shapes_the_run_for_the_original_budget() -> None:
    """At 310 steps the reference values leave the teacher near its start and the lr in its warmup; auto does not."""
    config = resolve(build_config("face", cli_settings=LEGACY), 2000).config
    shape = run_shape(config, 2000)
    assert shape.total_steps == 310 and shape.steps_per_epoch == 31
    assert config.optim.warmup_epochs * shape.steps_per_epoch <= 0.1 * shape.total_steps  # lr warmup capped
    assert config.method.teacher_momentum_base ** 100 < 0.5  # the teacher forgets its random start
    assert config.model.out_dim <= 2048 and config.model.head_hidden_dim <= 4 * 128


def test_explicit_settings_win_over_the_recipe() -> None:
    explicit = {"out_dim": 4096, "learning_rate": 3e-4, "warmup_epochs": 2, "teacher_momentum_base": 0.999}
    resolved = resolve(build_config("face", cli_settings={**LEGACY, **explicit}), 2000)
    assert {name: setting(resolved.config, name) for name in explicit} == explicit
    assert not set(explicit) & set(resolved.derived)


def test_a_shared_patch_head_of_given_size_sizes_the_head() -> None:
    """The legacy `--patch-out-dim K` alone: the head stays shared and gets K prototypes."""
    resolved = resolve(build_config("face", cli_settings={**LEGACY, "algorithm": "ibot", "patch_out_dim": 4096}),
                       2000)
    assert resolved.config.model.out_dim == 4096 and resolved.config.resolved_patch_out_dim == 4096
    assert resolved.derived["out_dim"] == "the size of the shared patch head"


def test_auto_scales_with_the_data_and_the_budget() -> None:
    small = resolve(build_config("face", cli_settings=LEGACY), 2000).config
    large = resolve(build_config("face", cli_settings={**LEGACY, "epochs": 100}), 200_000).config
    assert large.model.out_dim > small.model.out_dim
    assert large.method.teacher_momentum_base > small.method.teacher_momentum_base
    assert large.method.teacher_momentum_base <= 0.996  # never slower than DINO's teacher


def test_one_image_per_batch_turns_koleo_off_with_a_reason_instead_of_an_error() -> None:
    """A 1-image folder under auto: before, validation blamed --koleo-weight, which the user never set."""
    resolved = resolve(build_config("face", cli_settings={**LEGACY, "batch_size": 1}), 1)
    assert resolved.config.method.koleo_weight == 0.0
    assert "koleo_weight 0 (a batch of one image has no neighbour to push away)" in resolved.notes()
    with pytest.raises(ConfigError, match="--koleo-weight needs at least 2 images per batch"):  # when it was asked
        resolve(build_config("face", cli_settings={**LEGACY, "batch_size": 1, "koleo_weight": 0.1}), 1)


def test_a_new_run_is_the_same_run_on_any_number_of_processes_unless_it_continues_an_older_one() -> None:
    config = resolve(build_config("face", cli_settings=LEGACY), 2000).config
    assert (config.method.regulariser_scope, config.model.drop_path_scope) == ("global", "sample")
    older = build_config("face", cli_settings={**LEGACY, "regulariser_scope": "process", "drop_path_scope": "process"})
    kept = resolve(older, 2000).config
    assert (kept.method.regulariser_scope, kept.model.drop_path_scope) == ("process", "process")
    assert "regulariser_scope" not in resolve(older, 2000).derived  # not a recipe choice: never shown as one
