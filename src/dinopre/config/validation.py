"""Checking a configuration: each setting against its declaration, the checks that relate several settings,
what may change when a run is resumed, and the advice given about settings known to go wrong.

A setting's own checks (its upper bound, range, choices) are declared on its field (dinopre.config.fields) and
applied here; only checks across settings are written out below. The first problem found is raised as one
sentence saying what to do about it.
"""

from __future__ import annotations

from collections.abc import Callable

from dinopre.base.errors import ConfigError
from dinopre.config.fields import problem
from dinopre.config.settings import (
    FIELD_SECTION,
    RECIPE_SETTINGS,
    SECTIONS,
    SETTING_INFO,
    UPPER_BOUNDS,
    PretrainConfig,
    config_to_dict,
    setting,
)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_bounds(config: PretrainConfig) -> None:
    for name, bound in UPPER_BOUNDS.items():
        value = setting(config, name)
        _require(value is None or value <= bound,
                 f"--{name.replace('_', '-')} {value} is beyond what dinopre accepts ({bound:g}); check the value.")


def _check_fields(config: PretrainConfig, section: str) -> None:
    """Each setting of a section against its declared check or choices, in the order of the fields."""
    for name, owner in FIELD_SECTION.items():
        if owner == section:
            message = problem(name, SETTING_INFO[name], setting(config, name))
            if message is not None:
                raise ConfigError(message)


# ============ checks across settings ============


def _patch_from_source(config: PretrainConfig) -> bool:
    """Whether the patch size is not known yet: an --init-from run takes it from its source, which then checks the
    crop sizes against it (dinopre.train.init_from), and the configuration is validated again."""
    return bool(config.model.init_from) and "patch_size" not in config.given


def _across_model(config: PretrainConfig) -> None:
    m = config.model
    _require(_patch_from_source(config) or m.image_size % m.patch_size == 0,
             f"--patch-size {m.patch_size} does not divide --image-size {m.image_size}; "
             f"choose sizes so that the image is a whole number of patches (e.g. --image-size "
             f"{max(1, round(m.image_size / m.patch_size)) * m.patch_size}).")
    _require(m.vit_embed_dim % m.vit_num_heads == 0,
             f"--vit-embed-dim {m.vit_embed_dim} is not divisible by --vit-num-heads {m.vit_num_heads}; "
             "each attention head needs an equal share of the embedding.")
    _require(m.vit_mlp_ratio > 0 and int(m.vit_embed_dim * m.vit_mlp_ratio) >= 1,
             f"--vit-mlp-ratio {m.vit_mlp_ratio} gives an MLP of {int(m.vit_embed_dim * max(m.vit_mlp_ratio, 0))} "
             f"units for --vit-embed-dim {m.vit_embed_dim}; use a ratio such as 4 (DINO's).")


def _across_data(config: PretrainConfig) -> None:
    d, p = config.data, config.model.patch_size
    _require(bool(d.train_dir) or d.demo,
             "No training data: pass --train-dir DIR (repeat it for several folders) or --demo for built-in data.")
    _require(d.local_crop_size >= 1 and (_patch_from_source(config) or d.local_crop_size % p == 0),
             f"--patch-size {p} does not divide --local-crop-size {d.local_crop_size}; "
             f"use a multiple of {p} (e.g. {max(1, round(d.local_crop_size / p)) * p}).")


def _across_method(config: PretrainConfig) -> None:
    m, model = config.method, config.model
    _require(not m.contrast_weight or config.optim.batch_size >= 2,
             "--contrast-weight needs at least 2 images per batch (the others are its negatives); raise --batch-size.")
    _require(not m.koleo_weight or config.optim.batch_size >= 2,
             "--koleo-weight needs at least 2 images per batch (each image's nearest neighbour); raise --batch-size.")
    _require(not (model.shared_head and model.out_dim is not None and model.patch_out_dim not in (None, model.out_dim)),
             f"--patch-out-dim {model.patch_out_dim} differs from --out-dim {model.out_dim} but the patch and CLS "
             "heads are shared; pass --no-shared-head for a separate patch head, or drop --patch-out-dim.")


def _across_run(config: PretrainConfig) -> None:
    r = config.run
    _require(len(set(r.logger)) == len(r.logger), f"--logger names a tracker twice: {', '.join(r.logger)}.")


def _across_eval(config: PretrainConfig) -> None:
    e = config.eval
    _require(not (e.best_by == "knn" and not e.eval_dir),
             "--best-by knn needs labelled images to measure: pass --eval-dir DIR (one sub-folder per class).")


