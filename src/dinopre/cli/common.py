"""What the commands of `dinopre` share: the choices of enumerated settings, help panels, the error exit.

Imports no torch: `dinopre --help` and shell completion build every command from these.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any, NoReturn, ParamSpec, TypeVar

import typer

from dinopre.base.errors import UserError
from dinopre.config.presets import PRESETS
from dinopre.config.settings import (
    ALGORITHMS,
    AUGMENT_PLACES,
    BEST_BY,
    CENTERINGS,
    MASK_SHAPES,
    PRECISIONS,
    RECIPES,
    TEACHER_VIEWS,
)

P = ParamSpec("P")
R = TypeVar("R")

DATA, MODEL, OPTIM, METHOD, EVAL, RUN = ("Data", "Model", "Optimization", "Method", "Evaluation",
                                        "Output and hardware")


def _choices(name: str, values: Iterable[str]) -> Any:
    """A str Enum of a setting's allowed values, built from the settings module's list so that the options' choices and
    the config's validation can never disagree."""
    return Enum(name, {value: value for value in values}, type=str)


Preset = _choices("Preset", PRESETS)
Algorithm = _choices("Algorithm", ALGORITHMS)
MaskShape = _choices("MaskShape", MASK_SHAPES)
AugmentOn = _choices("AugmentOn", AUGMENT_PLACES)
Recipe = _choices("Recipe", RECIPES)
TeacherView = _choices("TeacherView", TEACHER_VIEWS)
Centering = _choices("Centering", CENTERINGS)
BestBy = _choices("BestBy", BEST_BY)
Precision = _choices("Precision", PRECISIONS)


class Weights(str, Enum):
    teacher = "teacher"
    student = "student"


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one error sentence on stderr (unless it is empty) and exit."""
    if message:
        typer.secho(f"Error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def user_errors(message: Callable[[UserError], str] = str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A decorator: a `UserError` out of the function becomes one printed sentence and exit code 2, no traceback.

    Args:
        message: the sentence to print for an error (training names the process it happened in).
    """

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)  # Typer reads the command's options from the wrapped signature
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return function(*args, **kwargs)
            except UserError as exc:
                fail(message(exc))

        return run

    return decorate


def settings_given(options: dict[str, Any]) -> dict[str, Any]:
    """The configuration settings among a command's options that the user gave (every option named like a
    setting is one: the options and the configuration cannot drift apart)."""
    from dinopre.config.settings import FIELD_SECTION

    return {key: value.value if isinstance(value, Enum) else value
            for key, value in options.items() if key in FIELD_SECTION and value is not None}
