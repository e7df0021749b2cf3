"""A training checkpoint's contents, typed: `TrainingState` is the one writer and the one reader of them.

The engine builds a `TrainingState` from its run and saves `to_dict()`; resuming, exporting and inspecting read a
file through `load_training_checkpoint`, i.e. `TrainingState.from_dict`, which checks the whole dict
(`files.schema`) before anything reads a value. The dict keeps format 1's keys, values and order, so files written
before this class existed load (optional keys they lack get the value their absence always meant), and files it
writes load in those versions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dinopre import __version__
from dinopre.base.errors import CheckpointError, UserError
from dinopre.config.loading import config_from_dict
from dinopre.files.checkpoint import FORMAT_VERSION, KIND_TRAINING, load_file
from dinopre.files.schema import check_centers, check_loss_sums, check_training_state

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class RankShare:
    """One training process's own part of a checkpoint of a multi-process run.

    Attributes:
        rng: its global generator states (`runtime.rng_state`).
        loss_sums: its partial loss sums of the epoch in progress.
    """

    rng: Tensors
    loss_sums: Tensors


@dataclass(frozen=True, kw_only=True)
class TrainingState:
    """Everything needed to continue a run, as tensors and plain values (loadable with `weights_only=True`).

    Attributes:
        config: the run's configuration (`config_to_dict`).
        epoch: completed epochs.
        step_in_epoch: steps done in the epoch in progress.
        global_step: steps done in the run.
        student: the student's state dict (backbone and heads).
        teacher: the teacher's state dict.
        loss: the losses' centers (`StudentTeacher.loss_state`).
        loss_sums: the loss sums of the epoch in progress (the processes' mean with several).
        optimizer: the optimizer's state dict.
        rng: the main process's generator states.
        best_loss: the lowest epoch mean loss so far (inf before the first epoch ends).
        best_epoch: the 1-based epoch of checkpoint_best.pt (0: none yet).
        epoch_losses: each completed epoch's mean loss.
        epoch_parts: each completed epoch's mean loss parts.
        best_knn: the best k-NN accuracy so far, if any.
        recipe: {setting: reason} of what the recipe derived; None in files written before recipes existed.
        evaluations: one record per completed epoch (signals, k-NN, collapse verdict).
        data: the fingerprint of the training images (`DataFingerprint.to_state`); empty in older files.
        world_size: the training processes that wrote it.
        trackers: {tracker: run id} of the experiment trackers a resume continues.
        ranks: each process's own share, in rank order, when several processes wrote it.
        format_version: the file format.
        dinopre_version: the dinopre that wrote it (None if the file does not say).
    """

    config: dict[str, Any]
    epoch: int
    step_in_epoch: int
    global_step: int
    student: Tensors
    teacher: Tensors
    loss: Tensors
    loss_sums: Tensors
    optimizer: dict[str, Any]
    rng: Tensors
    best_loss: float
    best_epoch: int
    epoch_losses: list[float]
    epoch_parts: list[dict[str, float]]
    best_knn: float | None = None
    recipe: dict[str, str] | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    trackers: dict[str, str] = field(default_factory=dict)
    ranks: list[RankShare] | None = None
    format_version: int = FORMAT_VERSION
    dinopre_version: str | None = __version__

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint's contents, as `torch.save` writes them (the values are not copied)."""
        raw: dict[str, Any] = {"kind": KIND_TRAINING, "format_version": self.format_version}
        if self.dinopre_version is not None:
            raw["dinopre_version"] = self.dinopre_version
        raw.update(config=self.config, epoch=self.epoch, step_in_epoch=self.step_in_epoch,
                   global_step=self.global_step, student=self.student, teacher=self.teacher, loss=self.loss,
                   loss_sums=self.loss_sums, optimizer=self.optimizer, rng=self.rng, best_loss=self.best_loss,
                   best_epoch=self.best_epoch, epoch_losses=self.epoch_losses, epoch_parts=self.epoch_parts,
                   best_knn=self.best_knn)
        if self.recipe is not None:
            raw["recipe"] = self.recipe
        raw.update(evaluations=self.evaluations, data=self.data, world_size=self.world_size, trackers=self.trackers)
        if self.ranks is not None:
            raw["ranks"] = [{"rng": share.rng, "loss_sums": share.loss_sums} for share in self.ranks]
        return raw

    @classmethod
    def from_dict(cls, raw: dict[str, Any], path: Any) -> TrainingState:
        """Check a loaded checkpoint and type it.

        Args:
            raw: what `torch.load` gave.
            path: the file, for messages.

        Raises:
            CheckpointError: not a dinopre training checkpoint, a part missing or wrong (`SchemaError`), written by
                a newer format version, or holding a configuration this dinopre cannot use.
        """
        if raw.get("kind") != KIND_TRAINING:
            raise CheckpointError(f"'{path}' is not a dinopre training checkpoint.")
        check_training_state(raw, path)
        if raw["format_version"] > FORMAT_VERSION:
            raise CheckpointError(f"'{path}' was written by a newer dinopre (format {raw['format_version']}); "
                                  "upgrade dinopre to read it.")
        _check_config(raw["config"], path)
        required = {name: raw[name] for name in _REQUIRED}
        ranks = raw.get("ranks")
        return cls(**required, best_knn=raw.get("best_knn"), recipe=raw.get("recipe"),
                   evaluations=raw.get("evaluations", []), data=raw.get("data", {}),
                   world_size=raw.get("world_size", 1), trackers=raw.get("trackers") or {},
                   ranks=None if ranks is None else [RankShare(rng=s["rng"], loss_sums=s["loss_sums"]) for s in ranks],
                   dinopre_version=raw.get("dinopre_version"))

    def share(self, rank: int, world_size: int) -> tuple[Tensors | None, Tensors]:
        """The generator states and partial loss sums process `rank` of `world_size` continues with.

        On as many processes as wrote it, each takes back its own, so the continuation is bit for bit the
        uninterrupted run. On another number, the loss sums of the epoch in progress are the processes' mean (the
        epoch's mean loss comes out the same) and only the main process takes a generator state back (it drives
        only drop path; the data and augmentation draws are keyed by sample).
        """
        if self.ranks is not None and len(self.ranks) == world_size:
            share = self.ranks[rank]
            return share.rng, share.loss_sums
        return (self.rng if rank == 0 else None), self.loss_sums

    def check_loss_sums(self, path: Any, names: tuple[str, ...] | list[str]) -> None:
        """Check that the partial loss sums (the main process's and each process's own) are of the losses the
        configuration that continues them computes.

        Raises:
            SchemaError: sums of other losses, or none in an epoch under way.
        """
        for sums in (self.loss_sums, *(share.loss_sums for share in self.ranks or ())):
            check_loss_sums(sums, names, path, in_epoch=self.step_in_epoch > 0)

    def check_centers(self, path: Any, out_dim: int, patch_out_dim: int | None) -> None:
        """Check that the loss centers have the prototype counts of the configuration that continues them.

        Raises:
            SchemaError: a center of another width.
        """
        check_centers(self.loss, path, out_dim, patch_out_dim)


# The keys every training checkpoint has (`check_training_state` refuses a file without one of them).
_REQUIRED = ("format_version", "config", "epoch", "step_in_epoch", "global_step", "student", "teacher", "loss",
             "loss_sums", "optimizer", "rng", "best_loss", "best_epoch", "epoch_losses", "epoch_parts")


def _check_config(config: dict[str, Any], path: Any) -> None:
    """Refuse a configuration this dinopre cannot build (an unknown setting, a value out of range)."""
    try:
        config_from_dict(config)
    except (UserError, KeyError, TypeError, AttributeError, ValueError) as exc:
        raise CheckpointError(f"'{path}' holds a configuration this dinopre cannot use ({_first_line(exc)}).") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def load_training_checkpoint(path: str | Path) -> TrainingState:
    """Load and check a training checkpoint written by `dinopre train`.

    Raises:
        CheckpointError: unreadable, not a dinopre training checkpoint, or written by a newer format version.
    """
    return TrainingState.from_dict(load_file(path), path)
