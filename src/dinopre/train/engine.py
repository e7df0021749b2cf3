"""The training loop: `fit(config, reporter)` sets a run up, continues a checkpoint, runs the steps and epochs.

The engine never prints: it sends events (`dinopre.base.events`) to a reporter; `dinopre.progress` renders them.
Nor does it draw: pictures of the run are hooks (`train.hooks`) that the command line passes in. What it calls
lives beside it: setting up (`train.setup`), the step (`train.step`), the end of an epoch (`train.epoch`) and the
checkpoints (`train.checkpointing`). Resuming restores everything a step depends on and the sampler skips the
consumed part of the epoch without loading it, so a resumed run is bit for bit the uninterrupted one on a CPU
(tests/train/test_engine.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dinopre.base import distributed
from dinopre.base.errors import Interrupted, UserError
from dinopre.base.events import Notice, NullReporter, Reporter, RunFinished, Stopped
from dinopre.base.hints import resume_command
from dinopre.base.signals import StopSignals
from dinopre.config.settings import PretrainConfig
from dinopre.data.blank import is_blank_reason
from dinopre.train.checkpointing import export, restore, save
from dinopre.train.epoch import close_epoch, evaluate_source
from dinopre.train.hooks import RunHooks
from dinopre.train.run import Run, RunRequest
from dinopre.train.runtime import device_type
from dinopre.train.setup import Opened, Prepared, check_same_data, open_batches, open_run, run_started, write_params
from dinopre.train.step import LogWindow, log_step, note_bad_files, train_step


@dataclass
class FitResult:
    """What a finished run leaves behind."""

    run_dir: Path
    best_loss: float
    best_epoch: int
    epoch_losses: list[float]
    export_path: Path | None = None
    epoch_parts: list[dict[str, float]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # per epoch: signals, k-NN, collapse
    ignored_signal: str | None = None  # a SIGTERM / SIGINT that arrived after the last step (the run completed)


def fit(config: PretrainConfig, reporter: Reporter, *, overwrite: bool = False,
        resume_from: str | Path | None = None, inputs: tuple[Path, ...] = (),
        hooks: Iterable[RunHooks] = ()) -> FitResult:
    """Train a model as configured (or continue a checkpoint) and write the run directory.

    Args:
        config: the validated configuration.
        reporter: receives progress events.
        overwrite: start over in an output folder that already holds a run.
        resume_from: a training checkpoint to continue; `config` may differ from its configuration only in
            `config.validation.RESUME_MAY_CHANGE`.
        inputs: files the command read (its config file), which the run must never write over.
        hooks: called at the start of the run and at the end of each epoch, on the main process (the command
            line passes the run's pictures: `dinopre.viz.run_pictures`); none by default.

    Returns:
        The run's summary.

    Raises:
        UserError: bad data, an unusable output folder, device or checkpoint, or an incompatible resume.
        TrainingStopped: a non-finite loss; the last good checkpoint is kept.
    """
    request = RunRequest(started=time.perf_counter(), overwrite=overwrite,
                         resume_from=Path(resume_from) if resume_from is not None else None, inputs=inputs)
    with StopSignals() as stop, distributed.session(device_type(config.run.device),
                                                    rendezvous_timeout=config.run.rendezvous_timeout,
                                                    notify=lambda message: reporter.emit(Notice(message))):
        main = distributed.is_main()
        result = _fit(config, reporter if main else NullReporter(), request, stop, tuple(hooks) if main else ())
    result.ignored_signal = stop.ignored_name  # noted until the run let go of its folder, its trackers and peers
    return result


def _fit(config: PretrainConfig, reporter: Reporter, request: RunRequest, stop: StopSignals,
         hooks: tuple[RunHooks, ...]) -> FitResult:
    opened = Opened()
    error: UserError | None = None
    try:  # every process sets up; a failure on any of them stops all of them here (`distributed.agree`)
        prepared = open_run(config, reporter, request, stop, hooks, opened)
    except UserError as exc:
        error = exc
    try:
        distributed.agree(error)
        check_same_data(prepared.run)
        return _start(prepared)
    finally:
        try:
            for hook in hooks:
                hook.close()
        finally:
            opened.close()


def _start(prepared: Prepared) -> FitResult:
    """Restore a resumed run, write params.json, call the hooks, announce the run and train."""
    run = prepared.run
    if prepared.state is not None:
        restore(run, prepared.state)
    notes = write_params(run, prepared.state)
    context = run.context()
    for hook in run.hooks:
        hook.on_run_start(context)
    run.reporter.emit(run_started(run, prepared.state, notes))
    if run.parts.init is not None and run.config.eval.eval_dir:  # the source's own features, as epoch 0
        run.reporter.emit(evaluate_source(run))
        save(run, best=run.config.resolved_best_by == "knn", mid_epoch=True)
    return _train(run)


def _train(run: Run) -> FitResult:
    """The loop over the remaining steps, then the export and the summary."""
    config, files = run.config, run.files
    with open_batches(run) as batches:
        run.stop.deferring = True  # from here a signal lets the current step finish and saves a checkpoint
        _loop(run, batches)
        # The last step is done: the run is complete, so a signal now (a scheduler's SIGTERM at the time limit)
        # must not turn it into a stopped one with 143, which SLURM scripts requeue. It is noted and the last files
        # are written as usual.
        run.stop.finish()
    export_path = export(run) if config.run.export_backbone and distributed.is_main() else None
    report = files.write_bad_files(run.bad_files) if run.bad_files else None
    blank_files, blank_report = files.blank_report()
    run.reporter.emit(RunFinished(run_dir=files.path, best_loss=run.best_loss, best_epoch=run.best_epoch,
                                  last_checkpoint=files.last, best_checkpoint=files.best, export_path=export_path,
                                  seconds=time.perf_counter() - run.request.started,
                                  bad_files=sum(not is_blank_reason(reason) for reason in run.bad_files.values()),
                                  bad_files_report=report, best_by=config.resolved_best_by, best_knn=run.best_knn,
                                  blank_files=blank_files, blank_files_report=blank_report))
    return FitResult(files.path, run.best_loss, run.best_epoch, run.epoch_losses, export_path, run.epoch_parts,
                     run.evaluations)


# ============ the loop ============


def _loop(run: Run, batches: Iterator[Any]) -> None:
    config = run.config
    method = run.method.train()
    for epoch in range(run.epoch, config.optim.epochs):
        epoch_start = time.perf_counter()
        if not run.loss_sums:
            run.loss_sums = {name: torch.zeros((), device=run.runtime.device) for name in method.loss_names}
        window = LogWindow()
        while run.step_in_epoch < run.steps_per_epoch:
            signum = distributed.stop_requested(run.stop.received, run.runtime.device)
            if signum is not None:
                _stop(run, signum)
            wait_start = time.perf_counter()
            batch = next(batches)
            window.data_wait += time.perf_counter() - wait_start
            if batch.bad:
                note_bad_files(run, batch.bad)
            values = run.parts.schedules.at(run.global_step)
            done_in_epoch = run.step_in_epoch + 1
            log_now = done_in_epoch % config.run.log_interval == 0 or done_in_epoch == run.steps_per_epoch
            losses = train_step(method, run.parts.optimizer, batch, values, runtime=run.runtime,
                                clip_grad_norm=config.optim.clip_grad_norm,
                                freeze_last_layer=run.global_step < run.frozen_steps,
                                diagnostics=log_now, model=run.parts.model)
            for name, total in run.loss_sums.items():
                total += losses[name]
            run.global_step, run.step_in_epoch = run.global_step + 1, done_in_epoch
            window.images += batch.batch_size * run.world_size
            if log_now:
                log_step(run, epoch, losses, values, window)
                window = LogWindow()
            every = config.run.checkpoint_every
            if every and run.global_step % every == 0 and done_in_epoch < run.steps_per_epoch:
                save(run, best=False, mid_epoch=True)
        _end_epoch(run, epoch, time.perf_counter() - epoch_start)


def _end_epoch(run: Run, epoch: int, seconds: float) -> None:
    """Close epoch `epoch` (0-based): its record, its checkpoint, its event, the hooks, then a collapse warning."""
    ended, warning = close_epoch(run, epoch, seconds)
    save(run, best=ended.is_best, mid_epoch=False)
    run.reporter.emit(ended)
    context = run.context()
    for hook in run.hooks:
        hook.on_epoch_end(context)
    if warning is not None:
        run.reporter.emit(warning)


def _stop(run: Run, signum: int) -> None:
    """SIGINT/SIGTERM arrived (at any process): checkpoint between two steps (unless just done) and leave with
    128 + signal, all processes at the same step."""
    run.stop.received = signum
    if run.last_saved_step != run.global_step:
        save(run, best=False, mid_epoch=True)
    run.reporter.emit(Stopped(signal_name=run.stop.name, global_step=run.global_step, checkpoint=run.files.last))
    distributed.barrier()  # no process leaves (and makes torchrun stop the others) before the checkpoint is written
    raise distributed.mark_collective(Interrupted(
        f"Stopped by {run.stop.name} at step {run.global_step}; checkpoint saved in '{run.files.last}'. "
        f"Continue with: {resume_command(run.files.path)}", 128 + signum
    ))
