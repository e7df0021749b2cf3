"""Typed, frozen run configuration: presets, config files, command-line overrides and validation.

The flow is one way (style principle 2): dataclass defaults (the DINO reference recipe) -> preset (`face`,
`hands`) -> `--demo` -> `--config FILE` (TOML or JSON) -> command-line flags -> `validate()`. The result is a
`PretrainConfig` that never changes afterwards; it is printed at start, saved as `params.json` and embedded in
every checkpoint as a plain dict.

Field names are the seed tool's flag names with underscores (`--vit-embed-dim` -> `vit_embed_dim`) and are unique
across sections, so a config file may be flat or use the section tables `[model]`, `[data]`, `[optim]`,
`[method]`, `[run]`. This module imports no torch, so `dinopre --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinopre.base.errors import ConfigError

ALGORITHMS = ("dino", "ibot")
MASK_SHAPES = ("block", "rand")  # iBOT: BEiT-style rectangles or scattered patches (dinopre.data.masking)
DEVICES_HELP = "auto, cpu, cuda or cuda:INDEX"
PRECISIONS = ("auto", "bf16", "fp32")
# Where the views are rendered. "device" (batched, on the training device) is the default on a CPU too: on the 2-core
# C1 workload it measured 36-38 img/s against 34 img/s for per-image rendering in the workers, and the face demo
# 13 s against 18 s, because rendering in workers competes with the training threads for the same cores.
AUGMENT_PLACES = ("device", "workers")
CENTERINGS = ("ema", "sinkhorn")  # how the teacher's targets are balanced (dinopre.model.losses)
RECIPES = ("auto", "reference")  # where unset settings come from (dinopre.config.recipe)
TEACHER_VIEWS = ("rgb", "gray", "pattern")  # how the teacher sees its views (dinopre.model.method)
LOGGERS = ("tensorboard", "wandb", "mlflow")  # experiment trackers beside metrics.jsonl (dinopre.train.trackers)
# With several processes: "global" gathers the features of every process (the run is the same on 1 and N processes),
# "process" keeps each process's own (as DINOv2, and dinopre before: runs started so continue so).
REGULARISER_SCOPES = ("global", "process")
# "sample": drop path's masks come from each sample's own generator, like its views, whatever the processes;
# "process": from each process's generator (dinopre before: runs started so continue so).
DROP_PATH_SCOPES = ("sample", "process")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and projection head. Defaults are ViT-S/16 with the DINO head (dino vision_transformer.py)."""

    image_size: int = 224
    patch_size: int = 16
    vit_embed_dim: int = 384
    vit_depth: int = 12
    vit_num_heads: int = 6
    vit_mlp_ratio: float = 4.0
    # None: the recipe decides (REFERENCE_VALUES under `reference`, derived under `auto`); also below.
    drop_path_rate: float | None = None
    out_dim: int | None = None
    head_hidden_dim: int | None = None
    head_bottleneck_dim: int | None = None
    norm_last_layer: bool = True
    shared_head: bool = True
    patch_out_dim: int | None = None
    # Patch filters with zero mean per colour channel: a token ignores a patch's mean colour (dinopre.model.method).
    zero_mean_patches: bool | None = None
    # Whose random numbers drop path draws (DROP_PATH_SCOPES); None: "sample" for a new run, the run's own on resume.
    drop_path_scope: str | None = None


