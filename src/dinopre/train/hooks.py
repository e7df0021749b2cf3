"""What code outside the engine may hang on a run: `RunHooks`, called at its start and at the end of each epoch.

The engine calls the hooks it is given without knowing what they do; pictures of the run (`dinopre.viz.run_pictures`:
views.png, the attention grids the trackers get) are such hooks, built by the command line and passed to `fit`, so
the training core imports no drawing code. Hooks run on the main process only, between the engine's own writes, and
must not draw from the global random generator (a resumed run would no longer be the uninterrupted one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from dinopre.config.settings import PretrainConfig
from dinopre.data.dataset import ImageSource
from dinopre.train.evaluation import is_eval_epoch
from dinopre.train.trackers import Trackers


@dataclass(frozen=True, kw_only=True)
class RunContext:
    """What a hook sees of the run when it is called.

    Attributes:
        config: the complete configuration.
        run_dir: the run directory (its lock is held by this process).
        source: the training images.
        device: where the run trains.
        teacher: the teacher's backbone (in eval mode; a hook must not change it).
        trackers: the experiment trackers (`--logger`), or None.
        resumed: whether the run continues a checkpoint.
        epoch: completed epochs.
        global_step: optimizer steps done.
    """

    config: PretrainConfig
    run_dir: Path
    source: ImageSource
    device: torch.device
    teacher: nn.Module
    trackers: Trackers | None
    resumed: bool
    epoch: int
    global_step: int

    @property
    def eval_epoch(self) -> bool:
        """Whether the epoch just completed is one of the --eval-every epochs (the last one always is)."""
        return is_eval_epoch(self.config, self.epoch)


class RunHooks(Protocol):
    """Something a run calls at its start and at the end of each epoch, and closes when it ends."""

    def on_run_start(self, context: RunContext) -> None:
        """After params.json is written, before the run is announced (`RunStarted`) and the first step."""

    def on_epoch_end(self, context: RunContext) -> None:
        """After the epoch's checkpoint is written and `EpochEnded` is sent, before a collapse warning."""

    def close(self) -> None:
        """When the run ends, however it ends, before the trackers close and the run directory is let go."""
