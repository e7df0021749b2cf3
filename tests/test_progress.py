"""The live display: its ETAs are known from the first log step on, whatever the log interval."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from dinopre import progress
from dinopre.base.events import RunStarted, StepLogged
from dinopre.config.loading import build_config
from dinopre.config.recipe import resolve
from dinopre.progress import RichReporter, StepClock, format_eta


def test_eta_formats_hours_minutes_seconds() -> None:
    assert format_eta(None) == "-:--:--"
    assert format_eta(3725.4) == "1:02:05" and format_eta(-3) == "0:00:00"


def test_the_rate_counts_every_step_since_the_start_or_resume() -> None:
    clock = StepClock(start_step=100, now=0.0)
    assert clock.seconds_per_step(100, now=5.0) is None
    assert clock.seconds_per_step(110, now=30.0) == pytest.approx(3.0)


def test_the_step_eta_shows_within_an_epoch_with_a_slow_log_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    """A log step every 40 s (longer than rich's 30 s speed window) used to leave -:--:-- for the whole epoch."""
    now = {"t": 0.0}
    monkeypatch.setattr(progress.time, "monotonic", lambda: now["t"])
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    reporter = RichReporter(console)
    config = resolve(build_config("face", demo=True), 512).config  # as the engine announces it
    reporter.emit(RunStarted(config=config, run_dir=Path("run"), num_images=512, data_description="demo",
                             steps_per_epoch=100, total_steps=300, device="cpu", precision="fp32", num_workers=0,
                             parameters={"student": 1}))
    try:
        now["t"] = 40.0
        reporter.emit(StepLogged(epoch=0, epochs=3, step_in_epoch=10, steps_per_epoch=100, global_step=10,
                                 total_steps=300, metrics={"loss": 5.0}))
        tasks = {task.description.strip(): task.fields["eta"] for task in reporter.progress.tasks}
        assert tasks == {"steps": "0:06:00", "epochs": "0:19:20"}  # 4 s per step: 90 and 290 steps left
    finally:
        reporter.close()


def test_eval_progress_draws_a_bar_per_task_and_plain_lines_off_a_terminal() -> None:
    from dinopre.base.events import ScoringProgress
    from dinopre.progress import ScoringReporter

    tasks = ("decoding at 32 px", "embedding by bb.pt", "embedding by bb.pt")  # the same file given twice
    live = ScoringReporter(Console(file=io.StringIO(), force_terminal=True, width=120), live=True)
    plain_file = io.StringIO()
    plain = ScoringReporter(Console(file=plain_file, width=120), live=False)
    for reporter in (live, plain):
        for task in tasks:
            for done in (0, 20, 40):
                reporter.emit(ScoringProgress(task, done, 40))
    assert [(t.description, t.completed, t.total) for t in live.progress.tasks] == [(t, 40, 40) for t in tasks]
    live.close()
    assert live.progress is None
    assert plain_file.getvalue().splitlines() == [f"{task}: 40 images" for task in tasks]
