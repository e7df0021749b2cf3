"""From presets, config files and command-line flags to a validated `PretrainConfig`, and back from plain dicts.

Every value read from a file or the command line is checked against its field's annotation and normalised
(`_coerce`) before the configuration is assembled and validated (dinopre.config.validation).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import typing
from pathlib import Path
from typing import Any

from dinopre.base.errors import ConfigError
from dinopre.config.presets import DEMO_OVERRIDES, PRESETS
from dinopre.config.settings import FIELD_SECTION, SECTIONS, PretrainConfig
from dinopre.config.validation import validate


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
    given = frozenset(k for layer in (file_settings or {}, cli_settings or {}) for k in layer if k != "preset")
    if demo:
        settings.update(DEMO_OVERRIDES)
        settings["demo"] = True
        settings["output_dir"] = f"work_dirs/demo_{preset}"
    for layer in (file_settings or {}, cli_settings or {}):
        if layer.get("preset", preset) != preset:
            raise ConfigError(f"The config file is for preset '{layer['preset']}' but preset '{preset}' was asked.")
        settings.update({k: v for k, v in layer.items() if k != "preset"})
    config = dataclasses.replace(_assemble(preset, settings), given=given)
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


def config_from_dict(raw: dict[str, Any]) -> PretrainConfig:
    """Rebuild a configuration saved by `config_to_dict` (e.g. from a checkpoint), validating it again."""
    flat = flatten_settings(raw, "the saved configuration")
    preset = flat.pop("preset", None)
    if preset not in PRESETS:
        raise ConfigError(f"The saved configuration names an unknown preset {preset!r}.")
    config = _assemble(preset, flat)
    validate(config)
    return config
