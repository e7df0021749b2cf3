"""The regularisers a run can add to the DINO/iBOT loss, in order. Torch-free: the terminal output and the plots
read the loss names from here without importing torch.

Each name is both the loss key the regulariser logs and the module of this package that implements it; that
module's `build(config)` returns the regulariser, or None when the configuration leaves it off. Adding one is its
module, one line here, and its weight in the configuration.

The order is part of every run's numbers: the regularisers' training-only heads draw their initial weights from the
global torch generator in this order (after the backbone, before the DINO heads), and their terms are added to the
total in this order.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dinopre.config.settings import PretrainConfig
    from dinopre.model.regularisers.regulariser import Regulariser

REGULARISERS = (
    "koleo",  # DINOv2's KoLeo: spreads the student's features apart
    "contrast",  # SimCLR's InfoNCE between the global views, through a projection head
    "drloc",  # Drloc: where two patch tokens lie relative to each other, through a localisation head
)


def build_regularisers(config: PretrainConfig) -> list[Regulariser]:
    """The regularisers a configuration turns on, in registry order (their heads' weights drawn in that order)."""
    built = (import_module(f"{__package__}.{name}").build(config) for name in REGULARISERS)
    return [regulariser for regulariser in built if regulariser is not None]
