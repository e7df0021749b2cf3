"""Per-step schedules of the DINO recipe (dino utils.py `cosine_scheduler`), computed at the step asked for.

- learning rate: linear warmup from 0 over `warmup_epochs`, then cosine to `min_lr`;
- weight decay: cosine from `weight_decay` up to `weight_decay_end`;
- teacher EMA momentum: cosine from `teacher_momentum_base` to `teacher_momentum_final`;
- teacher temperature: linear from `warmup_teacher_temp` to `teacher_temp` over `warmup_teacher_temp_epochs`, then
  constant; per epoch under `--recipe reference` (dino main_dino.py `DINOLoss`), per step under `auto` (dinov2's
  per-iteration schedules, so a warmup may be a fraction of an epoch);
- iBOT teacher patch temperature: the same shape with its own values (ibot main_ibot.py `iBOTLoss`);
- the backbone's share of the lr with a head warm-up (`--init-from`): 0 while only the heads train, then a linear
  ramp to 1 over the lr warmup's length, so the backbone gets a warmup of its own from the step it joins.
Epoch counts may be fractional; a warmup of e epochs lasts round(e x steps per epoch) steps. Every schedule is
defined over the run's total number of epochs; past the end it holds its final value (dinov2 `CosineScheduler`).
Values are computed per step rather than tabulated (dino precomputes arrays), so a run of 10^9 steps costs no
memory; they equal dino's `np.linspace` / `np.cos` tables to the last bit or two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from dinopre.config.settings import PretrainConfig


class Schedule:
    """A value per step over `length` steps, holding its last value past the end."""

    def __init__(self, value_at: Callable[[int], float], length: int) -> None:
        if length < 1:
            raise ValueError("A schedule needs at least one step.")
        self._value_at, self._length = value_at, length

    def __call__(self, step: int) -> float:
        return float(self._value_at(min(max(step, 0), self._length - 1)))

    def __len__(self) -> int:
        return self._length


def _linspace(start: float, stop: float, num: int, index: int) -> float:
    """`np.linspace(start, stop, num)[index]` (endpoints included; the last value is exactly `stop`)."""
    if index == num - 1:
        return stop if num > 1 else start
    return start + index * ((stop - start) / (num - 1))


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
    warmup = min(max(warmup_steps, 0), total_steps)
    span = max(total_steps - warmup, 1)

    def value_at(step: int) -> float:
        if step < warmup:
            return _linspace(warmup_start, base, warmup_steps, step)
        return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (step - warmup) / span))

    return Schedule(value_at, total_steps)


def epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
    """Steps of a (possibly fractional) number of epochs."""
    return round(epochs * steps_per_epoch)


def teacher_temp_schedule(
    warmup_temp: float, final_temp: float, warmup_epochs: float, epochs: int, steps_per_epoch: int,
    per_step: bool = False,
) -> Schedule:
    """The teacher temperature per step: linear warmup, then constant.

    Per epoch (dino: a linspace over the warmup epochs, each value held for an epoch; the warmup epochs are rounded
    to whole epochs) or, with `per_step`, linear over the warmup's steps.
    """
    if per_step:
        steps = epochs_to_steps(warmup_epochs, steps_per_epoch)
        return Schedule(lambda step: _linspace(warmup_temp, final_temp, steps, step) if step < steps else final_temp,
                        epochs * steps_per_epoch)
    warmup = round(warmup_epochs)

    def value_at(step: int) -> float:
        epoch = step // steps_per_epoch
        return _linspace(warmup_temp, final_temp, warmup, epoch) if epoch < warmup else final_temp

    return Schedule(value_at, epochs * steps_per_epoch)


@dataclass(frozen=True)
class Schedules:
    """All per-step schedules of a run."""

    lr: Schedule
    weight_decay: Schedule
    momentum: Schedule
    teacher_temp: Schedule
    teacher_patch_temp: Schedule | None = None  # iBOT only
    backbone_scale: Schedule | None = None  # with a head warm-up only

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
        if self.backbone_scale is not None:
            values["backbone_scale"] = self.backbone_scale(step)
        return values


def backbone_scale_schedule(frozen_steps: int, ramp_steps: int, total_steps: int) -> Schedule:
    """0 for the first `frozen_steps` (the head warm-up), then rising linearly to 1 over `ramp_steps` steps (its
    first step already moves: (1 / ramp), ..., 1), then 1."""
    ramp = max(ramp_steps, 1)
    return Schedule(lambda step: 0.0 if step < frozen_steps else min(1.0, (step - frozen_steps + 1) / ramp),
                    total_steps)


def build_schedules(config: PretrainConfig, steps_per_epoch: int) -> Schedules:
    """The schedules of a run with `steps_per_epoch` optimizer steps per epoch."""
    o, m = config.optim, config.method
    total = o.epochs * steps_per_epoch
    per_step = m.recipe == "auto"
    warmup = epochs_to_steps(o.warmup_epochs, steps_per_epoch)
    head_warmup = epochs_to_steps(o.head_warmup_epochs or 0.0, steps_per_epoch)
    return Schedules(
        lr=cosine_schedule(config.peak_learning_rate, o.min_lr, total, warmup),
        weight_decay=cosine_schedule(o.weight_decay, o.weight_decay_end, total),
        momentum=cosine_schedule(m.teacher_momentum_base, m.teacher_momentum_final, total),
        teacher_temp=teacher_temp_schedule(
            m.warmup_teacher_temp, m.teacher_temp, m.warmup_teacher_temp_epochs, o.epochs, steps_per_epoch, per_step
        ),
        teacher_patch_temp=teacher_temp_schedule(
            m.warmup_teacher_patch_temp, m.teacher_patch_temp, m.warmup_teacher_patch_temp_epochs, o.epochs,
            steps_per_epoch, per_step,
        ) if m.algorithm == "ibot" else None,
        backbone_scale=backbone_scale_schedule(head_warmup, warmup, total) if head_warmup > 0 else None,
    )
