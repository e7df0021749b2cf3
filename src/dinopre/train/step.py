"""One optimizer step of DINO or iBOT, and what the loop records of its steps: log lines and unusable files."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dinopre.base import distributed
from dinopre.base.errors import DataError, TrainingStopped
from dinopre.base.events import StepLogged
from dinopre.data.blank import is_blank_reason
from dinopre.data.dataset import EXHAUSTED
from dinopre.model.method import StudentTeacher
from dinopre.model.optim import apply_schedules, cancel_gradients, clip_gradients_per_tensor
from dinopre.train.run import Run
from dinopre.train.runtime import Runtime


def train_step(
    method: StudentTeacher,
    optimizer: torch.optim.Optimizer,
    batch: Any,
    values: dict[str, float],
    *,
    runtime: Runtime,
    clip_grad_norm: float,
    freeze_last_layer: bool,
    diagnostics: bool = False,
    on_phase: Callable[[str], None] | None = None,
    model: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """One optimizer step of DINO or iBOT; returns the detached loss parts (no host synchronisation).

    `on_phase`, when given, is called with "forward", "backward", "optimizer" and "teacher" as each phase ends
    (benchmarks/bench.py times the phases with it; training leaves it None). `model` is what the forward calls:
    the method in DistributedDataParallel when several processes train (`build.RunParts.model`).
    """
    mark = on_phase or (lambda phase: None)
    # apply schedules; during a head warm-up (--init-from) the backbone's share is 0
    backbone_scale = values.get("backbone_scale", 1.0)
    apply_schedules(optimizer, values["lr"], values["weight_decay"], backbone_scale)
    # forward and losses (trunk in autocast, loss maths in fp32)
    with runtime.autocast():
        losses = (model or method)(batch, values["teacher_temp"], values.get("teacher_patch_temp"),
                                   diagnostics=diagnostics)
    mark("forward")
    # backward, clip, step (dino order: clip, then cancel the last layer's gradients)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    mark("backward")
    if clip_grad_norm > 0:
        clip_gradients_per_tensor(method.trainable_parameters(), clip_grad_norm)
    if freeze_last_layer:
        cancel_gradients(method.last_layer_parameters())
    if backbone_scale == 0.0:
        # Frozen by dropping its gradients, not by requires_grad (which DDP does not allow to change after it
        # wraps the model): AdamW then skips the backbone entirely, weight decay and moments included, so its
        # moments start at the first step it trains.
        cancel_gradients(method.backbone_parameters())
    optimizer.step()
    if backbone_scale != 0.0:  # a frozen backbone has no constraint to restore (and keeps the source's bits)
        method.constrain()
    mark("optimizer")
    # teacher EMA
    method.update_teacher(values["momentum"], backbone=backbone_scale != 0.0)
    mark("teacher")
    return {name: value.detach() for name, value in losses.items()}


@dataclass
class LogWindow:
    """Counters between two log lines."""

    start: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    images: int = 0


def log_step(run: Run, epoch: int, losses: dict[str, torch.Tensor], values: dict[str, float],
             window: LogWindow) -> None:
    """Write the step's metrics line and send `StepLogged`; stop all processes on a non-finite loss.

    Raises:
        TrainingStopped: a loss part is not finite (every process raises it at this step).
    """
    metrics = mean_over_processes(losses)  # the one host sync per log interval
    if not all(math.isfinite(v) for v in metrics.values()):
        parts = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        raise distributed.mark_collective(TrainingStopped(
            f"The loss became non-finite at step {run.global_step} (epoch {epoch + 1}): {parts}. The last good "
            f"checkpoint in '{run.files.path}' is kept; lower --learning-rate or --teacher-temp, or use "
            "--precision fp32."
        ))
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    metrics.update(values)
    metrics["images_per_sec"] = window.images / elapsed
    metrics["data_wait"] = min(1.0, window.data_wait / elapsed)
    run.files.append_metrics({"type": "step", "epoch": epoch + 1, "step": run.global_step, **metrics})
    total_steps = run.steps_per_epoch * run.config.optim.epochs
    run.reporter.emit(StepLogged(epoch=epoch, epochs=run.config.optim.epochs, step_in_epoch=run.step_in_epoch,
                                 steps_per_epoch=run.steps_per_epoch, global_step=run.global_step,
                                 total_steps=total_steps, metrics=metrics))


def mean_over_processes(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Floats of the processes' mean of each value (each process's own values in a single process)."""
    if len(values) == 0 or distributed.launch() is None:
        return {name: float(value) for name, value in values.items()}
    stacked = distributed.all_reduce_mean(torch.stack([value.float() for value in values.values()]))
    return dict(zip(values, stacked.tolist()))


def note_bad_files(run: Run, records: list[tuple[int, str]]) -> None:
    """Remember files of a batch that could not be decoded or were blank; stop with --strict-data (at a file that
    could not be decoded) or when the data is broken.

    Raises:
        DataError: --strict-data, or every file tried for one image failed.
    """
    good_records = [(index, reason) for index, reason in records if index != EXHAUSTED]
    for index, reason in good_records:
        run.bad_files[run.source.describe(index)] = reason
    broken = [(index, reason) for index, reason in good_records if not is_blank_reason(reason)]
    if run.config.data.strict_data and broken:  # a blank image is left out, not an error
        name, reason = run.source.describe(broken[0][0]), broken[0][1]
        raise DataError(f"'{name}' cannot be used ({reason}); fix or remove it, or drop --strict-data to skip "
                        "such files.")
    if len(good_records) < len(records):
        example, reason = run.source.describe(good_records[0][0]), good_records[0][1]
        tried = next(r for i, r in records if i == EXHAUSTED)
        raise DataError(f"For one image {tried.removeprefix('none of ').split(' files')[0]} files were tried and "
                        f"none could be decoded (e.g. '{example}': {reason}); the training folder looks broken.")