@dataclass(frozen=True)
class DataConfig:
    """Training images and the multi-crop augmentation (dino main_dino.py DataAugmentationDINO)."""

    train_dir: tuple[str, ...] = ()
    demo: bool = False
    demo_images: int = 512
    strict_data: bool = False
    num_local_crops: int = 8
    local_crop_size: int = 96
    global_crop_scale: tuple[float, float] | None = None
    local_crop_scale: tuple[float, float] | None = None
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    num_workers: int | None = None
    augment_on: str = "device"


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its per-step schedules (dino main_dino.py defaults)."""

    epochs: int = 100
    batch_size: int = 64
    learning_rate: float | None = None
    min_lr: float = 1e-6
    warmup_epochs: float | None = None
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad_norm: float = 3.0
    freeze_last_layer_epochs: float | None = None


@dataclass(frozen=True)
class MethodConfig:
    """Self-distillation settings: temperatures, centering and the teacher EMA."""

    algorithm: str = "dino"
    student_temp: float = 0.1
    recipe: str | None = None  # auto (unset) | reference: where unset settings come from (dinopre.config.recipe)
    teacher_temp: float | None = None
    warmup_teacher_temp: float | None = None
    warmup_teacher_temp_epochs: float | None = None
    center_momentum: float = 0.9
    centering: str | None = None  # ema (DINO) | sinkhorn (DINOv2's Sinkhorn-Knopp)
    koleo_weight: float | None = None  # DINOv2 uses 0.1
    teacher_view: str | None = None  # rgb | gray | pattern: how the teacher sees its views
    contrast_weight: float | None = None  # a training-only contrastive head between the global views (0: off)
    contrast_temperature: float = 0.2
    drloc_weight: float | None = None  # a training-only head that locates pairs of patch tokens (Drloc; 0: off)
    # Which batch KoLeo and the contrastive loss see (REGULARISER_SCOPES); None: "global" for a new run, the run's own
    # on resume.
    regulariser_scope: str | None = None
    teacher_momentum_base: float | None = None
    teacher_momentum_final: float = 1.0
    # iBOT only (bytedance/ibot ViT-S recipe)
    patch_loss_weight: float = 1.0
    cls_loss_weight: float = 1.0
    patch_mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = 0.5
    mask_shape: str = "block"
    teacher_patch_temp: float = 0.07
    warmup_teacher_patch_temp: float = 0.04
    warmup_teacher_patch_temp_epochs: float = 30.0


@dataclass(frozen=True)
class RunConfig:
    """Where and how the run executes, and what it writes."""

    output_dir: str = "work_dirs/dino"
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    log_interval: int = 10
    checkpoint_every: int = 0
    compile: bool = False
    export_backbone: str | None = None
    stream: str | None = None
    logger: tuple[str, ...] = ()  # experiment trackers (LOGGERS), beside metrics.jsonl
    rendezvous_timeout: float | None = None  # seconds to wait for the other processes (None: 300 or the environment)


@dataclass(frozen=True)
class EvalConfig:
    """Measuring the features while training (train.evaluation): a labelled k-NN probe and label-free signals."""

    eval_dir: str | None = None
    eval_every: int = 1
    best_by: str | None = None  # knn | loss; unset: knn with an eval_dir, else loss
    knn_k: int = 20
    knn_temperature: float = 0.07
    eval_test_share: float = 0.25
    monitor_images: int = 1024


@dataclass(frozen=True)
class PretrainConfig:
    """The whole, resolved configuration of one run."""

    preset: str
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def resolved_best_by(self) -> str:
        """What chooses checkpoint_best.pt: `best_by`, else k-NN accuracy with an --eval-dir, else the loss."""
        return self.eval.best_by or ("knn" if self.eval.eval_dir else "loss")

    @property
    def resolved_patch_out_dim(self) -> int:
        """Prototypes of the iBOT patch head: `out_dim` when the head is shared."""
        return self.model.patch_out_dim or self.model.out_dim

    @property
    def peak_learning_rate(self) -> float:
        """The lr reached at the end of warmup (`learning_rate`, or DINO's 5e-4 x batch / 256 when unset)."""
        if self.optim.learning_rate is not None:
            return self.optim.learning_rate
        return 5e-4 * self.optim.batch_size / 256


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "method": MethodConfig,
    "run": RunConfig,
    "eval": EvalConfig,
}
BEST_BY = ("knn", "loss")
FIELD_SECTION: dict[str, str] = {f.name: s for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}