_ACROSS: dict[str, Callable[[PretrainConfig], None]] = {
    "model": _across_model,
    "data": _across_data,
    "optim": lambda config: None,
    "method": _across_method,
    "run": _across_run,
    "eval": _across_eval,
}


def validate(config: PretrainConfig) -> None:
    """Check every setting and their combinations; raise one clear sentence for the first problem found.

    The upper bounds come first (a huge value is most likely a typo), then section by section each setting's own
    check and the section's checks across settings, which may rely on the former (no division by a zero patch).

    Raises:
        ConfigError: the first invalid setting, with what to do about it.
    """
    _check_bounds(config)
    for section in SECTIONS:
        _check_fields(config, section)
        _ACROSS[section](config)


# ============ resuming ============

# Settings that may differ between a checkpoint and the run that resumes it: none of them changes what is learned
# in the steps already planned (more epochs redefine the schedules over the new total, see `dinopre resume --help`).
# Where the views are rendered only changes their resampling, like a change of device changes rounding.
RESUME_MAY_CHANGE = frozenset(
    {"epochs", "device", "num_workers", "augment_on", "log_interval", "checkpoint_every", "output_dir",
     "export_backbone", "stream", "eval_every", "rendezvous_timeout"}
)


def _plain_settings(config: PretrainConfig) -> dict[str, object]:
    """{name: value} as `config_to_dict` writes them (tuples as lists), the preset first."""
    plain = config_to_dict(config)
    return {"preset": plain.pop("preset"), **{name: value for section in plain.values() for name, value in
                                              section.items()}}


def config_differences(saved: PretrainConfig, requested: PretrainConfig) -> list[str]:
    """Settings that differ between a checkpoint's configuration and the requested one, except those a resume
    may change and the recipe settings the request leaves unset (the checkpoint's values continue); each as
    `name: checkpoint X, requested Y`."""
    old, new = _plain_settings(saved), _plain_settings(requested)
    unset = {key for key in RECIPE_SETTINGS | {"recipe"} if new.get(key) is None}
    return [f"{key}: checkpoint {old[key]!r}, requested {new[key]!r}" for key in old
            if key not in RESUME_MAY_CHANGE | unset and old[key] != new.get(key)]


# ============ advice ============


def advisories(config: PretrainConfig, num_images: int, derived: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Settings known to go wrong, as sentences to show when a run starts.

    Args:
        config: the complete configuration of the run.
        num_images: the training images.
        derived: settings the recipe chose; advice is only given about settings the user chose.
    """
    m, o, model, d = config.method, config.optim, config.model, config.data

    def chosen(name: str) -> bool:
        return name not in derived

    notes = []
    if m.teacher_temp > 0.07 and chosen("teacher_temp"):
        notes.append(f"--teacher-temp {m.teacher_temp} is above 0.07, which DINO's authors found unstable; "
                     "0.04-0.07 is the tested range.")
    if not model.norm_last_layer and model.vit_embed_dim > 384:
        notes.append("--no-norm-last-layer is only known to be stable for ViT-S (DINO README); keep the prototype "
                     "norms frozen for wider models.")
    if model.out_dim >= 32768 and num_images < 100_000 and chosen("out_dim"):
        notes.append(f"{model.out_dim} prototypes for {num_images} images: small datasets learn much faster with "
                     "--out-dim 4096-16384 (dino#279), or leave --out-dim unset for the auto recipe.")
    if o.warmup_epochs >= o.epochs and chosen("warmup_epochs"):
        notes.append(f"--warmup-epochs {o.warmup_epochs:g} is not below --epochs {o.epochs}: the learning rate never "
                     "reaches its peak and never decays.")
    if config.peak_learning_rate > 20 * 5e-4 * o.batch_size / 256 and chosen("learning_rate"):
        notes.append(f"A peak lr of {config.peak_learning_rate:g} is over 20 times DINO's 5e-4 x batch / 256; lower "
                     "it if the loss spikes or becomes NaN.")
    if config.preset == "hands" and d.flip_prob > 0:
        notes.append("Horizontal flips turn right hands into left hands; with separate left/right streams keep "
                     "--flip-prob 0.")
    if o.freeze_last_layer_epochs == 0 and chosen("freeze_last_layer_epochs"):
        notes.append("The prototype layer is not frozen at the start (--freeze-last-layer-epochs 0); DINO freezes "
                     "it for one epoch to avoid an early collapse.")
    grid = model.image_size // model.patch_size
    if m.algorithm == "ibot" and grid < 4:
        notes.append(f"iBOT on a {grid}x{grid} token grid: masks can only cover a few patches; use a larger "
                     "--image-size or a smaller --patch-size.")
    return notes
