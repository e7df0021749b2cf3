"""Terminal output of a run; the only module that imports rich (one door to the terminal: docs/architecture.md).

- `RichReporter`: a live display (epoch and step bars, images/s, ETA, loss parts, lr, wd, teacher momentum and
  temperature, data-wait share) for an interactive terminal.
- `PlainReporter`: one plain line per log step and per epoch, for logs (CI, nohup, SLURM).
Both print the resolved configuration at start and a final summary with what to run next; `--quiet` gets
`base.events.NullReporter`, which prints nothing. `dinopre eval` has its own: `scoring_reporter` and `print_scores`.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from dinopre.base.events import (
    CollapseWarning,
    EpochEnded,
    Notice,
    NullReporter,
    RunFinished,
    RunStarted,
    ScanProgress,
    ScoringProgress,
    StepLogged,
    Stopped,
)
from dinopre.base.hints import export_command, resume_command
from dinopre.config.settings import SECTIONS, config_to_dict
from dinopre.model.regularisers.registry import REGULARISERS

_SHOWN = (
    ("loss", "loss", "{:.4f}"),
    ("cls", "cls", "{:.4f}"),
    ("patch", "patch", "{:.4f}"),
    *((name, name, "{:.3f}") for name in REGULARISERS),
    ("lr", "lr", "{:.2e}"),
    ("weight_decay", "wd", "{:.3f}"),
    ("momentum", "momentum", "{:.5f}"),
    ("teacher_temp", "t-temp", "{:.3f}"),
    ("teacher_patch_temp", "t-patch-temp", "{:.3f}"),
    ("teacher_entropy", "t-entropy", "{:.2f}"),
    ("prototypes_used", "protos", "{:.0f}"),
    ("images_per_sec", "img/s", "{:.0f}"),
    ("data_wait", "data wait", "{:.0%}"),
)
_EPOCH_PARTS = ("cls", "patch", *REGULARISERS)  # the loss parts an epoch's line shows beside its loss


def format_metrics(metrics: dict[str, float]) -> str:
    """`loss 5.1234 · lr 1.00e-04 · ...` for the metrics that are present."""
    parts = [f"{label} {fmt.format(metrics[key])}" for key, label, fmt in _SHOWN if key in metrics]
    return " · ".join(parts)


def format_evaluation(evaluation: dict[str, Any]) -> str:
    """`k-NN 45.2% · RankMe 37.1 · spread 0.62 · t-entropy 5.10/9.01 · protos 812 (top 3%)` for what was measured."""
    parts = []
    if evaluation.get("knn") is not None:
        parts.append(f"k-NN {evaluation['knn']:.1f}%")
    if "rankme" in evaluation:
        parts.append(f"RankMe {evaluation['rankme']:.1f}")
        parts.append(f"spread {evaluation['feature_spread']:.2f}")
        parts.append(f"t-entropy {evaluation['teacher_entropy']:.2f}/{evaluation['entropy_max']:.2f}")
        parts.append(f"protos {evaluation['prototypes_used']:.0f} (top {evaluation['top_prototype_share']:.0%})")
    if evaluation.get("collapse"):
        parts.append(f"COLLAPSED ({evaluation['collapse']})")
    return " · ".join(parts)


def config_table(event: RunStarted) -> Table:
    """The resolved configuration, one row per section, plus the data and hardware."""
    table = Table(title=f"dinopre train {event.config.preset}", show_header=False, box=None, padding=(0, 1))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    settings = config_to_dict(event.config)
    for section in SECTIONS:
        values = " ".join(f"{k}={_shown(v)}" for k, v in settings[section].items())
        table.add_row(section, Text(values))  # Text: paths are shown as they are, never read as markup
    table.add_row("lr", f"peak {event.config.peak_learning_rate:.3g} (after {event.config.optim.warmup_epochs:.3g} "
                        "warmup epochs)")
    for label, notes in (("init from", event.init_notes), (f"{event.config.method.recipe} recipe", event.recipe_notes)):
        if notes:  # where an --init-from run starts; what the recipe derived, and why
            table.add_row(label, Text("\n".join(notes)))
    table.add_row("images", Text(event.data_description))
    table.add_row("steps", f"{event.steps_per_epoch} per epoch, {event.total_steps} in all")
    table.add_row("hardware", f"{event.device}, {event.precision}, {event.num_workers} data workers, views "
                              f"rendered {'on the device' if event.augment_on == 'device' else 'in the workers'}")
    params = ", ".join(f"{name} {count / 1e6:.2f}M" for name, count in event.parameters.items())
    table.add_row("parameters", params)
    table.add_row("run dir", Text(str(event.run_dir)))
    if event.resumed_from is not None:
        table.add_row("resumed", Text(f"from {event.resumed_from} at step {event.start_step}"))
    return table


def _shown(value: Any) -> str:
    """A setting as the table shows it: a list as `a,b`, an empty one as `-`."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def summary_lines(event: RunFinished) -> list[str]:
    """What the run produced and what to run next, one plain line each."""
    if event.best_by == "knn":
        best = f"k-NN {event.best_knn:.1f}% (epoch {event.best_epoch + 1})" if event.best_knn is not None else "-"
    else:
        best = f"loss {event.best_loss:.4f} (epoch {event.best_epoch + 1})"
    lines = [
        f"run directory   {event.run_dir}",
        f"best            {best}",
        f"checkpoints     {event.last_checkpoint.name}, {event.best_checkpoint.name}",
        f"time            {event.seconds:.1f} s",
    ]
    if event.export_path is not None:
        lines.append(f"backbone        {event.export_path}")
        lines.append(f'load it with    load_dinov2_backbone("file::{event.export_path}:slt_vitsmall_patch16")')
    else:
        lines.append(f"export with     {export_command(event.best_checkpoint, event.run_dir / 'backbone.pt')}")
    if event.bad_files:
        lines.append(f"skipped files   {event.bad_files} could not be decoded; listed in {event.bad_files_report}")
    if event.blank_files:
        lines.append(f"blank crops     {event.blank_files} left out (one colour); listed in {event.blank_files_report}")
    lines.append(f"continue with   {resume_command(event.run_dir, '--epochs N')}")
    return lines