# What each preset changes from the DINO reference defaults, and why. Both keep ViT-S/16, the model the
# translation pipeline loads as `slt_vitsmall_patch16`.
PRESETS: dict[str, dict[str, Any]] = {
    "face": {
        # Face ROIs are 64-256 px; 112 px globals give a 7x7 token grid and 48 px locals 3x3, which keeps the
        # student's 8 views cheap while covering eyes, mouth and brows in every global view.
        "image_size": 112,
        "local_crop_size": 48,
        "num_local_crops": 6,
        # dino's blur sigma (0.1-2 px) is meant for 224 px views; halve it to blur a 112 px view as much.
        "blur_sigma": (0.05, 1.0),
        "output_dir": "work_dirs/dino_face",
    },
    "hands": {
        "image_size": 112,
        "local_crop_size": 48,
        "num_local_crops": 6,
        "blur_sigma": (0.05, 1.0),
        # Left and right hands are separate streams and handedness is part of a sign: a mirrored right hand looks
        # like a left hand, so flipping would teach the backbone to ignore it.
        "flip_prob": 0.0,
        # The hand fills a loose ROI and the fingers carry the handshape: crops below half the ROI cut them away.
        "global_crop_scale": (0.5, 1.0),
        "local_crop_scale": (0.1, 0.5),
        "output_dir": "work_dirs/dino_hands",
    },
}

# The settings a recipe decides when they are left unset, with their value under `--recipe reference`: DINO's
# (dino main_dino.py) and iBOT's published defaults. `auto` derives them from the run (dinopre.config.recipe).
REFERENCE_VALUES: dict[str, Any] = {
    "drop_path_rate": 0.1,
    "out_dim": 65536,
    "head_hidden_dim": 2048,
    "head_bottleneck_dim": 256,
    "global_crop_scale": (0.4, 1.0),
    "local_crop_scale": (0.05, 0.4),
    "warmup_epochs": 10.0,
    "freeze_last_layer_epochs": 1.0,
    "teacher_temp": 0.04,
    "warmup_teacher_temp": 0.04,
    "warmup_teacher_temp_epochs": 0.0,
    "centering": "ema",
    "koleo_weight": 0.0,
    "teacher_view": "rgb",
    "contrast_weight": 0.0,
    "drloc_weight": 0.0,
    "teacher_momentum_base": 0.996,
    "zero_mean_patches": False,
}
RECIPE_SETTINGS = frozenset(REFERENCE_VALUES) | {"learning_rate"}  # learning_rate: None is 5e-4 x batch / 256
# The presets' reference values where they differ from DINO's.
PRESET_REFERENCE: dict[str, dict[str, Any]] = {
    # Few thousand crops per signer: 8192 prototypes converge much faster than 65536 on small custom data
    # (dino#279, dino#246) and is the iBOT ViT-S recipe's size.
    "face": {"out_dim": 8192},
    "hands": {"out_dim": 8192},
}


def reference_value(preset: str, name: str) -> Any:
    """The value of a recipe setting under `--recipe reference` (None for the lr: the linear scaling rule)."""
    return PRESET_REFERENCE.get(preset, {}).get(name, REFERENCE_VALUES.get(name))


def setting(config: PretrainConfig, name: str) -> Any:
    """The value of a setting by its field name (e.g. `out_dim`)."""
    return getattr(getattr(config, FIELD_SECTION[name]), name)


def with_settings(config: PretrainConfig, values: dict[str, Any]) -> PretrainConfig:
    """A copy of `config` with some settings replaced, by field name (not validated)."""
    sections: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        sections.setdefault(FIELD_SECTION[name], {})[name] = value
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)
                                          for section, changes in sections.items()})


# `--demo`: a tiny model on built-in synthetic crops that finishes in well under a minute on two CPU cores. Only the
# model and the data are set here; the `auto` recipe derives the rest from them, as for any run.
DEMO_OVERRIDES: dict[str, Any] = {
    "image_size": 32,
    "patch_size": 8,
    "local_crop_size": 16,
    "num_local_crops": 4,
    "vit_embed_dim": 64,
    "vit_depth": 3,
    "vit_num_heads": 4,
    "demo_images": 512,
    # The synthetic crops differ from each other mostly in colour: colour jitter and grayscale would erase what
    # tells them apart and the run collapses to a uniform teacher (measured), so the demo keeps colours.
    "jitter_prob": 0.0,
    "grayscale_prob": 0.0,
    "zero_mean_patches": False,  # the same reason: a patch's mean colour is what tells these crops apart
    "blur_sigma": (0.02, 0.3),  # dino's 0.1-2 px scaled to 32 px views
    "epochs": 12,
    "batch_size": 32,
    "log_interval": 8,
}


