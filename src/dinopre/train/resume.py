"""Continuing a run: finding its checkpoint, the configuration it continues with, and the checks that the
requested run may continue it (same settings but the few a resume may change, epochs left to do).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dinopre.base.errors import CheckpointError, ConfigError, RunComplete
from dinopre.base.hints import export_command, resume_command
from dinopre.config.loading import config_from_dict
from dinopre.config.recipe import NEW_RUN_SCOPES
from dinopre.config.settings import RECIPE_SETTINGS, SECTIONS, PretrainConfig, config_to_dict, setting, with_settings
from dinopre.config.validation import RESUME_MAY_CHANGE, config_differences
from dinopre.data.pipeline import absolute_roots
from dinopre.files.rundir import RunDirectory
from dinopre.files.state import TrainingState, load_training_checkpoint


def find_checkpoint(target: str | Path) -> Path:
    """The checkpoint to resume: the file itself, or `checkpoint_last.pt` of a run directory.

    Raises:
        CheckpointError: nothing to resume at `target`.
    """
    target = Path(target)
    if target.is_dir():
        candidate = target / RunDirectory(target).last.name
        if not candidate.is_file():
            raise CheckpointError(f"'{target}' holds no checkpoint_last.pt; give a run directory of dinopre train "
                                  "or the path of a checkpoint.")
        return candidate
    if not target.exists():
        raise CheckpointError(f"'{target}' does not exist; give a run directory or a checkpoint file.")
    return target


def saved_config(state: TrainingState | dict[str, Any]) -> PretrainConfig:
    """The configuration a training checkpoint (typed, or its contents as a dict) was written with.

    Checkpoints written before `--augment-on` existed rendered their views in the data workers; they carry no
    `augment_on` and continue that way (the new default would change how views are resampled mid-run). Those
    written before recipes existed used the reference values, which they hold, and continue with `reference`. Those
    written before the scopes existed computed KoLeo and the contrastive loss per process and drew drop path from
    each process's generator, and continue so (`process`). Those written before blank crops were left out trained
    on every file of their folders and continue with `keep_blank`.
    """
    saved = state.config if isinstance(state, TrainingState) else state["config"]
    settings = {key: dict(value) if isinstance(value, dict) else value for key, value in saved.items()}
    if isinstance(settings.get("data"), dict):
        settings["data"].setdefault("augment_on", "workers")
        # Written before blank crops were left out: the run trained on them, and its fingerprint counts them.
        settings["data"].setdefault("keep_blank", bool(settings["data"].get("train_dir")))
    if isinstance(settings.get("method"), dict):
        settings["method"].setdefault("recipe", "reference")
        settings["method"].setdefault("regulariser_scope", "process")
    if isinstance(settings.get("model"), dict):
        settings["model"].setdefault("drop_path_scope", "process")
    return config_from_dict(settings)


def _with_saved_scopes(config: PretrainConfig, saved: PretrainConfig) -> PretrainConfig:
    """`config` with the scopes it leaves unset taken from the run it continues (they shape its random numbers)."""
    return with_settings(config, {name: setting(saved, name) for name in NEW_RUN_SCOPES
                                  if setting(config, name) is None})


def continued_config(config: PretrainConfig, state: TrainingState) -> PretrainConfig:
    """The configuration a resumed run uses: the requested one, with the recipe settings it leaves unset taken from
    the checkpoint (what the run was started with; more epochs do not derive them again)."""
    saved = saved_config(state)
    values = {name: setting(saved, name) for name in RECIPE_SETTINGS | {"recipe"} if setting(config, name) is None}
    if _before_blank_crops(state, config):
        values["keep_blank"] = saved.data.keep_blank
    return with_settings(_with_saved_scopes(config, saved), values)


def _before_blank_crops(state: TrainingState, config: PretrainConfig) -> bool:
    """Whether the checkpoint was written before blank crops were left out and the request leaves `keep_blank` at
    its default: the run continues as it started (`saved_config`), not refused for a setting it never had."""
    data = state.config.get("data")
    return isinstance(data, dict) and "keep_blank" not in data and not config.data.keep_blank


def resume_config(checkpoint: str | Path, overrides: dict[str, Any]) -> tuple[PretrainConfig, Path]:
    """The configuration of `dinopre resume`: the checkpoint's own, writing into the checkpoint's folder, with the
    few settings a resume may change (`epochs`, `device`, `num_workers`, `augment_on`, `log_interval`,
    `checkpoint_every`).

    Returns:
        The configuration and the checkpoint path.
    """
    path = find_checkpoint(checkpoint)
    state = load_training_checkpoint(path)
    settings = config_to_dict(saved_config(state))
    flat = {"output_dir": str(path.parent), **{k: v for k, v in overrides.items() if v is not None}}
    roots = state.data.get("roots")
    if roots and settings["data"]["train_dir"]:  # the folders the run read, whatever the working directory now
        flat["train_dir"] = list(roots)
    for section in SECTIONS:
        for key in settings[section]:
            if key in flat:
                settings[section][key] = flat[key]
    return config_from_dict(settings), path


def load_resume_state(path: str | Path, config: PretrainConfig) -> TrainingState:
    """Load a checkpoint and check that `config` may continue it.

    Raises:
        CheckpointError: unreadable or not a training checkpoint.
        ConfigError: settings differ beyond what a resume may change, or more epochs are done than asked for.
        RunComplete: the run has done the epochs asked for (all it planned, unless --epochs asks for more).
    """
    path = find_checkpoint(path)
    state = load_training_checkpoint(path)
    try:
        saved = saved_config(state)
    except (ConfigError, KeyError, TypeError) as exc:
        raise CheckpointError(f"'{path}' holds a configuration this dinopre cannot read ({exc}).") from None
    state.check_centers(path, saved.model.out_dim,
                        saved.resolved_patch_out_dim if saved.method.algorithm == "ibot" else None)
    differences = config_differences(saved, _with_saved_scopes(config, saved))
    if _before_blank_crops(state, config):
        differences = [d for d in differences if not d.startswith("keep_blank:")]
    roots = state.data.get("roots")
    if roots and config.data.train_dir:  # compared as absolute paths: `data` and `$PWD/data` are the same folder
        differences = [d for d in differences if not d.startswith("train_dir:")]
        if list(absolute_roots(config.data.train_dir)) != list(roots):
            differences.insert(0, f"train_dir: checkpoint {list(roots)!r}, requested "
                                  f"{list(absolute_roots(config.data.train_dir))!r}")
    if differences:
        may_change = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(RESUME_MAY_CHANGE))
        started = (f" It started from --init-from, which set its shape: `dinopre resume {path.parent}` takes every "
                   "setting from the checkpoint." if saved.model.init_from else "")
        raise ConfigError(f"Cannot resume '{path}' with different settings ({'; '.join(differences)}); only "
                          f"{may_change} may change.{started}")
    done, in_epoch = state.epoch, state.step_in_epoch
    if config.optim.epochs == done and in_epoch == 0:
        raise RunComplete(_complete(path, done))
    if config.optim.epochs < done:
        raise ConfigError(f"'{path}' has already done {done} of {saved.optim.epochs} epochs; pass --epochs N with "
                          f"N > {done} to train longer.")
    return state


def _complete(checkpoint: Path, done: int) -> str:
    """What to do with a run that has done all its epochs: export its best checkpoint, or train it longer."""
    run_dir = checkpoint.parent
    best = run_dir / RunDirectory(run_dir).best.name
    source = best if best.is_file() else checkpoint
    return (f"'{run_dir}' is complete: it has done all its {done} epochs. Export its backbone with: "
            f"{export_command(source, run_dir / 'backbone.pt')}; or train it longer with: "
            f"{resume_command(run_dir, '--epochs N')} (N > {done}).")
