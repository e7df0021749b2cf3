"""Helpers shared by test modules (`from helpers import ...`; tests/ is on sys.path through conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dinopre.config.loading import build_config
from dinopre.config.settings import PretrainConfig


class Recorder:
    """A reporter that keeps every event."""

    def __init__(self) -> None:
        self.events: list[object] = []

    def emit(self, event: object) -> None:
        self.events.append(event)


def face_config(settings: dict[str, Any], folder: Path, **extra: Any) -> PretrainConfig:
    """The `face` preset with command-line style `settings`, training on `folder`; `extra` settings win."""
    return build_config("face", cli_settings={**settings, "train_dir": [str(folder)], **extra})