def _field_types(section: type) -> dict[str, Any]:
    return typing.get_type_hints(section)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type without `| None`, whether None is allowed)."""
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check a value read from a file or the command line against the field's annotation and normalise it
    (int -> float where a float is expected, a single path -> a one-item list, lists -> tuples).

    Raises:
        ConfigError: the value cannot be of that type.
    """
    kind, optional = _base_type(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"Setting '{name}' needs a value, got nothing.")
    if isinstance(value, Path):
        value = str(value)
    if typing.get_origin(kind) is tuple:
        return _coerce_tuple(name, value, typing.get_args(kind))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2**1023 else math.inf
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        raise ConfigError(f"Setting '{name}' must be {names.get(kind, kind.__name__)}, got {_short(value)}.")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"Setting '{name}' must be a finite number, got {value!r}.")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce_tuple(name: str, value: Any, element_types: tuple[Any, ...]) -> tuple:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"Setting '{name}' must be a list, got {value!r}.")
    element = element_types[0]
    if element_types[-1] is not Ellipsis and len(value) != len(element_types):
        raise ConfigError(f"Setting '{name}' takes {len(element_types)} values, got {list(value)}.")
    return tuple(_coerce(name, item, element) for item in value)


def _unknown_key_error(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(FIELD_SECTION), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"Unknown setting '{key}' in {source}.{hint}")


