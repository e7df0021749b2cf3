"""The data pipeline of a run (dinopre.data.pipeline): where the views are rendered, and what that changes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import Recorder, face_config

from dinopre.config.loading import build_config
from dinopre.data.pipeline import augments_on_device
from dinopre.train.engine import fit


def test_views_are_rendered_on_the_device_unless_workers_are_asked_for() -> None:
    assert augments_on_device(build_config("face", cli_settings={"train_dir": ["d"]}))
    assert not augments_on_device(build_config("face", cli_settings={"train_dir": ["d"], "augment_on": "workers"}))


def test_views_rendered_on_the_device_train_like_views_rendered_in_workers(tiny_settings: dict, face_folder: Path,
                                                                           tmp_path: Path) -> None:
    """`--augment-on device` uses the batch renderer (recorded in params.json); the same draws give nearly the
    same losses, not identical ones (resampling differs)."""
    losses = {}
    for place in ("workers", "device"):
        out = tmp_path / place
        losses[place] = fit(face_config(tiny_settings, face_folder, augment_on=place, output_dir=str(out)),
                            Recorder()).epoch_losses
        assert json.loads((out / "params.json").read_text())["environment"]["augment_on"] == place
    assert losses["workers"] != losses["device"]
    assert losses["device"] == pytest.approx(losses["workers"], rel=0.02)
