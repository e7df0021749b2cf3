"""Tests of the regulariser registry (dinopre.model.regularisers.registry): names, modules, order, no torch."""

from __future__ import annotations

import subprocess
import sys
from importlib import import_module

import pytest

from dinopre.config.loading import build_config
from dinopre.config.recipe import resolve
from dinopre.config.settings import PretrainConfig
from dinopre.model.regularisers.registry import REGULARISERS, build_regularisers

ALL_ON = {"koleo_weight": 0.1, "contrast_weight": 0.5, "drloc_weight": 0.25}


def config(**settings: float) -> PretrainConfig:
    """A tiny face demo config under the reference recipe (every regulariser off unless set)."""
    tiny = {"vit_embed_dim": 32, "vit_depth": 2, "vit_num_heads": 2, "recipe": "reference", **settings}
    return resolve(build_config("face", demo=True, cli_settings=tiny), num_images=512).config


def test_every_name_is_a_module_whose_regulariser_logs_under_that_name() -> None:
    built = build_regularisers(config(**ALL_ON))
    assert [r.name for r in built] == list(REGULARISERS)  # registry order: the heads' and the terms' order
    assert [r.weight for r in built] == [ALL_ON[f"{name}_weight"] for name in REGULARISERS]
    for name in REGULARISERS:
        assert callable(import_module(f"dinopre.model.regularisers.{name}").build)


@pytest.mark.parametrize("name", REGULARISERS)
def test_a_regulariser_is_built_only_when_its_weight_is_positive(name: str) -> None:
    assert build_regularisers(config()) == []
    assert [r.name for r in build_regularisers(config(**{f"{name}_weight": ALL_ON[f"{name}_weight"]}))] == [name]


def test_the_names_are_importable_without_torch() -> None:
    """The live display and the plots list the loss parts from the registry; `dinopre --help` must stay instant."""
    code = ("import sys; from dinopre.model.regularisers.registry import REGULARISERS; import dinopre.progress; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