def flatten_settings(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Turn a flat or sectioned mapping (as read from TOML/JSON or a checkpoint) into {field: value}.

    Args:
        raw: the mapping; section tables (`model`, `data`, ...) and flat keys may be mixed.
        source: where it came from, for error messages.

    Returns:
        A flat mapping of field names to values; `preset` is kept as is.
    """
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        key = key.replace("-", "_")
        if key in SECTIONS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                sub_key = sub_key.replace("-", "_")
                if FIELD_SECTION.get(sub_key) != key:
                    raise _unknown_key_error(f"{key}.{sub_key}", source)
                flat[sub_key] = sub_value
        elif key in FIELD_SECTION or key == "preset":
            flat[key] = value
        else:
            raise _unknown_key_error(key, source)
    return flat


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or JSON config file into a flat {field: value} mapping.

    Raises:
        ConfigError: the file is missing, unreadable, not TOML/JSON, or names unknown settings.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist; pass the path of a .toml or .json file.")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Config file '{path}' cannot be read as UTF-8 text ({exc}).") from None
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(text)
        elif path.suffix.lower() == ".toml":
            raw = tomllib.loads(text)
        else:
            raise ConfigError(f"Config file '{path}' must end in .toml or .json.")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"Config file '{path}' is not valid {path.suffix[1:].upper()}: {exc}.") from None
    except RecursionError:
        raise ConfigError(f"Config file '{path}' is nested too deeply to be a settings file.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"Config file '{path}' must hold a table of settings, not {type(raw).__name__}.")
    if isinstance(raw.get("config"), dict) and "environment" in raw:  # a run directory's params.json
        raw = raw["config"]
    return flatten_settings(raw, f"config file '{path}'")


def build_config(
    preset: str,
    *,
    demo: bool = False,
    file_settings: dict[str, Any] | None = None,
    cli_settings: dict[str, Any] | None = None,
) -> PretrainConfig:
    """Resolve a configuration: defaults < preset < demo < config file < command line, then validate.

    Args:
        preset: `face` or `hands`.
        demo: apply the `--demo` settings (tiny model, synthetic data).
        file_settings: flat settings read from `--config`.
        cli_settings: flat settings given on the command line (only flags the user set).

    Returns:
        The validated, frozen configuration.

    Raises:
        ConfigError: an unknown preset or setting, a value of the wrong type, or an invalid combination.
    """
    if preset not in PRESETS:
        raise ConfigError(f"Unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}.")
    settings: dict[str, Any] = dict(PRESETS[preset])
    if demo:
        settings.update(DEMO_OVERRIDES)
        settings["demo"] = True
        settings["output_dir"] = f"work_dirs/demo_{preset}"
    for layer in (file_settings or {}, cli_settings or {}):
        if layer.get("preset", preset) != preset:
            raise ConfigError(f"The config file is for preset '{layer['preset']}' but preset '{preset}' was asked.")
        settings.update({k: v for k, v in layer.items() if k != "preset"})
    config = _assemble(preset, settings)
    validate(config)
    return config


def _assemble(preset: str, settings: dict[str, Any]) -> PretrainConfig:
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in settings.items():
        if key not in FIELD_SECTION:
            raise _unknown_key_error(key, "the settings")
        section = FIELD_SECTION[key]
        sections[section][key] = _coerce(key, value, _field_types(SECTIONS[section])[key])
    return PretrainConfig(preset=preset, **{name: SECTIONS[name](**values) for name, values in sections.items()})


def config_to_dict(config: PretrainConfig) -> dict[str, Any]:
    """The configuration as nested plain values (tuples become lists), safe for JSON and checkpoints."""

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    out: dict[str, Any] = {"preset": config.preset}
    for name in SECTIONS:
        section = getattr(config, name)
        out[name] = {f.name: plain(getattr(section, f.name)) for f in dataclasses.fields(section)}
    return out


def config_from_dict(raw: dict[str, Any]) -> PretrainConfig:
    """Rebuild a configuration saved by `config_to_dict` (e.g. from a checkpoint), validating it again."""
    flat = flatten_settings(raw, "the saved configuration")
    preset = flat.pop("preset", None)
    if preset not in PRESETS:
        raise ConfigError(f"The saved configuration names an unknown preset {preset!r}.")
    config = _assemble(preset, flat)
    validate(config)
    return config


def validate(config: PretrainConfig) -> None:
    """Check every setting and their combinations; raise one clear sentence for the first problem found.

    Raises:
        ConfigError: the first invalid setting, with what to do about it.
    """
    for check in (_validate_bounds, _validate_model, _validate_data, _validate_optim, _validate_method,
                  _validate_run, _validate_eval):
        check(config)


# The largest value each setting may take: far beyond any real run, low enough that nothing allocates gigabytes
# or loops for ages on a typo (a 10^9-pixel view, 10^13 epochs, a 2^64 seed).
UPPER_BOUNDS: dict[str, float] = {
    "image_size": 4096, "local_crop_size": 4096, "patch_size": 4096, "vit_embed_dim": 8192, "vit_depth": 256,
    "vit_num_heads": 8192, "vit_mlp_ratio": 64, "out_dim": 2**20, "patch_out_dim": 2**20, "head_hidden_dim": 65536,
    "head_bottleneck_dim": 65536, "num_local_crops": 64, "epochs": 1_000_000, "batch_size": 2**20,
    "num_workers": 1024, "demo_images": 1_000_000, "monitor_images": 1_000_000, "knn_k": 100_000,
    "seed": 2**63 - 1, "learning_rate": 10.0, "min_lr": 10.0, "warmup_epochs": 1_000_000,
    "freeze_last_layer_epochs": 1_000_000, "warmup_teacher_temp_epochs": 1_000_000,
    "warmup_teacher_patch_temp_epochs": 1_000_000, "weight_decay": 100.0, "weight_decay_end": 100.0,
    "student_temp": 100.0, "teacher_temp": 100.0, "contrast_weight": 1000.0, "contrast_temperature": 100.0,
    "drloc_weight": 1000.0,
    "warmup_teacher_temp": 100.0, "teacher_patch_temp": 100.0,
    "warmup_teacher_patch_temp": 100.0, "koleo_weight": 1000.0, "patch_loss_weight": 1e6, "cls_loss_weight": 1e6,
    "clip_grad_norm": 1e6, "knn_temperature": 100.0, "eval_every": 1_000_000, "rendezvous_timeout": 7 * 86400,
}
# Settings that may not be negative where no other check says more.
NON_NEGATIVE = ("seed",)


def _validate_bounds(config: PretrainConfig) -> None:
    for name, bound in UPPER_BOUNDS.items():
        value = setting(config, name)
        _require(value is None or value <= bound,
                 f"--{name.replace('_', '-')} {value} is beyond what dinopre accepts ({bound:g}); check the value.")
    for name in NON_NEGATIVE:
        value = setting(config, name)
        _require(value >= 0, f"--{name.replace('_', '-')} must be 0 or more, got {value}.")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _validate_model(config: PretrainConfig) -> None:
    m = config.model
    for name in ("image_size", "patch_size", "vit_embed_dim", "vit_depth", "vit_num_heads", "out_dim",
                 "head_hidden_dim", "head_bottleneck_dim"):
        value = getattr(m, name)
        _require(value is None or value >= 1, f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    _require(m.image_size % m.patch_size == 0,
             f"--patch-size {m.patch_size} does not divide --image-size {m.image_size}; "
             f"choose sizes so that the image is a whole number of patches (e.g. --image-size "
             f"{max(1, round(m.image_size / m.patch_size)) * m.patch_size}).")
    _require(m.vit_embed_dim % m.vit_num_heads == 0,
             f"--vit-embed-dim {m.vit_embed_dim} is not divisible by --vit-num-heads {m.vit_num_heads}; "
             "each attention head needs an equal share of the embedding.")
    _require(m.vit_mlp_ratio > 0 and int(m.vit_embed_dim * m.vit_mlp_ratio) >= 1,
             f"--vit-mlp-ratio {m.vit_mlp_ratio} gives an MLP of {int(m.vit_embed_dim * max(m.vit_mlp_ratio, 0))} "
             f"units for --vit-embed-dim {m.vit_embed_dim}; use a ratio such as 4 (DINO's).")
    _require(m.drop_path_rate is None or 0.0 <= m.drop_path_rate < 1.0,
             f"--drop-path-rate must be in [0, 1), got {m.drop_path_rate}.")
    _require(m.drop_path_scope is None or m.drop_path_scope in DROP_PATH_SCOPES,
             f"drop_path_scope must be one of {', '.join(DROP_PATH_SCOPES)}, got '{m.drop_path_scope}'.")


def _validate_scale(flag: str, scale: tuple[float, ...] | None) -> None:
    if scale is None:
        return
    _require(len(scale) == 2, f"{flag} takes two numbers MIN MAX, got {list(scale)}.")
    low, high = scale
    _require(low <= high, f"{flag} has MIN {low} greater than MAX {high}; give the smaller share of the image first.")
    _require(0.0 < low and high <= 1.0, f"{flag} values are shares of the image area and must lie in (0, 1], "
                                        f"got {low} {high}.")


def _validate_data(config: PretrainConfig) -> None:
    d, p = config.data, config.model.patch_size
    _require(bool(d.train_dir) or d.demo,
             "No training data: pass --train-dir DIR (repeat it for several folders) or --demo for built-in data.")
    _require(d.num_local_crops >= 0, f"--num-local-crops must be 0 or more, got {d.num_local_crops}.")
    _require(d.local_crop_size >= 1 and d.local_crop_size % p == 0,
             f"--patch-size {p} does not divide --local-crop-size {d.local_crop_size}; "
             f"use a multiple of {p} (e.g. {max(1, round(d.local_crop_size / p)) * p}).")
    _validate_scale("--global-crop-scale", d.global_crop_scale)
    _validate_scale("--local-crop-scale", d.local_crop_scale)
    _require(len(d.blur_sigma) == 2 and 0 < d.blur_sigma[0] <= d.blur_sigma[1],
             f"blur_sigma must be two positive numbers MIN MAX with MIN <= MAX, got {list(d.blur_sigma)}.")
    for name in ("flip_prob", "jitter_prob", "grayscale_prob"):
        value = getattr(d, name)
        _require(0.0 <= value <= 1.0, f"--{name.replace('_', '-')} is a probability in [0, 1], got {value}.")
    for name in ("brightness", "contrast", "saturation"):
        _require(getattr(d, name) >= 0, f"--{name} must be 0 or more, got {getattr(d, name)}.")
    _require(0.0 <= d.hue <= 0.5, f"--hue must be in [0, 0.5], got {d.hue}.")
    _require(d.num_workers is None or d.num_workers >= 0, f"--num-workers must be 0 or more, got {d.num_workers}.")
    _require(d.demo_images >= 1, f"demo_images must be positive, got {d.demo_images}.")
    _require(d.augment_on in AUGMENT_PLACES,
             f"--augment-on must be one of {', '.join(AUGMENT_PLACES)}, got '{d.augment_on}'.")


def _validate_optim(config: PretrainConfig) -> None:
    o = config.optim
    _require(o.epochs >= 1, f"--epochs must be a positive integer, got {o.epochs}.")
    _require(o.batch_size >= 1, f"--batch-size must be a positive integer, got {o.batch_size}.")
    _require(o.learning_rate is None or o.learning_rate > 0,
             f"--learning-rate must be positive, got {o.learning_rate}.")
    _require(o.min_lr >= 0, f"--min-lr must be 0 or more, got {o.min_lr}.")
    _require(o.warmup_epochs is None or o.warmup_epochs >= 0,
             f"--warmup-epochs must be 0 or more, got {o.warmup_epochs}.")
    _require(o.weight_decay >= 0 and o.weight_decay_end >= 0,
             "--weight-decay and --weight-decay-end must be 0 or more.")
    _require(o.clip_grad_norm >= 0, f"--clip-grad-norm must be 0 (off) or positive, got {o.clip_grad_norm}.")
    _require(o.freeze_last_layer_epochs is None or o.freeze_last_layer_epochs >= 0,
             f"--freeze-last-layer-epochs must be 0 or more, got {o.freeze_last_layer_epochs}.")


def _validate_method(config: PretrainConfig) -> None:
    m = config.method
    _require(m.algorithm in ALGORITHMS, f"--algorithm must be one of {', '.join(ALGORITHMS)}, got '{m.algorithm}'.")
    _require(m.recipe is None or m.recipe in RECIPES,
             f"--recipe must be one of {', '.join(RECIPES)}, got '{m.recipe}'.")
    for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        value = getattr(m, name)
        _require(value is None or value > 0, f"--{name.replace('_', '-')} must be positive, got {value}.")
    _require(m.warmup_teacher_temp_epochs is None or m.warmup_teacher_temp_epochs >= 0,
             "--warmup-teacher-temp-epochs must be 0 or more.")
    _require(m.centering is None or m.centering in CENTERINGS,
             f"--centering must be one of {', '.join(CENTERINGS)}, got '{m.centering}'.")
    _require(m.teacher_view is None or m.teacher_view in TEACHER_VIEWS,
             f"--teacher-view must be one of {', '.join(TEACHER_VIEWS)}, got '{m.teacher_view}'.")
    _require(m.contrast_weight is None or m.contrast_weight >= 0,
             f"--contrast-weight must be 0 (off) or positive, got {m.contrast_weight}.")
    _require(m.contrast_temperature > 0, f"contrast_temperature must be positive, got {m.contrast_temperature}.")
    _require(not m.contrast_weight or config.optim.batch_size >= 2,
             "--contrast-weight needs at least 2 images per batch (the others are its negatives); raise --batch-size.")
    _require(m.drloc_weight is None or m.drloc_weight >= 0,
             f"--drloc-weight must be 0 (off) or positive, got {m.drloc_weight}.")
    _require(m.regulariser_scope is None or m.regulariser_scope in REGULARISER_SCOPES,
             f"regulariser_scope must be one of {', '.join(REGULARISER_SCOPES)}, got '{m.regulariser_scope}'.")
    _require(m.koleo_weight is None or m.koleo_weight >= 0,
             f"--koleo-weight must be 0 (off) or positive, got {m.koleo_weight}.")
    _require(not m.koleo_weight or config.optim.batch_size >= 2,
             "--koleo-weight needs at least 2 images per batch (each image's nearest neighbour); raise --batch-size.")
    for name in ("center_momentum", "teacher_momentum_base", "teacher_momentum_final", "mask_probability"):
        value = getattr(m, name)
        _require(value is None or 0.0 <= value <= 1.0, f"--{name.replace('_', '-')} must be in [0, 1], got {value}.")
    _validate_ibot(config)


def _validate_ibot(config: PretrainConfig) -> None:
    m, model = config.method, config.model
    low, high = m.patch_mask_ratio if len(m.patch_mask_ratio) == 2 else (-1.0, -1.0)
    _require(0.0 <= low <= high < 1.0,
             f"--patch-mask-ratio takes MIN MAX with 0 <= MIN <= MAX < 1 (shares of the patches masked), "
             f"got {list(m.patch_mask_ratio)}.")
    _require(m.mask_shape in MASK_SHAPES, f"--mask-shape must be block or rand, got '{m.mask_shape}'.")
    for name in ("teacher_patch_temp", "warmup_teacher_patch_temp"):
        _require(getattr(m, name) > 0, f"--{name.replace('_', '-')} must be positive, got {getattr(m, name)}.")
    _require(m.warmup_teacher_patch_temp_epochs >= 0, "--warmup-teacher-patch-temp-epochs must be 0 or more.")
    _require(m.patch_loss_weight >= 0 and m.cls_loss_weight >= 0, "Loss weights must be 0 or more.")
    _require(model.patch_out_dim is None or model.patch_out_dim >= 1,
             f"--patch-out-dim must be a positive integer, got {model.patch_out_dim}.")
    _require(not (model.shared_head and model.out_dim is not None and model.patch_out_dim not in (None, model.out_dim)),
             f"--patch-out-dim {model.patch_out_dim} differs from --out-dim {model.out_dim} but the patch and CLS "
             "heads are shared; pass --no-shared-head for a separate patch head, or drop --patch-out-dim.")


def _validate_run(config: PretrainConfig) -> None:
    r = config.run
    _require(r.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got '{r.precision}'.")
    device = r.device
    valid_device = device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())
    _require(valid_device, f"--device must be {DEVICES_HELP}, got '{device}'.")
    _require(r.log_interval >= 1, f"--log-interval must be a positive number of steps, got {r.log_interval}.")
    _require(r.checkpoint_every >= 0,
             f"--checkpoint-every must be 0 (epoch ends only) or a positive number of steps, got {r.checkpoint_every}.")
    for name in r.logger:
        _require(name in LOGGERS, f"--logger must be one of {', '.join(LOGGERS)}, got '{name}'.")
    _require(len(set(r.logger)) == len(r.logger), f"--logger names a tracker twice: {', '.join(r.logger)}.")
    _require(r.rendezvous_timeout is None or r.rendezvous_timeout > 0,
             f"--rendezvous-timeout must be a positive number of seconds, got {r.rendezvous_timeout}.")


def _validate_eval(config: PretrainConfig) -> None:
    e = config.eval
    _require(e.eval_every >= 1, f"--eval-every must be a positive number of epochs, got {e.eval_every}.")
    _require(e.best_by is None or e.best_by in BEST_BY,
             f"--best-by must be one of {', '.join(BEST_BY)}, got '{e.best_by}'.")
    _require(not (e.best_by == "knn" and not e.eval_dir),
             "--best-by knn needs labelled images to measure: pass --eval-dir DIR (one sub-folder per class).")
    _require(e.knn_k >= 1, f"knn_k must be a positive number of neighbours, got {e.knn_k}.")
    _require(e.knn_temperature > 0, f"knn_temperature must be positive, got {e.knn_temperature}.")
    _require(0.0 < e.eval_test_share < 1.0,
             f"eval_test_share is the share of each class held out for testing, in (0, 1); got {e.eval_test_share}.")
    _require(e.monitor_images >= 0, f"monitor_images must be 0 (off) or more, got {e.monitor_images}.")


# Settings that may differ between a checkpoint and the run that resumes it: none of them changes what is learned
# in the steps already planned (more epochs redefine the schedules over the new total, see `dinopre resume --help`).
# Where the views are rendered only changes their resampling, like a change of device changes rounding.
RESUME_MAY_CHANGE = frozenset(
    {"epochs", "device", "num_workers", "augment_on", "log_interval", "checkpoint_every", "output_dir",
     "export_backbone", "stream", "eval_every", "rendezvous_timeout"}
)


def config_differences(saved: PretrainConfig, requested: PretrainConfig) -> list[str]:
    """Settings that differ between a checkpoint's configuration and the requested one, except those a resume
    may change and the recipe settings the request leaves unset (the checkpoint's values continue); each as
    `name: checkpoint X, requested Y`."""
    old, new = flatten_settings(config_to_dict(saved), "checkpoint"), flatten_settings(config_to_dict(requested), "")
    unset = {key for key in RECIPE_SETTINGS | {"recipe"} if new.get(key) is None}
    return [f"{key}: checkpoint {old[key]!r}, requested {new[key]!r}" for key in old
            if key not in RESUME_MAY_CHANGE | unset and old[key] != new.get(key)]


def advisories(config: PretrainConfig, num_images: int, derived: frozenset[str] | set[str] = frozenset()) -> list[str]:
    """Settings known to go wrong (dino_ibot.md section 5), as sentences to show when a run starts.

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
