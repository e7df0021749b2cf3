"""A run while it trains: what it was asked to do (`RunRequest`), what it trains with, and its progress (`Run`).

Every part of the training package reads and updates the run through `Run`: the engine's loop, the step, the end
of an epoch and the checkpoints (whose `TrainingState` is built from it and restores it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dinopre.base.events import Reporter
from dinopre.base.signals import StopSignals
from dinopre.config.settings import PretrainConfig
from dinopre.data.dataset import ImageSource
from dinopre.files.rundir import RunDirectory
from dinopre.model.method import StudentTeacher
from dinopre.model.schedules import epochs_to_steps
from dinopre.train.build import RunParts
from dinopre.train.evaluation import Evaluator
from dinopre.train.hooks import RunContext, RunHooks
from dinopre.train.runtime import Runtime
from dinopre.train.trackers import Trackers


@dataclass(frozen=True, kw_only=True)
class RunRequest:
    """What the caller of `fit` asked for besides the configuration.

    Attributes:
        started: `time.perf_counter()` when `fit` was called (the run's duration counts from there).
        overwrite: start over in an output folder that already holds a run.
        resume_from: the training checkpoint (or run directory) to continue, if any.
        inputs: files the command read (its config file), which the run must never write over.
    """

    started: float
    overwrite: bool = False
    resume_from: Path | None = None
    inputs: tuple[Path, ...] = ()

    @property
    def protected(self) -> list[Path]:
        """Files an export must not replace: the inputs and the checkpoint being continued."""
        return [*self.inputs, *([self.resume_from] if self.resume_from is not None else [])]


@dataclass(kw_only=True)
class Run:
    """Everything a run needs while it loops, and the progress that checkpoints save."""

    parts: RunParts
    files: RunDirectory
    reporter: Reporter
    stop: StopSignals
    request: RunRequest
    evaluator: Evaluator | None = None  # the main process's (the others do not evaluate)
    trackers: Trackers | None = None  # the main process's experiment trackers
    hooks: tuple[RunHooks, ...] = ()  # the main process's (`train.hooks`)
    bad_files: dict[str, str] = field(default_factory=dict)  # {file: reason} of files that could not be used
    last_saved_step: int = -1
    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # steps done in the epoch in progress
    global_step: int = 0
    loss_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # of the epoch in progress
    epoch_losses: list[float] = field(default_factory=list)
    epoch_parts: list[dict[str, float]] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = -1  # of checkpoint_best.pt, 0-based
    best_knn: float | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # one record per completed epoch

    @property
    def config(self) -> PretrainConfig:
        return self.parts.config

    @property
    def method(self) -> StudentTeacher:
        return self.parts.method

    @property
    def runtime(self) -> Runtime:
        return self.parts.runtime

    @property
    def source(self) -> ImageSource:
        return self.parts.data.source

    @property
    def steps_per_epoch(self) -> int:
        return self.parts.steps_per_epoch

    @property
    def world_size(self) -> int:
        return self.parts.world_size

    @property
    def resumed(self) -> bool:
        """Whether the run continues a checkpoint."""
        return self.request.resume_from is not None

    @property
    def frozen_steps(self) -> int:
        """Steps at the start during which the prototype layer is not updated."""
        return epochs_to_steps(self.config.optim.freeze_last_layer_epochs, self.steps_per_epoch)

    def context(self) -> RunContext:
        """What the hooks see of the run now."""
        return RunContext(config=self.config, run_dir=self.files.path, source=self.source, device=self.runtime.device,
                          teacher=self.method.teacher["backbone"], trackers=self.trackers, resumed=self.resumed,
                          epoch=self.epoch, global_step=self.global_step)
