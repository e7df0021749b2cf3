"""Tests of the per-step schedules (dinopre.model.schedules) against dino utils.py `cosine_scheduler`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from dinopre.config.loading import build_config
from dinopre.config.recipe import resolve
from dinopre.config.settings import PretrainConfig
from dinopre.model.schedules import Schedule, build_schedules, cosine_schedule, teacher_temp_schedule


def dino_cosine_scheduler(
    base: float, final: float, epochs: int, niter_per_ep: int, warmup_epochs: int = 0, start_warmup: float = 0.0
) -> np.ndarray:
    """dino utils.py `cosine_scheduler`, copied as the reference."""
    warmup_schedule = np.array([])
    warmup_iters = warmup_epochs * niter_per_ep
    if warmup_epochs > 0:
        warmup_schedule = np.linspace(start_warmup, base, warmup_iters)
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    schedule = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup_schedule, schedule))


def values(schedule: Schedule) -> np.ndarray:
    """Every step's value as an array."""
    return np.array([schedule(step) for step in range(len(schedule))])


def last_cosine_value(base: float, final: float, cosine_steps: int) -> float:
    """dino's value at the last step: final + 0.5 (base - final)(1 + cos(pi (I - 1) / I))."""
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (cosine_steps - 1) / cosine_steps))


def demo_config(**settings: Any) -> PretrainConfig:
    """The face demo configuration with command-line overrides."""
    return build_config("face", demo=True, cli_settings=settings)


# ----------------------------------------------------------------------------------- cosine_schedule


@pytest.mark.parametrize("warmup_epochs", [0, 1, 3])
def test_cosine_schedule_equals_dino(warmup_epochs: int) -> None:
    """Every value equals dino's cosine_scheduler (warmup included)."""
    schedule = cosine_schedule(0.01, 1e-5, 10 * 7, warmup_epochs * 7, warmup_start=0.001)
    expected = dino_cosine_scheduler(0.01, 1e-5, 10, 7, warmup_epochs, start_warmup=0.001)
    assert len(schedule) == 70
    np.testing.assert_allclose(values(schedule), expected, rtol=1e-12, atol=0)


def test_cosine_schedule_landmarks() -> None:
    """Step 0 is warmup_start, the end of warmup is base, the last step is dino's last cosine value."""
    base, final, total, warmup = 0.5, 0.01, 40, 10
    schedule = cosine_schedule(base, final, total, warmup, warmup_start=0.1)
    assert schedule(0) == 0.1
    assert schedule(warmup - 1) == pytest.approx(base, abs=1e-15)
    assert schedule(warmup) == pytest.approx(base, abs=1e-15)  # the cosine starts at base as well
    assert schedule(total - 1) == pytest.approx(last_cosine_value(base, final, total - warmup), rel=1e-12)
    assert schedule(total - 1) == pytest.approx(final, abs=0.5 * (base - final) * 0.01)


def test_cosine_schedule_is_monotonic_in_each_phase() -> None:
    """Warmup strictly increases; the cosine part strictly decreases (base > final) or increases (base < final)."""
    down = values(cosine_schedule(1.0, 0.0, 50, 12))
    assert np.all(np.diff(down[:12]) > 0) and np.all(np.diff(down[12:]) < 0)
    up = values(cosine_schedule(0.04, 0.4, 30))  # weight decay goes up
    assert np.all(np.diff(up) > 0)
    assert up[0] == pytest.approx(0.04) and up.max() <= 0.4


def test_cosine_schedule_holds_last_value_past_the_end() -> None:
    """Steps past the end (e.g. a resumed run with more steps) get the last value."""
    schedule = cosine_schedule(1.0, 0.2, 20, 5)
    assert schedule(20) == schedule(19) == schedule(10_000)


def test_warmup_longer_than_run_is_truncated() -> None:
    """A warmup longer than the run fills the run: right length, starts at warmup_start, rises, never above base."""
    schedule = cosine_schedule(1.0, 0.0, 8, 20, warmup_start=0.0)
    v = values(schedule)
    assert len(schedule) == 8 and v[0] == 0.0
    assert np.all(np.diff(v) > 0) and v.max() <= 1.0


def test_constant_schedule_and_empty_schedule() -> None:
    """base == final gives a constant; a zero-step schedule is refused."""
    assert np.all(values(cosine_schedule(0.3, 0.3, 9)) == pytest.approx(0.3))
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 0)


# ----------------------------------------------------------------------------------- teacher temperature


def test_teacher_temp_schedule_linear_per_epoch_then_constant() -> None:
    """dino: np.linspace(warmup, final, warmup_epochs) per epoch, then final; each epoch's value on all its steps."""
    schedule = teacher_temp_schedule(0.04, 0.07, warmup_epochs=4, epochs=6, steps_per_epoch=3)
    per_epoch = np.concatenate([np.linspace(0.04, 0.07, 4), np.full(2, 0.07)])
    assert len(schedule) == 18
    np.testing.assert_allclose(values(schedule), np.repeat(per_epoch, 3), rtol=0, atol=1e-15)
    assert schedule(0) == 0.04 and schedule(3) == pytest.approx(0.05) and schedule(9) == pytest.approx(0.07)
    assert schedule(100) == pytest.approx(0.07)


