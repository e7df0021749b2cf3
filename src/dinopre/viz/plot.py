"""Training curves of one or several runs from their `metrics.jsonl`, drawn with matplotlib (an optional extra).

Six panels: the loss and its parts; the learning rate; the teacher momentum and temperature; the teacher's entropy
against its maximum ln K (near the maximum: uniform collapse; near 0: one-hot collapse); the k-NN accuracy of
`--eval-dir`; RankMe. Runs are overlaid, one colour each, named by their folder.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinopre.base.errors import ConfigError, RunDirError
from dinopre.model.regularisers.registry import REGULARISERS

INSTALL_HINT = 'dinopre plot draws with matplotlib: install it with pip install "dinopre[plots]".'
# Parts a run did not log are skipped. Old runs' metrics.jsonl are plotted too: a regulariser that ever leaves the
# registry keeps its name here.
LOSS_PARTS = ("dino", "cls", "patch", *REGULARISERS)


@dataclass
class RunCurves:
    """The records of one run."""

    name: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    out_dim: int | None = None

    def series(self, key: str, records: str = "steps") -> tuple[list[float], list[float]]:
        """(x, y) of a metric: x is the global step for step records, the epoch for epoch records. Values that are
        not finite or beyond +-1e300 (a diverged run) are left out: matplotlib cannot scale an axis around them."""
        rows = self.steps if records == "steps" else self.epochs
        x_key = "step" if records == "steps" else "epoch"
        pairs = [(r[x_key], r[key]) for r in rows if _plottable(r.get(key)) and _plottable(r.get(x_key))]
        return [p[0] for p in pairs], [p[1] for p in pairs]


PLOT_LIMIT = 1e300  # beyond it, an axis's range overflows a float


def _plottable(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and abs(value) <= PLOT_LIMIT


def read_run(folder: Path) -> RunCurves:
    """The step and epoch records of a run directory (lines cut short by a crash are skipped).

    Raises:
        RunDirError: the folder has no metrics.jsonl.
    """
    metrics = Path(folder) / "metrics.jsonl"
    if not metrics.is_file():
        raise RunDirError(f"'{folder}' has no metrics.jsonl; give run directories written by `dinopre train`.")
    run = RunCurves(Path(folder).resolve().name)
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("type") == "step":
            run.steps.append(record)
        elif isinstance(record, dict) and record.get("type") == "epoch":
            run.epochs.append(record)
    try:
        run.out_dim = int(json.loads((Path(folder) / "params.json").read_text(encoding="utf-8"))["config"]["model"]
                          ["out_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        run.out_dim = None
    return run


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None
    matplotlib.use("Agg")  # files only: never a window, works without a display
    import matplotlib.pyplot as plt

    return plt


def draw_curves(runs: list[RunCurves], output: Path) -> Path:
    """Draw the six panels for the runs and write a PNG.

    Raises:
        ConfigError: matplotlib is not installed.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        _loss_panel(axes[0][0], run, colour)
        axes[0][1].plot(*run.series("lr"), color=colour, label=run.name)
        axes[0][2].plot(*run.series("momentum"), color=colour, label=f"{run.name} momentum")
        _entropy_panel(axes[1][0], run, colour)
        _epoch_panel(axes[1][1], run, "knn", colour)
        _epoch_panel(axes[1][2], run, "rankme", colour)
    twin = axes[0][2].twinx()
    for i, run in enumerate(runs):
        twin.plot(*run.series("teacher_temp"), color=colours[i % len(colours)], linestyle=":",
                  label=f"{run.name} teacher temp")
    _titles(axes, twin)
    for ax in [a for row in axes for a in row]:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


def _loss_panel(ax: Any, run: RunCurves, colour: str) -> None:
    ax.plot(*run.series("loss"), color=colour, label=f"{run.name} loss")
    styles = itertools.cycle(["--", "-.", ":", (0, (1, 4)), (0, (5, 5))])  # cycles once a run logs 6 parts
    for part in LOSS_PARTS:
        x, y = run.series(part)
        if x and (run.series("loss")[1] != y):
            ax.plot(x, y, color=colour, linestyle=next(styles), linewidth=1, label=f"{run.name} {part}")


def _entropy_panel(ax: Any, run: RunCurves, colour: str) -> None:
    ax.plot(*run.series("teacher_entropy"), color=colour, label=f"{run.name} teacher entropy")
    if run.out_dim:
        ax.axhline(math.log(run.out_dim), color=colour, linestyle="--", linewidth=1,
                   label=f"{run.name} ln K ({run.out_dim} prototypes)")


def _epoch_panel(ax: Any, run: RunCurves, key: str, colour: str) -> None:
    x, y = run.series(key, "epochs")
    if x:
        ax.plot(x, y, color=colour, marker="o", markersize=3, label=run.name)


def _titles(axes: Any, twin: Any) -> None:
    for ax, (title, xlabel) in zip([a for row in axes for a in row], [
        ("loss and its parts", "step"), ("learning rate", "step"), ("teacher momentum (left), temperature (right)",
                                                                    "step"),
        ("teacher entropy (uniform collapse: at ln K; one-hot: near 0)", "step"), ("k-NN top-1 (%)", "epoch"),
        ("RankMe (effective rank of the features)", "epoch"),
    ]):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    if not twin.get_legend_handles_labels()[0]:
        twin.set_visible(False)


def plot_runs(folders: list[Path], output: Path, *, force: bool = False) -> Path:
    """`dinopre plot`: read the runs and draw them into `output`.

    Raises:
        UserError: a folder without metrics, no matplotlib, or an output that must not be written.
    """
    from dinopre.files.outputs import check_output, check_parent_writable

    check_output(output, force=force, what="--output")
    check_parent_writable(output, "the --output picture")
    runs = [read_run(folder) for folder in folders]
    empty = [run.name for run in runs if not run.steps and not run.epochs]
    if len(empty) == len(runs):
        raise RunDirError(f"No step or epoch records in {', '.join(empty)} yet; plot again once training has logged.")
    return draw_curves(runs, output)
