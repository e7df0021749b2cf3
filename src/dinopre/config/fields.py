"""How a setting declares itself: its default, recipe reference value, bounds, check and help, on its own field.

Each configuration field is written `name: type = setting_field(default, ...)`; the tables the rest of dinopre
reads (the recipe settings and their reference values, the upper bounds, the help of the command-line options)
and the simple checks of `dinopre.config.validation` are derived from these declarations, so a new setting is
declared in one place. Checks that relate several settings stay code in the validation module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEVICES_HELP = "auto, cpu, cuda or cuda:INDEX"


@dataclass(frozen=True)
class Rule:
    """One condition a value must meet and the sentence that tells the user it does not.

    Attributes:
        accepts: whether a (not None) value is fine.
        says: the error as a `str.format` template: `{flag}` (`--koleo-weight`), `{name}` (`koleo_weight`),
            `{value}`, `{listed}` (a tuple as a list), `{choices}` (the allowed values, comma separated).
    """

    accepts: Callable[[Any], bool]
    says: str


def _valid_device(device: str) -> bool:
    return device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())


# The checks a field may name, each a sequence of rules tried in order. Their sentences are those users have
# always seen (tests pin many of them); a field whose sentence differs gives its own with `says`.
CHECKS: dict[str, tuple[Rule, ...]] = {
    "positive_integer": (Rule(lambda v: v >= 1, "{flag} must be a positive integer, got {value}."),),
    "positive": (Rule(lambda v: v > 0, "{flag} must be positive, got {value}."),),
    "non_negative": (Rule(lambda v: v >= 0, "{flag} must be 0 or more, got {value}."),),
    "off_or_positive": (Rule(lambda v: v >= 0, "{flag} must be 0 (off) or positive, got {value}."),),
    "probability": (Rule(lambda v: 0.0 <= v <= 1.0, "{flag} is a probability in [0, 1], got {value}."),),
    "unit_interval": (Rule(lambda v: 0.0 <= v <= 1.0, "{flag} must be in [0, 1], got {value}."),),
    "below_one": (Rule(lambda v: 0.0 <= v < 1.0, "{flag} must be in [0, 1), got {value}."),),
    "open_unit_interval": (Rule(lambda v: 0.0 < v < 1.0, "{flag} must be in (0, 1), got {value}."),),
    "half_turn": (Rule(lambda v: 0.0 <= v <= 0.5, "{flag} must be in [0, 0.5], got {value}."),),  # a hue shift
    "device": (Rule(_valid_device, f"{{flag}} must be {DEVICES_HELP}, got '{{value}}'."),),
    "increasing_pair": (Rule(lambda v: len(v) == 2 and 0 < v[0] <= v[1],
                             "{flag} must be two positive numbers MIN MAX with MIN <= MAX, got {listed}."),),
    "mask_ratio": (Rule(lambda v: len(v) == 2 and 0.0 <= v[0] <= v[1] < 1.0,
                        "{flag} takes MIN MAX with 0 <= MIN <= MAX < 1 (shares of the patches masked), "
                        "got {listed}."),),
    "area_shares": (
        Rule(lambda v: len(v) == 2, "{flag} takes two numbers MIN MAX, got {listed}."),
        Rule(lambda v: v[0] <= v[1],
             "{flag} has MIN {value[0]} greater than MAX {value[1]}; give the smaller share of the image first."),
        Rule(lambda v: 0.0 < v[0] and v[1] <= 1.0,
             "{flag} values are shares of the image area and must lie in (0, 1], got {value[0]} {value[1]}."),
    ),
}
CHOICE_SAYS = "{flag} must be one of {choices}, got '{value}'."
NOT_A_RECIPE_SETTING = object()  # `reference` of a setting the recipe never decides


@dataclass(frozen=True)
class SettingInfo:
    """What a field declares beside its default (see `setting_field`)."""

    reference: Any = NOT_A_RECIPE_SETTING
    maximum: float | None = None
    check: str | None = None
    choices: tuple[str, ...] | None = None
    says: str | None = None
    help: str | None = None
    resume_help: str | None = None

    @property
    def is_recipe_setting(self) -> bool:
        """Whether the recipe decides this setting when it is left unset (its default is then None)."""
        return self.reference is not NOT_A_RECIPE_SETTING

    def rules(self) -> tuple[Rule, ...]:
        """The rules a set (not None) value must meet, in order; each element of a tuple meets `choices`."""
        if self.choices is not None:
            return (Rule(lambda v: all(item in self.choices for item in _items(v)), self.says or CHOICE_SAYS),)
        rules = CHECKS[self.check] if self.check else ()
        return (Rule(rules[0].accepts, self.says),) if self.says else rules


def _items(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def problem(name: str, info: SettingInfo, value: Any) -> str | None:
    """The sentence for the first rule of `info` that `value` breaks, or None when it meets them all.

    Args:
        name: the field name (`koleo_weight`).
        info: the field's declaration.
        value: its value; None (unset) meets every rule.
    """
    if value is None:
        return None
    for rule in info.rules():
        if not rule.accepts(value):
            shown = next((item for item in _items(value) if item not in info.choices), value) if info.choices else value
            return rule.says.format(flag="--" + name.replace("_", "-"), name=name, value=shown,
                                    listed=list(value) if isinstance(value, tuple) else value,
                                    choices=", ".join(info.choices or ()))
    return None


def setting_field(
    default: Any,
    *,
    reference: Any = NOT_A_RECIPE_SETTING,
    maximum: float | None = None,
    check: str | None = None,
    choices: tuple[str, ...] | None = None,
    says: str | None = None,
    help: str | None = None,
    resume_help: str | None = None,
) -> Any:
    """A configuration field that carries its declaration (read back with `info_of`).

    Args:
        default: the value when nothing sets it (None for a recipe setting: the recipe decides).
        reference: makes it a recipe setting, with this value under `--recipe reference` (None: no single value,
            as for the lr's linear scaling rule).
        maximum: the largest value dinopre accepts: far beyond any real run, low enough that a typo cannot make
            it allocate gigabytes or loop for ages.
        check: the name of a check in `CHECKS` a set value must pass.
        choices: the values it may take (each element, for a tuple).
        says: the check's or the choices' error sentence, where it differs from the usual one.
        help: the help of its `dinopre train` option (Rich markup: `\\[` for a literal bracket).
        resume_help: the help of its `dinopre resume` option, for the settings a resume may change.

    Raises:
        ValueError: an unknown check, both a check and choices, or `says` for a check of several rules.
    """
    if check is not None and check not in CHECKS:
        raise ValueError(f"unknown check {check!r}; choose one of {', '.join(CHECKS)}")
    if check is not None and choices is not None:
        raise ValueError("a setting takes a check or choices, not both")
    if says is not None and check is not None and len(CHECKS[check]) > 1:
        raise ValueError(f"the check {check!r} has several sentences; `says` cannot replace them")
    info = SettingInfo(reference, maximum, check, choices, says, help, resume_help)
    return dataclasses.field(default=default, metadata={SettingInfo: info})


def info_of(field: dataclasses.Field) -> SettingInfo:
    """The declaration of a configuration field (an empty one for a field declared without `setting_field`)."""
    return field.metadata.get(SettingInfo, SettingInfo())
