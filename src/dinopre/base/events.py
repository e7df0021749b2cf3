"""What the engine tells the outside world while it runs: event records, the Reporter protocol and NullReporter.

The engine never prints, so that it runs the same under a terminal, a log file or a test; it emits these plain
records and `dinopre.progress` renders them. Imports no torch, so reporters stay light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the base layer names the configuration's type but never imports the config layer
    from dinopre.config.settings import PretrainConfig


@dataclass(frozen=True, kw_only=True)
class RunStarted:
    config: PretrainConfig
    run_dir: Path
    num_images: int
    data_description: str
    steps_per_epoch: int
    total_steps: int
    device: str
    precision: str
    num_workers: int
    parameters: dict[str, int]
    resumed_from: Path | None = None  # the checkpoint a resumed run continues
    start_step: int = 0  # global steps already done
    warnings: tuple[str, ...] = ()  # settings known to go wrong, problems found while scanning
    augment_on: str = "workers"  # where the views are rendered: "workers" or "device"
    recipe_notes: tuple[str, ...] = ()  # `out_dim 1024 (2,000 images)`: what the recipe derived, and why
    init_notes: tuple[str, ...] = ()  # where an --init-from run starts: the source, what was folded or loaded


@dataclass(frozen=True)
class ScanProgress:
    images_found: int
    done: bool


@dataclass(frozen=True, kw_only=True)
class Stopped:
    """The run stopped on a signal after saving a checkpoint."""

    signal_name: str
    global_step: int
    checkpoint: Path


@dataclass(frozen=True, kw_only=True)
class StepLogged:
    epoch: int  # 0-based
    epochs: int
    step_in_epoch: int  # steps done in this epoch
    steps_per_epoch: int
    global_step: int  # steps done in the run
    total_steps: int
    metrics: dict[str, float]


@dataclass(frozen=True, kw_only=True)
class EpochEnded:
    epoch: int  # 0-based
    epochs: int
    loss: float
    is_best: bool
    seconds: float
    images_per_sec: float
    parts: dict[str, float]  # epoch means of the loss and its parts
    evaluation: dict[str, Any] = field(default_factory=dict)  # label-free signals, k-NN, collapse verdict
    global_step: int = 0  # steps done in the run at the end of this epoch


@dataclass(frozen=True, kw_only=True)
class CollapseWarning:
    """The epoch's signals say the run has collapsed; `message` says which way and what to change."""

    epoch: int  # 0-based
    verdict: str  # "uniform" or "one-hot"
    message: str


@dataclass(frozen=True, kw_only=True)
class CheckpointSaved:
    path: Path
    epoch: int  # completed epochs
    global_step: int
    mid_epoch: bool


@dataclass(frozen=True, kw_only=True)
class RunFinished:
    run_dir: Path
    best_loss: float
    best_epoch: int  # 0-based
    last_checkpoint: Path
    best_checkpoint: Path
    export_path: Path | None
    seconds: float
    bad_files: int = 0
    bad_files_report: Path | None = None
    best_by: str = "loss"  # what chose checkpoint_best.pt
    best_knn: float | None = None
    blank_files: int = 0  # blank crops left out (at scan time or when decoded)
    blank_files_report: Path | None = None


@dataclass(frozen=True)
class ScoringProgress:
    """`dinopre eval` at work: `done` of `total` images of one task (decoding at a size, or embedding by a backbone)."""

    task: str  # e.g. "decoding at 112 px", "embedding by backbone.pt"
    done: int
    total: int


@dataclass(frozen=True)
class Notice:
    """One sentence about the run's surroundings: a wait for the other processes, a tracker connecting, failing or
    starting a new run. `warning` when something did not go as asked (training goes on)."""

    message: str
    warning: bool = False


class Reporter(Protocol):
    """Receives the engine's events (ScanProgress, RunStarted, StepLogged, EpochEnded, CollapseWarning,
    CheckpointSaved, Stopped, RunFinished, Notice), or those of `dinopre eval` (ScoringProgress)."""

    def emit(self, event: object) -> None: ...


class NullReporter:
    """Drops every event: `--quiet`, and the processes other than the main one, which report nothing."""

    def emit(self, event: object) -> None:
        pass

    def close(self) -> None:
        pass