def test_teacher_temp_without_warmup_is_constant() -> None:
    """warmup_teacher_temp_epochs 0 (the default): the final temperature from step 0."""
    assert np.all(values(teacher_temp_schedule(0.01, 0.04, 0, 3, 5)) == 0.04)


# ----------------------------------------------------------------------------------- build_schedules


def test_build_schedules_follows_the_config() -> None:
    """lr peaks at peak_learning_rate at warmup end; wd weight_decay -> ~weight_decay_end; momentum base -> final."""
    config = demo_config(epochs=4, warmup_epochs=1, learning_rate=1e-3, min_lr=1e-5, weight_decay=0.04,
                         weight_decay_end=0.4, teacher_momentum_base=0.99, teacher_momentum_final=1.0,
                         warmup_teacher_temp=0.02, teacher_temp=0.05, warmup_teacher_temp_epochs=2)
    steps_per_epoch = 5
    s = build_schedules(config, steps_per_epoch)
    total = 20
    assert len(s.lr) == len(s.weight_decay) == len(s.momentum) == len(s.teacher_temp) == total
    assert s.lr(0) == 0.0
    assert s.lr(steps_per_epoch - 1) == pytest.approx(config.peak_learning_rate, rel=1e-12)
    assert config.peak_learning_rate == 1e-3
    assert s.lr(total - 1) == pytest.approx(last_cosine_value(1e-3, 1e-5, total - steps_per_epoch), rel=1e-12)
    assert s.weight_decay(0) == pytest.approx(0.04)
    assert s.weight_decay(total - 1) == pytest.approx(last_cosine_value(0.04, 0.4, total), rel=1e-12)
    assert s.momentum(0) == pytest.approx(0.99)
    assert s.momentum(total - 1) == pytest.approx(last_cosine_value(0.99, 1.0, total), rel=1e-12)
    assert [s.teacher_temp(i) for i in (0, 4, 5, 9, 10, 19)] == pytest.approx([0.02, 0.02, 0.05, 0.05, 0.05, 0.05])
    assert s.at(7) == {"lr": s.lr(7), "weight_decay": s.weight_decay(7), "momentum": s.momentum(7),
                       "teacher_temp": s.teacher_temp(7)}


def test_peak_learning_rate_defaults_to_linear_scaling_rule() -> None:
    """Under the reference recipe, without --learning-rate the peak is dino's 5e-4 * batch / 256, reached at the
    end of the 10 warmup epochs."""
    config = resolve(demo_config(learning_rate=None, batch_size=64, recipe="reference"), 512).config
    assert config.peak_learning_rate == pytest.approx(5e-4 * 64 / 256)
    steps_per_epoch = 3
    lr = build_schedules(config, steps_per_epoch).lr
    assert config.optim.warmup_epochs == 10
    assert lr(10 * steps_per_epoch - 1) == pytest.approx(1.25e-4, rel=1e-12)
    assert max(values(lr)) == pytest.approx(1.25e-4, rel=1e-12)
    assert demo_config(learning_rate=3e-4, batch_size=64).peak_learning_rate == 3e-4


def test_fractional_warmups_last_their_rounded_steps() -> None:
    """Epoch counts may be fractional (the auto recipe sets steps): 1.5 epochs of 4 steps warm up for 6 steps."""
    config = resolve(demo_config(epochs=4, warmup_epochs=1.5, learning_rate=1e-3, recipe="auto",
                                 warmup_teacher_temp=0.02, teacher_temp=0.06, warmup_teacher_temp_epochs=0.5),
                     num_images=128).config
    s = build_schedules(config, 4)
    assert s.lr(4) < s.lr(5) == pytest.approx(1e-3)  # the warmup's 6th and last step reaches the peak
    assert s.lr(6) == pytest.approx(1e-3) and s.lr(7) < 1e-3  # where the cosine starts, as in dino
    # under the auto recipe the teacher temperature warms up per step (here over 2 steps), not per epoch
    assert [s.teacher_temp(i) for i in (0, 1, 2, 15)] == pytest.approx([0.02, 0.06, 0.06, 0.06])


def test_the_reference_recipe_warms_the_teacher_up_per_epoch() -> None:
    config = resolve(demo_config(epochs=4, recipe="reference", warmup_teacher_temp=0.02, teacher_temp=0.06,
                                 warmup_teacher_temp_epochs=3), num_images=64).config
    s = build_schedules(config, 2)
    assert [s.teacher_temp(i) for i in range(8)] == pytest.approx([0.02, 0.02, 0.04, 0.04, 0.06, 0.06, 0.06, 0.06])
