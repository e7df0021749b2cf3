"""The end of an epoch: its mean losses, the teacher's evaluation, which checkpoint is the best, its metrics lines.

The engine then saves the checkpoint and announces the epoch (`engine._end_epoch`); what is computed here draws no
random numbers, so a resumed run stays identical.
"""

from __future__ import annotations

import math
import time
from typing import Any

from dinopre.base import distributed
from dinopre.base.errors import TrainingStopped
from dinopre.base.events import CollapseWarning, EpochEnded, Notice
from dinopre.train.evaluation import collapse_message, collapse_verdict, is_eval_epoch
from dinopre.train.run import Run
from dinopre.train.step import mean_over_processes


def close_epoch(run: Run, epoch: int, seconds: float) -> tuple[EpochEnded, CollapseWarning | None]:
    """Record the end of epoch `epoch` (0-based) in the run and in metrics.jsonl.

    Args:
        run: the run; its history, best values and counters move on to the next epoch.
        epoch: the epoch that ended.
        seconds: how long it took.

    Returns:
        The event that announces the epoch, and a collapse warning if the teacher's signals say it collapsed.

    Raises:
        TrainingStopped: the epoch's mean loss is not finite (every process raises it here).
    """
    means = {name: total / run.steps_per_epoch for name, total in mean_over_processes(run.loss_sums).items()}
    loss = means["loss"]
    if not math.isfinite(loss):
        raise distributed.mark_collective(TrainingStopped(
            f"The mean loss of epoch {epoch + 1} is non-finite ({loss}); the last good checkpoint in "
            f"'{run.files.path}' is kept. Lower --learning-rate or use --precision fp32."))
    run.epoch_losses.append(loss)
    run.epoch_parts.append(means)
    evaluation = _evaluate(run, epoch) if run.evaluator is not None else {}
    is_best = _update_best(run, epoch, loss, evaluation.get("knn"))
    run.evaluations.append({"epoch": epoch + 1, **evaluation})
    run.epoch, run.step_in_epoch, run.loss_sums = epoch + 1, 0, {}
    images_per_sec = run.steps_per_epoch * run.config.optim.batch_size / max(seconds, 1e-9)
    # The record goes first: a crash before the checkpoint is written drops it again on resume.
    run.files.append_metrics({"type": "epoch", "epoch": epoch + 1, "step": run.global_step, **means,
                              "best": is_best, "seconds": seconds, "images_per_sec": images_per_sec, **evaluation})
    warning = _collapse_warning(run, epoch, evaluation)
    ended = EpochEnded(epoch=epoch, epochs=run.config.optim.epochs, loss=loss, is_best=is_best, seconds=seconds,
                       images_per_sec=images_per_sec, parts=means, evaluation=evaluation, global_step=run.global_step)
    return ended, warning


def _update_best(run: Run, epoch: int, loss: float, knn: float | None) -> bool:
    """Whether this epoch's checkpoint is the new best (by --best-by), with the best loss and k-NN moved on."""
    if run.config.resolved_best_by == "knn":
        is_best = knn is not None and (run.best_knn is None or knn > run.best_knn)
    else:
        is_best = loss < run.best_loss
    run.best_loss = min(run.best_loss, loss)
    if knn is not None:
        run.best_knn = knn if run.best_knn is None else max(run.best_knn, knn)
    if is_best:
        run.best_epoch = epoch
    return is_best


def _collapse_warning(run: Run, epoch: int, evaluation: dict[str, Any]) -> CollapseWarning | None:
    """The warning line in metrics.jsonl, and the event, when the evaluation found the run collapsed."""
    verdict = evaluation.get("collapse")
    if verdict is None:
        return None
    message = collapse_message(verdict, evaluation)
    run.files.append_metrics({"type": "warning", "kind": "collapse", "collapse": verdict, "epoch": epoch + 1,
                              "step": run.global_step, "message": message})
    return CollapseWarning(epoch=epoch, verdict=verdict, message=message)


def _evaluate(run: Run, epoch: int) -> dict[str, Any]:
    """The teacher's label-free signals (every epoch) and k-NN accuracy (every --eval-every epochs and at the
    end), with the collapse verdict; evaluation draws no random numbers, so a resumed run stays identical.

    Only the main process evaluates (its teacher is every process's teacher); its reductions stay local, the
    others wait at the next step's collective.
    """
    with distributed.local_collectives():
        return _evaluate_here(run, epoch)


def _evaluate_here(run: Run, epoch: int) -> dict[str, Any]:
    assert run.evaluator is not None
    started = time.perf_counter()
    teacher, device = run.method.teacher, run.runtime.device
    temp = run.parts.schedules.at(max(run.global_step - 1, 0))["teacher_temp"]
    loss = run.method.dino_loss
    out: dict[str, Any] = run.evaluator.signals(teacher["backbone"], teacher["head"],
                                                lambda logits: loss.teacher_targets(logits, temp), device)
    if run.evaluator.has_knn and is_eval_epoch(run.config, epoch + 1):
        out["knn"] = run.evaluator.knn(teacher["backbone"], device)
    out["collapse"] = collapse_verdict(out)
    out["eval_seconds"] = time.perf_counter() - started
    return out


def evaluate_source(run: Run) -> Notice:
    """Before the first step of an --init-from run with an --eval-dir: the source's own k-NN, recorded as epoch 0
    (metrics.jsonl, the run's evaluations), so the user sees at once whether training helps or hurts. Under
    `--best-by knn` it is the first best: checkpoint_best.pt keeps the source until an epoch beats it.

    Only the main process evaluates (the others have no evaluator).

    Returns:
        The line that tells the user.
    """
    knn = None
    if run.evaluator is not None:
        with distributed.local_collectives():
            knn = run.evaluator.knn(run.method.teacher["backbone"], run.runtime.device)
        run.best_knn = knn
        run.evaluations.append({"epoch": 0, "knn": knn})
    is_best = run.config.resolved_best_by == "knn"
    run.files.append_metrics({"type": "epoch", "epoch": 0, "step": 0, "knn": knn, "best": is_best, "source": True})
    keep = (" checkpoint_best.pt holds it until an epoch beats it." if is_best else "")
    shown = f"{knn:.1f} %" if knn is not None else "measured on the main process"
    return Notice(f"Before training, --init-from's own k-NN on --eval-dir is {shown} (epoch 0).{keep}")