class PlainReporter:
    """Plain periodic lines, suitable for log files."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)

    def emit(self, event: object) -> None:
        if isinstance(event, ScanProgress):
            if event.done or event.images_found % 100_000 == 0:
                self.console.print(f"scanning: {event.images_found} images found{'' if event.done else ' so far'}")
        elif isinstance(event, RunStarted):
            self._started(event)
        elif isinstance(event, Stopped):
            self.console.print(f"stopped by {event.signal_name} at step {event.global_step}; checkpoint saved in "
                               f"{event.checkpoint}", style="yellow", markup=False)
        elif isinstance(event, StepLogged):
            self.console.print(f"epoch {event.epoch + 1}/{event.epochs} step {event.step_in_epoch}/"
                               f"{event.steps_per_epoch} (global {event.global_step}/{event.total_steps}) "
                               f"{format_metrics(event.metrics)}")
        elif isinstance(event, EpochEnded):
            self._epoch_line(event)
        elif isinstance(event, CollapseWarning):
            self.console.print(f"warning: {event.message}", style="yellow", markup=False)
        elif isinstance(event, Notice):
            self.console.print(f"warning: {event.message}" if event.warning else event.message,
                               style="yellow" if event.warning else None, markup=False)
        elif isinstance(event, RunFinished):
            self._summary(event)

    def _summary(self, event: RunFinished) -> None:
        for line in summary_lines(event):  # plain lines: nothing cropped, paths printed as they are
            self.console.print(line, markup=False, highlight=False)

    def _started(self, event: RunStarted) -> None:
        self.console.print(config_table(event))
        for warning in event.warnings:
            self.console.print(f"warning: {warning}", style="yellow", markup=False)

    def _epoch_line(self, event: EpochEnded) -> None:
        best = " (best)" if event.is_best else ""
        parts = "".join(f" {name} {value:.4f}" for name, value in event.parts.items()
                        if name in _EPOCH_PARTS)
        self.console.print(f"epoch {event.epoch + 1}/{event.epochs} done: loss {event.loss:.4f}{best}{parts}, "
                           f"{event.seconds:.1f} s, {event.images_per_sec:.0f} img/s")
        if format_evaluation(event.evaluation):
            features = format_evaluation(event.evaluation)
            self.console.print(f"epoch {event.epoch + 1}/{event.epochs} features: {features}", markup=False)

    def close(self) -> None:
        pass


def format_eta(seconds: float | None) -> str:
    """H:MM:SS, or -:--:-- while nothing is known yet."""
    if seconds is None:
        return "-:--:--"
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class StepClock:
    """Seconds per step of this run so far, for the ETAs.

    Rich's own estimate only uses updates of the last 30 s; the bars move at each log step, which on a slow
    machine or with a long --log-interval comes less often, so it showed -:--:-- for a whole epoch. This rate uses
    every step since the run (or the resume) started, and is known from the first log step on.
    """

    def __init__(self, start_step: int, now: float | None = None) -> None:
        self.start_step, self.start = start_step, time.monotonic() if now is None else now

    def seconds_per_step(self, global_step: int, now: float | None = None) -> float | None:
        done = global_step - self.start_step
        elapsed = (time.monotonic() if now is None else now) - self.start
        return elapsed / done if done > 0 else None


class RichReporter(PlainReporter):
    """Live progress bars and metrics for an interactive terminal."""

    def __init__(self, console: Console | None = None) -> None:
        super().__init__(console or Console())
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"), console=self.console,
        )
        self.clock: StepClock | None = None
        self.live: Live | None = None
        self.status: Any = None
        self.epoch_task = self.step_task = None
        self.metrics_text = "waiting for the first log step..."
        self.evaluation_text = ""

    def _render(self) -> Group:
        lines = [self.progress, Text(self.metrics_text)]
        if self.evaluation_text:
            lines.append(Text(f"features (epoch end): {self.evaluation_text}"))
        return Group(*lines)

    def emit(self, event: object) -> None:
        if isinstance(event, ScanProgress):
            self._scan_status(event)
        elif isinstance(event, Stopped):
            self.close()
            super().emit(event)
        elif isinstance(event, RunStarted):
            super().emit(event)
            done_epochs, done_steps = divmod(event.start_step, event.steps_per_epoch)
            self.clock = StepClock(event.start_step)
            self.epoch_task = self.progress.add_task("epochs", total=event.config.optim.epochs, completed=done_epochs,
                                                     eta=format_eta(None))
            self.step_task = self.progress.add_task("steps ", total=event.steps_per_epoch, completed=done_steps,
                                                    eta=format_eta(None))
            self.live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self.live.start()
        elif isinstance(event, StepLogged):
            rate = self.clock.seconds_per_step(event.global_step) if self.clock is not None else None
            left_in_epoch = event.steps_per_epoch - event.step_in_epoch
            self.progress.update(self.step_task, completed=event.step_in_epoch,
                                 eta=format_eta(rate * left_in_epoch if rate is not None else None))
            self.progress.update(self.epoch_task, eta=format_eta(
                rate * (event.total_steps - event.global_step) if rate is not None else None))
            self.metrics_text = format_metrics(event.metrics)
            self.live.update(self._render())
        elif isinstance(event, EpochEnded):
            self.progress.update(self.epoch_task, completed=event.epoch + 1)
            self.progress.reset(self.step_task)  # the step ETA stays: the rate does not change at an epoch end
            self._epoch_line(event)
            self.evaluation_text = format_evaluation(event.evaluation)
            self.live.update(self._render())
        elif isinstance(event, RunFinished):
            self.close()
            self._summary(event)
        elif isinstance(event, Notice):  # printed above the live display
            super().emit(event)

    def _summary(self, event: RunFinished) -> None:
        text = Text("\n".join(summary_lines(event)))
        self.console.print(Panel(text, title="done", border_style="green", expand=False))

    def _scan_status(self, event: ScanProgress) -> None:
        if self.status is None and not event.done:
            self.status = self.console.status("scanning the training folders...")
            self.status.start()
        if self.status is not None:
            self.status.update(f"scanning the training folders: {event.images_found} images so far")
        if event.done:
            self.close()
            self.console.print(f"scanning: {event.images_found} images found")

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None
        if self.live is not None:
            self.live.stop()
            self.live = None


class CountProgress:
    """A bar of `done / total` items for a command that is not training (`dinopre pack`): live on a terminal, a line
    every tenth of the way in a log, nothing when quiet. Call it with (done, total); use it as a context manager."""

    def __init__(self, what: str, *, quiet: bool = False, console: Console | None = None) -> None:
        self.what, self.quiet = what, quiet
        self.console = console or Console(highlight=False, soft_wrap=True, stderr=True)
        self.bar: Progress | None = None
        self.task: Any = None
        self.shown = -1

    def __enter__(self) -> CountProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if not self.console.is_terminal:
            tenth = done * 10 // max(total, 1)
            if tenth > self.shown:
                self.shown = tenth
                self.console.print(f"{self.what}: {done}/{total}", markup=False)
            return
        if self.bar is None:
            self.bar = Progress(TextColumn(self.what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                console=self.console)
            self.task = self.bar.add_task(self.what, total=total)
            self.bar.start()
        self.bar.update(self.task, completed=done)


def print_inspection(info: dict[str, Any], console: Console | None = None) -> None:
    """`dinopre inspect-checkpoint` as a two-column table."""
    console = console or Console(highlight=False)
    table = Table(title=f"{info['path']} ({info['kind']})", show_header=False, box=None, padding=(0, 1))
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in info.items():
        if key in ("path", "kind"):
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {_human(v)}" for k, v in value.items())
        table.add_row(key.replace("_", " "), _human(value))
    console.print(table)


def _human(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:,}"
    return "-" if value is None else str(value)


def print_verification(rows: list[tuple[str, bool, str]], console: Console | None = None) -> None:
    """`dinopre verify-backbone`: one line per check, then the verdict."""
    console = console or Console(highlight=False, soft_wrap=True)
    for check, passed, detail in rows:
        mark = "[green]PASS[/]" if passed else "[red]FAIL[/]"
        console.print(mark, Text(f"{check}: {detail}"))
    ok = bool(rows) and all(passed for _, passed, _ in rows)
    console.print("[green]The backbone is ready for the pipeline.[/]" if ok else "[red]Verification failed.[/]")


# ============ dinopre eval ============


class ScoringReporter:
    """Progress of `dinopre eval`: a bar per task (decoding at a size, embedding by a backbone) on a terminal, else
    one line per finished task.

    Args:
        console: where to print.
        live: draw bars (an interactive terminal) rather than plain lines.
    """

    def __init__(self, console: Console | None = None, live: bool = True) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)
        self.live = live
        self.progress: Progress | None = None
        self.task: Any = None

    def emit(self, event: object) -> None:
        if not isinstance(event, ScoringProgress):
            return
        if not self.live:
            if event.done == event.total:
                self.console.print(f"{event.task}: {event.done} images", markup=False)
            return
        if self.progress is None:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), console=self.console)
            self.progress.start()
        if event.done == 0 or self.task is None:  # a new task, even when a file name repeats
            self.task = self.progress.add_task(event.task, total=event.total)
        self.progress.update(self.task, completed=event.done)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def scoring_reporter(quiet: bool) -> ScoringReporter | NullReporter:
    """Nothing when `quiet` (`--json`: stdout holds only the JSON), bars on a terminal, plain lines otherwise."""
    if quiet:
        return NullReporter()
    return ScoringReporter(live=sys.stdout.isatty())


def print_scores(scores: list[Any], eval_dir: str, k: int, temperature: float,
                 console: Console | None = None) -> None:
    """`dinopre eval`: one row per backbone (k-NN and linear top-1 side by side), then the folds and any skipped
    images.

    Args:
        scores: `dinopre.train.scoring.Score` records, in the order given on the command line.
        eval_dir: the labelled folder.
        k: k-NN neighbours.
        temperature: k-NN vote temperature.
        console: where to print.
    """
    console = console or Console(highlight=False)
    linear = any(score.linear_top1 is not None for score in scores)
    table = Table(title=Text(f"{eval_dir}: weighted {k}-NN (T={temperature:g}) top-1"), title_justify="left")
    for column, justify in (("backbone", "left"), ("weights", "left"), ("input", "right"), ("k-NN", "right"),
                            *((("linear", "right"),) if linear else ())):
        table.add_column(column, justify=justify, overflow="fold")
    for score in scores:
        row = [Text(score.path), score.weights or "-", f"{score.image_size} px", f"{score.knn_top1:.1f}%"]
        if linear:
            row.append(f"{score.linear_top1:.1f}%" if score.linear_top1 is not None else "-")
        table.add_row(*row)
    console.print(table)
    for line in _fold_lines(scores):
        console.print(line, markup=False)


def _fold_lines(scores: list[Any]) -> list[str]:
    """The folds each input size saw (the same images, unless some failed to decode), and what was skipped."""
    lines, seen = [], set()
    for score in scores:
        if score.image_size in seen:
            continue
        seen.add(score.image_size)
        lines.append(f"at {score.image_size} px: {score.train_images} train and {score.test_images} test images of "
                     f"{score.classes} classes")
        if score.skipped:
            file, reason = score.skipped[0]
            lines.append(f"  left out {len(score.skipped)} of the folder's images that could not be decoded, e.g. "
                         f"{file}: {reason}")
    return lines
