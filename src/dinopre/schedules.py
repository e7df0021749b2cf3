"""Per-step schedules of the DINO recipe, as arrays indexed by global step (dino utils.py `cosine_scheduler`).

- learning rate: linear warmup from 0 over `warmup_epochs`, then cosine to `min_lr`;
- weight decay: cosine from `weight_decay` up to `weight_decay_end`;
- teacher EMA momentum: cosine from `teacher_momentum_base` to `teacher_momentum_final`;
- teacher temperature: per epoch, linear from `warmup_teacher_temp` to `teacher_temp` over
  `warmup_teacher_temp_epochs`, then constant (dino main_dino.py `DINOLoss`);
- iBOT teacher patch temperature: the same shape with its own values (ibot main_ibot.py `iBOTLoss`).
Every schedule is defined over the run's total number of epochs; past the end it holds its final value
(dinov2 `CosineScheduler`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dinopre.config import PretrainConfig


class Schedule:
    """A per-step value table that holds its last value past the end."""

    def __init__(self, values: np.ndarray) -> None:
        if len(values) == 0:
            raise ValueError("A schedule needs at least one step.")
        self.values = values.astype(np.float64)

    def __call__(self, step: int) -> float:
        return float(self.values[min(step, len(self.values) - 1)])

    def __len__(self) -> int:
        return len(self.values)


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0
) -> Schedule:
    """Linear warmup (endpoints included, as dino) then a half cosine from `base` to `final`.

    Args:
        base: value at the end of warmup.
        final: value at the last step.
        total_steps: length of the schedule.
        warmup_steps: steps of linear warmup from `warmup_start`; a warmup longer than the run is cut off where
            the run ends (the value keeps rising at the same rate and never reaches `base`).
        warmup_start: first value of the warmup.
    """
    warmup = np.linspace(warmup_start, base, warmup_steps)[:total_steps] if warmup_steps > 0 else np.array([])
    steps = np.arange(total_steps - len(warmup))
    span = max(len(steps), 1)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / span))
    return Schedule(np.concatenate([warmup, cosine]))


def teacher_temp_schedule(
    warmup_temp: float, final_temp: float, warmup_epochs: int, epochs: int, steps_per_epoch: int
) -> Schedule:
    """dino's per-epoch teacher temperature, expanded to steps: linspace over warmup epochs, then constant."""
    warmup = np.linspace(warmup_temp, final_temp, warmup_epochs)[:epochs]  # cut off like the lr warmup
    per_epoch = np.concatenate([warmup, np.full(epochs - len(warmup), final_temp)])
    return Schedule(np.repeat(per_epoch, steps_per_epoch))


@dataclass(frozen=True)
class Schedules:
    """All per-step schedules of a run."""

    lr: Schedule
    weight_decay: Schedule
    momentum: Schedule
    teacher_temp: Schedule
    teacher_patch_temp: Schedule | None = None  # iBOT only

    def at(self, step: int) -> dict[str, float]:
        """Every scheduled value at a global step."""
        values = {
            "lr": self.lr(step),
            "weight_decay": self.weight_decay(step),
            "momentum": self.momentum(step),
            "teacher_temp": self.teacher_temp(step),
        }
        if self.teacher_patch_temp is not None:
            values["teacher_patch_temp"] = self.teacher_patch_temp(step)
        return values


def build_schedules(config: PretrainConfig, steps_per_epoch: int) -> Schedules:
    """The schedules of a run with `steps_per_epoch` optimizer steps per epoch."""
    o, m = config.optim, config.method
    total = o.epochs * steps_per_epoch
    return Schedules(
        lr=cosine_schedule(config.peak_learning_rate, o.min_lr, total, o.warmup_epochs * steps_per_epoch),
        weight_decay=cosine_schedule(o.weight_decay, o.weight_decay_end, total),
        momentum=cosine_schedule(m.teacher_momentum_base, m.teacher_momentum_final, total),
        teacher_temp=teacher_temp_schedule(
            m.warmup_teacher_temp, m.teacher_temp, m.warmup_teacher_temp_epochs, o.epochs, steps_per_epoch
        ),
        teacher_patch_temp=teacher_temp_schedule(
            m.warmup_teacher_patch_temp, m.teacher_patch_temp, m.warmup_teacher_patch_temp_epochs, o.epochs,
            steps_per_epoch,
        ) if m.algorithm == "ibot" else None,
    )
