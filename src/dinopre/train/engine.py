"""The shared core: `fit(config, reporter)` builds everything, resumes, runs the loop, writes the run directory.

The engine never prints: it sends events (`dinopre.base.events`) to a reporter; `dinopre.progress` renders them.
Resuming restores everything a step depends on (weights, optimizer, loss centers, generator states, the partial
epoch's loss sums) and the sampler skips the consumed part of the epoch without loading it, so a resumed run is
bit for bit the uninterrupted one on a CPU (tests/test_engine.py).
"""

from __future__ import annotations

import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dinopre import __version__
from dinopre.base import distributed
from dinopre.base.distributed import all_reduce_mean, local_collectives
from dinopre.base.errors import ConfigError, DataError, Interrupted, TrainingStopped, UserError
from dinopre.base.events import (
    CheckpointSaved,
    CollapseWarning,
    EpochEnded,
    Reporter,
    RunFinished,
    RunStarted,
    StepLogged,
    Stopped,
)
from dinopre.base.signals import StopSignals
from dinopre.config.recipe import ResolvedRecipe
from dinopre.config.settings import PretrainConfig, advisories, config_to_dict, setting
from dinopre.data.dataset import EXHAUSTED, EpochBatchSampler, ImageSource
from dinopre.data.images import BadImageError
from dinopre.data.pipeline import (
    DataFingerprint,
    augments_on_device,
    build_data_loader,
    device_batches,
    worker_processes,
)
from dinopre.files.checkpoint import FORMAT_VERSION, KIND_TRAINING, CheckpointError, backbone_metadata
from dinopre.files.export import write_backbone
from dinopre.files.outputs import check_export_paths, check_parent_writable
from dinopre.files.rundir import NullRunDirectory, RunDirectory
from dinopre.model.method import StudentTeacher
from dinopre.model.optim import apply_schedules, cancel_gradients, clip_gradients_per_tensor
from dinopre.model.schedules import Schedules, epochs_to_steps
from dinopre.model.vit import count_parameters
from dinopre.progress import NullReporter
from dinopre.train.build import RunParts, build_run
from dinopre.train.evaluation import Evaluator, collapse_message, collapse_verdict, monitor_indices, scan_labelled
from dinopre.train.resume import continued_config, load_resume_state
from dinopre.train.runtime import Runtime, device_type, rng_state, set_rng_state, share_cpus
from dinopre.train.trackers import Trackers, check_installed
from dinopre.viz.attention import compute_figure
from dinopre.viz.figures import save_png
from dinopre.viz.preview import VIEWS, first_images, write_views


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


# ============ building the run ============


def recipe_record(recipe: ResolvedRecipe) -> dict[str, Any]:
    """params.json's account of the recipe: its name and each setting it chose, with the value and why."""
    config = recipe.config
    return {"name": config.method.recipe,
            "derived": {name: {"value": setting(config, name), "reason": reason}
                        for name, reason in recipe.derived.items()}}


def environment_info(runtime: Runtime, num_workers: int, augment_on_device: bool = False, world_size: int = 1,
                     batch_per_rank: int | None = None) -> dict[str, Any]:
    """What the run executed on, saved next to the config in params.json (with the number of training processes
    and each one's share of the global batch)."""
    info: dict[str, Any] = {
        "dinopre": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(runtime.device),
        "precision": runtime.precision_name,
        "num_workers": num_workers,
        "augment_on": "device" if augment_on_device else "workers",
        "torch_threads": torch.get_num_threads(),
        "world_size": world_size,
        "batch_per_rank": batch_per_rank,
        "argv": sys.argv,
    }
    if runtime.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(runtime.device)
    return info


def build_evaluator(config: PretrainConfig, source: ImageSource, num_workers: int) -> Evaluator:
    """The probe images of a run: its `--eval-dir` (if any) and the monitored subset of its training images.

    Raises:
        DataError: the --eval-dir cannot be used.
    """
    e = config.eval
    labelled = scan_labelled(e.eval_dir, config.run.seed, e.eval_test_share) if e.eval_dir else None
    monitored = monitor_indices(len(source), e.monitor_images, config.run.seed)
    return Evaluator(config.model.image_size, [lambda i=i: source.load(i) for i in monitored], labelled,
                     k=e.knn_k, temperature=e.knn_temperature, threads=max(1, num_workers))


# ============ one training step ============


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
    # apply schedules
    apply_schedules(optimizer, values["lr"], values["weight_decay"])
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
    optimizer.step()
    method.constrain()
    mark("optimizer")
    # teacher EMA
    method.update_teacher(values["momentum"])
    mark("teacher")
    return {name: value.detach() for name, value in losses.items()}


# ============ the run ============


@dataclass
class _Run:
    """Everything a run needs while it loops, and the progress that checkpoints save."""

    config: PretrainConfig
    files: RunDirectory
    runtime: Runtime
    method: StudentTeacher
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    steps_per_epoch: int
    reporter: Reporter
    data_fingerprint: DataFingerprint
    source: ImageSource
    stop: StopSignals
    evaluator: Evaluator | None  # the main process's (the others do not evaluate)
    derived: dict[str, str]  # {setting: reason} of what the recipe chose
    model: torch.nn.Module  # what a step calls (the method, in DDP with several processes)
    num_workers: int
    world_size: int = 1
    trackers: Trackers | None = None  # the main process's experiment trackers
    bad_files: dict[str, str] = field(default_factory=dict)  # {file: reason} of files that could not be used
    last_saved_step: int = -1
    epoch: int = 0  # completed epochs
    step_in_epoch: int = 0  # steps done in the epoch in progress
    global_step: int = 0
    loss_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # of the epoch in progress
    epoch_losses: list[float] = field(default_factory=list)
    epoch_parts: list[dict[str, float]] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = -1  # of checkpoint_best.pt, 0-based
    best_knn: float | None = None
    evaluations: list[dict[str, Any]] = field(default_factory=list)  # one record per completed epoch

    @property
    def frozen_steps(self) -> int:
        """Steps at the start during which the prototype layer is not updated."""
        return epochs_to_steps(self.config.optim.freeze_last_layer_epochs, self.steps_per_epoch)


def fit(config: PretrainConfig, reporter: Reporter, *, overwrite: bool = False,
        resume_from: str | Path | None = None, inputs: tuple[Path, ...] = ()) -> FitResult:
    """Train a model as configured (or continue a checkpoint) and write the run directory.

    Args:
        config: the validated configuration.
        reporter: receives progress events.
        overwrite: start over in an output folder that already holds a run.
        resume_from: a training checkpoint to continue; `config` may differ from its configuration only in
            `config.RESUME_MAY_CHANGE`.
        inputs: files the command read (its config file), which the run must never write over.

    Returns:
        The run's summary.

    Raises:
        UserError: bad data, an unusable output folder, device or checkpoint, or an incompatible resume.
        TrainingStopped: a non-finite loss; the last good checkpoint is kept.
    """
    started = time.perf_counter()
    with StopSignals() as stop, distributed.session(device_type(config.run.device)):
        return _fit(config, reporter if distributed.is_main() else NullReporter(), overwrite, resume_from, inputs,
                    stop, started)


def _fit(config: PretrainConfig, reporter: Reporter, overwrite: bool, resume_from: str | Path | None,
         inputs: tuple[Path, ...], stop: StopSignals, started: float) -> FitResult:
    files: RunDirectory | None = None
    error: UserError | None = None
    trackers: Trackers | None = None
    try:  # every process sets up; a failure on any of them stops all of them here (`distributed.agree`)
        if distributed.is_main():
            check_installed(config.run.logger)  # before anything is trained
        state = load_resume_state(resume_from, config) if resume_from is not None else None
        if state is not None:
            config = continued_config(config, state)
        parts = build_run(config, reporter, state.get("recipe") if state is not None else None,
                          rescan=state is not None)
        if state is not None:  # refusals before anything in the run folder is touched
            refusal, _ = parts.data.fingerprint.change(state.get("data", {}))
            if refusal is not None:
                raise ConfigError(refusal)
            _load_weights(parts.method, parts.optimizer, state)
        evaluator = build_evaluator(parts.config, parts.data.source, parts.num_workers) if distributed.is_main() \
            else None
        if parts.config.run.export_backbone and distributed.is_main():  # at the start, not after hours of training
            _check_export_path(parts.config, may_replace=overwrite or state is not None, inputs=inputs,
                               resume_from=resume_from)
        folder = Path(parts.config.run.output_dir)
        files = RunDirectory(folder) if distributed.is_main() else NullRunDirectory(folder)
        files.prepare(overwrite=overwrite, resuming=state is not None)  # holds the folder until the run ends
        if parts.config.run.logger and distributed.is_main():
            trackers = Trackers(reporter, parts.config.run.logger, files.path, config_to_dict(parts.config),
                                state.get("trackers") if state is not None else None,
                                state["global_step"] if state is not None else 0)
            reporter = trackers
    except UserError as exc:
        error = exc
    try:
        distributed.agree(error)
        _check_same_data(parts)
        return _start(parts, files, reporter, state, evaluator, stop, started, inputs, resume_from, trackers)
    finally:
        if trackers is not None:
            trackers.close()
        if files is not None:
            files.unlock()


def _check_same_data(parts: RunParts) -> None:
    """Refuse to train when the processes found different images (a folder that changed between their scans)."""
    fingerprint = parts.data.fingerprint
    digests = distributed.gather((fingerprint.count, fingerprint.names, fingerprint.sizes))
    if any(d != digests[0] for d in digests):
        raise distributed.mark_collective(DataError(
            "The training processes found different images (the folder changed while they scanned it); start again "
            "once it no longer changes."))


def _start(parts: RunParts, files: RunDirectory, reporter: Reporter, state: dict[str, Any] | None,
           evaluator: Evaluator | None, stop: StopSignals, started: float, inputs: tuple[Path, ...],
           resume_from: str | Path | None, trackers: Trackers | None = None) -> FitResult:
    """Restore a resumed run, write params.json, announce the run and train."""
    config, runtime, data, recipe, method = parts.config, parts.runtime, parts.data, parts.recipe, parts.method
    run = _Run(config, files, runtime, method, parts.optimizer, parts.schedules, parts.steps_per_epoch, reporter,
               data.fingerprint, data.source, stop, evaluator, recipe.derived, parts.model, parts.num_workers,
               parts.world_size, trackers)
    if state is not None:
        _restore(run, state)
    share_cpus(runtime, distributed.local_world_size())
    on_device = augments_on_device(config)
    files.write_params({"config": config_to_dict(config), "recipe": recipe_record(recipe),
                        "environment": environment_info(runtime, parts.num_workers, on_device, parts.world_size,
                                                        parts.batch_per_rank)})
    if distributed.is_main() and state is None:  # what the first batch's views look like (`dinopre preview`)
        views = write_views(config, data.source, files.path / VIEWS, device=runtime.device)
        if trackers is not None:
            trackers.log_image("views", views, 0)
    reporter.emit(RunStarted(
        config, files.path, len(data.source), data.description, parts.steps_per_epoch,
        parts.steps_per_epoch * config.optim.epochs, str(runtime.device), runtime.precision_name, parts.num_workers,
        {f"student {name.replace('_', ' ')}": count_parameters(module) for name, module in method.student.items()},
        Path(resume_from) if resume_from is not None else None, run.global_step,
        tuple(advisories(config, len(data.source), set(recipe.derived))) + data.warnings
        + _evaluation_notes(evaluator) + _data_notes(data.fingerprint, state) + _process_notes(parts),
        "device" if on_device else "workers", tuple(recipe.notes()),
    ))
    return _train(run, started, inputs, resume_from)


def _process_notes(parts: RunParts) -> tuple[str, ...]:
    if parts.world_size == 1:
        return ()
    return (f"{parts.world_size} processes train together: each takes {parts.batch_per_rank} images of every global "
            f"batch of {parts.config.optim.batch_size}; this process (rank 0) writes the run directory.",)


def _train(run: _Run, started: float, inputs: tuple[Path, ...], resume_from: str | Path | None) -> FitResult:
    """The loop over the remaining steps, then the export and the summary."""
    config, files, runtime, data = run.config, run.files, run.runtime, run.source
    sampler = EpochBatchSampler(len(data), config.optim.batch_size, config.run.seed, run.epoch, config.optim.epochs,
                                run.step_in_epoch, distributed.rank(), run.world_size)
    loader, render = build_data_loader(config, data, runtime.device, sampler, run.num_workers)
    with worker_processes(loader) as loaded:
        run.stop.deferring = True  # from here a signal lets the current step finish and saves a checkpoint
        _loop(run, device_batches(loaded, runtime.device, render))
        run.stop.deferring = False
    export_path = _export(run, inputs, resume_from) if config.run.export_backbone and distributed.is_main() else None
    report = files.write_bad_files(run.bad_files) if run.bad_files else None
    run.reporter.emit(RunFinished(files.path, run.best_loss, run.best_epoch, files.last, files.best, export_path,
                                  time.perf_counter() - started, len(run.bad_files), report,
                                  config.resolved_best_by, run.best_knn))
    return FitResult(files.path, run.best_loss, run.best_epoch, run.epoch_losses, export_path, run.epoch_parts,
                     run.evaluations)


def _data_notes(fingerprint: DataFingerprint, state: dict[str, Any] | None) -> tuple[str, ...]:
    """What a resumed run should know about its images (rewritten files are refused in `_restore`)."""
    if state is None:
        return ()
    _, warning = fingerprint.change(state.get("data", {}))
    return (warning,) if warning else ()


def _evaluation_notes(evaluator: Evaluator | None) -> tuple[str, ...]:
    if evaluator is None or not evaluator.skipped:
        return ()
    name, reason = evaluator.skipped[0]
    return (f"{len(evaluator.skipped)} image(s) of --eval-dir could not be decoded and are left out of the k-NN "
            f"(e.g. '{name}': {reason}).",)


def _load_weights(method: StudentTeacher, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Put a checkpoint's weights and optimizer state in place (before anything in the run folder is touched, so
    a checkpoint of another architecture is refused without a trace)."""
    try:
        method.student.load_state_dict(state["student"])
        method.teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 300 else detail[:detail.rfind(" ", 0, 297)] + " ..."
        raise CheckpointError(f"The checkpoint does not fit the model of its own configuration ({detail}).") from None


def _restore(run: _Run, state: dict[str, Any]) -> None:
    """Put a run back exactly where the checkpoint left it (its weights are in place already: `_load_weights`)."""
    for name, tensor in state["loss"].items():
        getattr(run.method.dino_loss if name == "center" else run.method.patch_loss, "center").copy_(tensor)
    rng, loss_sums = _share_of(state, run.world_size)
    if rng is not None:
        set_rng_state(rng, run.runtime.device)
    run.epoch, run.step_in_epoch, run.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
    run.loss_sums = {k: v.to(run.runtime.device) for k, v in loss_sums.items()}
    run.epoch_losses, run.epoch_parts = list(state["epoch_losses"]), list(state["epoch_parts"])
    run.best_loss, run.best_epoch = state["best_loss"], state["best_epoch"] - 1
    run.best_knn = state.get("best_knn")
    run.evaluations = [dict(record) for record in state.get("evaluations", [])]
    run.files.truncate_metrics(run.global_step)
    run.bad_files = run.files.read_bad_files()
    run.last_saved_step = run.global_step


def _share_of(state: dict[str, Any], world_size: int) -> tuple[dict[str, torch.Tensor] | None,
                                                             dict[str, torch.Tensor]]:
    """This process's generator states and partial loss sums in a checkpoint.

    On as many processes as wrote it, each takes back its own, so the continuation is bit for bit the uninterrupted
    run. On another number, the loss sums of the epoch in progress are the processes' mean (the epoch's mean loss
    comes out the same) and only the main process takes a generator state back (it drives only drop path; the data
    and augmentation draws are keyed by sample).
    """
    shares = state.get("ranks")
    if shares is not None and len(shares) == world_size:
        share = shares[distributed.rank()]
        return share["rng"], share["loss_sums"]
    return (state["rng"] if distributed.is_main() else None), state["loss_sums"]


# ============ the loop ============


def _loop(run: _Run, batches: Any) -> None:
    config = run.config
    method = run.method.train()
    for epoch in range(run.epoch, config.optim.epochs):
        epoch_start = time.perf_counter()
        if not run.loss_sums:
            run.loss_sums = {name: torch.zeros((), device=run.runtime.device) for name in method.loss_names}
        window = _LogWindow()
        while run.step_in_epoch < run.steps_per_epoch:
            signum = distributed.stop_requested(run.stop.received, run.runtime.device)
            if signum is not None:
                _stop(run, signum)
            wait_start = time.perf_counter()
            batch = next(batches)
            window.data_wait += time.perf_counter() - wait_start
            if batch.bad:
                _note_bad_files(run, batch.bad)
            values = run.schedules.at(run.global_step)
            done_in_epoch = run.step_in_epoch + 1
            log_now = done_in_epoch % config.run.log_interval == 0 or done_in_epoch == run.steps_per_epoch
            losses = train_step(method, run.optimizer, batch, values, runtime=run.runtime,
                                clip_grad_norm=config.optim.clip_grad_norm,
                                freeze_last_layer=run.global_step < run.frozen_steps,
                                diagnostics=log_now, model=run.model)
            for name, total in run.loss_sums.items():
                total += losses[name]
            run.global_step, run.step_in_epoch = run.global_step + 1, done_in_epoch
            window.images += batch.batch_size * run.world_size
            if log_now:
                _log_step(run, epoch, losses, values, window)
                window = _LogWindow()
            every = config.run.checkpoint_every
            if every and run.global_step % every == 0 and done_in_epoch < run.steps_per_epoch:
                _save(run, best=False, mid_epoch=True)
        _end_epoch(run, epoch, time.perf_counter() - epoch_start)


@dataclass
class _LogWindow:
    """Counters between two log lines."""

    start: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    images: int = 0


def _log_step(run: _Run, epoch: int, losses: dict[str, torch.Tensor], values: dict[str, float],
              window: _LogWindow) -> None:
    metrics = _mean_over_processes(losses)  # the one host sync per log interval
    if not all(math.isfinite(v) for v in metrics.values()):
        parts = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        raise _together(TrainingStopped(
            f"The loss became non-finite at step {run.global_step} (epoch {epoch + 1}): {parts}. The last good "
            f"checkpoint in '{run.files.path}' is kept; lower --learning-rate or --teacher-temp, or use "
            "--precision fp32."
        ))
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    metrics.update(values)
    metrics["images_per_sec"] = window.images / elapsed
    metrics["data_wait"] = min(1.0, window.data_wait / elapsed)
    run.files.append_metrics({"type": "step", "epoch": epoch + 1, "step": run.global_step, **metrics})
    run.reporter.emit(StepLogged(epoch, run.config.optim.epochs, run.step_in_epoch, run.steps_per_epoch,
                                 run.global_step, run.steps_per_epoch * run.config.optim.epochs, metrics))


def _mean_over_processes(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Floats of the processes' mean of each value (each process's own values in a single process)."""
    if len(values) == 0 or distributed.launch() is None:
        return {name: float(value) for name, value in values.items()}
    stacked = all_reduce_mean(torch.stack([value.float() for value in values.values()]))
    return dict(zip(values, stacked.tolist()))


def _together(error: BaseException) -> BaseException:
    """An error every process raises at the same step (decided on values they share)."""
    return distributed.mark_collective(error)


def _end_epoch(run: _Run, epoch: int, seconds: float) -> None:
    means = {name: total / run.steps_per_epoch for name, total in _mean_over_processes(run.loss_sums).items()}
    loss = means["loss"]
    if not math.isfinite(loss):
        raise _together(TrainingStopped(
            f"The mean loss of epoch {epoch + 1} is non-finite ({loss}); the last good checkpoint in "
            f"'{run.files.path}' is kept. Lower --learning-rate or use --precision fp32."))
    run.epoch_losses.append(loss)
    run.epoch_parts.append(means)
    evaluation = _evaluate(run, epoch) if run.evaluator is not None else {}
    knn = evaluation.get("knn")
    if run.config.resolved_best_by == "knn":
        is_best = knn is not None and (run.best_knn is None or knn > run.best_knn)
    else:
        is_best = loss < run.best_loss
    run.best_loss = min(run.best_loss, loss)
    if knn is not None:
        run.best_knn = knn if run.best_knn is None else max(run.best_knn, knn)
    if is_best:
        run.best_epoch = epoch
    run.evaluations.append({"epoch": epoch + 1, **evaluation})
    run.epoch, run.step_in_epoch, run.loss_sums = epoch + 1, 0, {}
    images_per_sec = run.steps_per_epoch * run.config.optim.batch_size / max(seconds, 1e-9)
    # The record goes first: a crash before the checkpoint is written drops it again on resume.
    run.files.append_metrics({"type": "epoch", "epoch": epoch + 1, "step": run.global_step, **means,
                              "best": is_best, "seconds": seconds, "images_per_sec": images_per_sec, **evaluation})
    verdict = evaluation.get("collapse")
    if verdict is not None:
        message = collapse_message(verdict, evaluation)
        run.files.append_metrics({"type": "warning", "kind": "collapse", "collapse": verdict, "epoch": epoch + 1,
                                  "step": run.global_step, "message": message})
    _save(run, best=is_best, mid_epoch=False)
    run.reporter.emit(EpochEnded(epoch, run.config.optim.epochs, loss, is_best, seconds, images_per_sec, means,
                                 evaluation, run.global_step))
    if run.trackers is not None and _eval_epoch(run, epoch):
        _log_attention(run, epoch)
    if verdict is not None:
        run.reporter.emit(CollapseWarning(epoch, verdict, message))


def _eval_epoch(run: _Run, epoch: int) -> bool:
    """Whether epoch `epoch` (0-based) is one of the --eval-every epochs (the last one always is)."""
    return (epoch + 1) % run.config.eval.eval_every == 0 or epoch + 1 == run.config.optim.epochs


ATTENTION_IMAGES = 4  # fixed training images whose attention grid the trackers get


def _log_attention(run: _Run, epoch: int) -> None:
    """The teacher's attention maps of a few fixed training images (the first the run visits), written into the
    run directory (attention/epoch_NNNN.png) and sent to the trackers."""
    assert run.trackers is not None
    backbone = run.method.teacher["backbone"]
    indices = first_images(run.config, min(ATTENTION_IMAGES, len(run.source)), 0, len(run.source))
    loaders = []
    for i in indices:
        try:
            image = run.source.load(i)
        except BadImageError:  # listed in bad_files.json already; the grid shows the others
            continue
        loaders.append((run.source.describe(i).rsplit("/", 1)[-1], lambda image=image: image))
    if not loaders:
        return
    figure = compute_figure(backbone, run.config.model.patch_size, loaders, run.config.model.image_size)
    path = save_png(figure.grid(96).render(), run.files.path / "attention" / f"epoch_{epoch + 1:04d}.png")
    run.trackers.log_image("attention", path, run.global_step)


def _evaluate(run: _Run, epoch: int) -> dict[str, Any]:
    """The teacher's label-free signals (every epoch) and k-NN accuracy (every --eval-every epochs and at the
    end), with the collapse verdict; evaluation draws no random numbers, so a resumed run stays identical.

    Only the main process evaluates (its teacher is every process's teacher); its reductions stay local, the
    others wait at the next step's collective.
    """
    with local_collectives():
        return _evaluate_here(run, epoch)


def _evaluate_here(run: _Run, epoch: int) -> dict[str, Any]:
    assert run.evaluator is not None
    e, started = run.config.eval, time.perf_counter()
    teacher, device = run.method.teacher, run.runtime.device
    temp = run.schedules.at(max(run.global_step - 1, 0))["teacher_temp"]
    loss = run.method.dino_loss
    out: dict[str, Any] = run.evaluator.signals(teacher["backbone"], teacher["head"],
                                                lambda logits: loss.teacher_targets(logits, temp), device)
    last = epoch + 1 == run.config.optim.epochs
    if run.evaluator.has_knn and ((epoch + 1) % e.eval_every == 0 or last):
        out["knn"] = run.evaluator.knn(teacher["backbone"], device)
    out["collapse"] = collapse_verdict(out)
    out["eval_seconds"] = time.perf_counter() - started
    return out


def _save(run: _Run, *, best: bool, mid_epoch: bool) -> None:
    """Write checkpoint_last.pt (every process calls this at the same step; the main process writes)."""
    shares = _gather_shares(run)  # one sync per checkpoint
    if any(share["loss_sums"] and not bool(torch.isfinite(share["loss_sums"]["loss"])) for share in shares):
        raise _together(TrainingStopped(
            f"The loss became non-finite before step {run.global_step} (epoch {run.epoch + 1}); the last good "
            f"checkpoint in '{run.files.path}' is kept. Lower --learning-rate or --teacher-temp, or use "
            "--precision fp32."
        ))
    for share in shares[1:]:  # files only the other processes met
        run.bad_files.update(share["bad_files"])
    if run.bad_files:
        run.files.write_bad_files(run.bad_files)
    path = run.files.save_checkpoint(_training_state(run, shares), best=best)
    run.last_saved_step = run.global_step
    run.reporter.emit(CheckpointSaved(path, run.epoch, run.global_step, mid_epoch))


def _gather_shares(run: _Run) -> list[dict[str, Any]]:
    """Each process's part of the run state, in rank order: generator states, partial loss sums, bad files."""
    mine = {"rng": rng_state(run.runtime.device),
            "loss_sums": {k: v.detach().clone() for k, v in run.loss_sums.items()},
            "bad_files": dict(run.bad_files)}
    if distributed.launch() is None:
        return [mine]
    mine["rng"] = {k: v.cpu() for k, v in mine["rng"].items()}  # pickled across processes: host tensors only
    mine["loss_sums"] = {k: v.cpu() for k, v in mine["loss_sums"].items()}
    return distributed.gather(mine)


def _stop(run: _Run, signum: int) -> None:
    """SIGINT/SIGTERM arrived (at any process): checkpoint between two steps (unless just done) and leave with
    128 + signal, all processes at the same step."""
    run.stop.received = signum
    if run.last_saved_step != run.global_step:
        _save(run, best=False, mid_epoch=True)
    run.reporter.emit(Stopped(run.stop.name, run.global_step, run.files.last))
    distributed.barrier()  # no process leaves (and makes torchrun stop the others) before the checkpoint is written
    raise _together(Interrupted(
        f"Stopped by {run.stop.name} at step {run.global_step}; checkpoint saved in '{run.files.last}'. "
        f"Continue with: dinopre resume {run.files.path}", 128 + signum
    ))


def _note_bad_files(run: _Run, records: list[tuple[int, str]]) -> None:
    """Remember files that could not be decoded; stop with --strict-data or when the data is broken."""
    good_records = [(index, reason) for index, reason in records if index != EXHAUSTED]
    for index, reason in good_records:
        run.bad_files[run.source.describe(index)] = reason
    if run.config.data.strict_data:
        name, reason = next(iter(run.bad_files.items()))
        raise DataError(f"'{name}' cannot be used ({reason}); fix or remove it, or drop --strict-data to skip "
                        "such files.")
    if len(good_records) < len(records):
        example, reason = run.source.describe(good_records[0][0]), good_records[0][1]
        tried = next(r for i, r in records if i == EXHAUSTED)
        raise DataError(f"For one image {tried.removeprefix('none of ').split(' files')[0]} files were tried and "
                        f"none could be decoded (e.g. '{example}': {reason}); the training folder looks broken.")


def _training_state(run: _Run, shares: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything needed to continue the run, as tensors and plain values (weights_only-loadable).

    With several processes, `ranks` keeps each one's generator states and partial loss sums (`_share_of`), and
    `rng` / `loss_sums` the main process's states and the processes' mean sums, which any number of processes
    can continue from.
    """
    state = {
        "kind": KIND_TRAINING,
        "format_version": FORMAT_VERSION,
        "dinopre_version": __version__,
        "config": config_to_dict(run.config),
        "epoch": run.epoch,
        "step_in_epoch": run.step_in_epoch,
        "global_step": run.global_step,
        "student": run.method.student.state_dict(),
        "teacher": run.method.teacher.state_dict(),
        "loss": run.method.loss_state(),
        "loss_sums": _mean_sums(shares, run.runtime.device),
        "optimizer": run.optimizer.state_dict(),
        "rng": shares[0]["rng"],
        "best_loss": run.best_loss,
        "best_epoch": run.best_epoch + 1,
        "epoch_losses": list(run.epoch_losses),
        "epoch_parts": [dict(p) for p in run.epoch_parts],
        "best_knn": run.best_knn,
        "recipe": dict(run.derived),
        "evaluations": [dict(record) for record in run.evaluations],
        "data": run.data_fingerprint.to_state(),
        "world_size": run.world_size,
        "trackers": run.trackers.run_ids if run.trackers is not None else {},
    }
    if len(shares) > 1:
        state["ranks"] = [{"rng": share["rng"], "loss_sums": share["loss_sums"]} for share in shares]
    return state


def _mean_sums(shares: list[dict[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
    if len(shares) == 1:
        return shares[0]["loss_sums"]
    return {name: (sum(share["loss_sums"][name] for share in shares) / len(shares)).to(device)
            for name in shares[0]["loss_sums"]}


def _check_export_path(config: PretrainConfig, *, may_replace: bool, inputs: tuple[Path, ...],
                       resume_from: str | Path | None) -> None:
    """Refuse an export path (or its sidecar) that cannot or should not be written: an existing file without
    --overwrite (or a resume), a folder or special file, the config file or the checkpoint being read."""
    path = Path(config.run.export_backbone)
    protected = [*inputs, *([Path(resume_from)] if resume_from is not None else [])]
    check_export_paths(path, force=may_replace, inputs=protected, what="--export-backbone", flag="--overwrite")
    check_parent_writable(path, "the --export-backbone file")


def _export(run: _Run, inputs: tuple[Path, ...], resume_from: str | Path | None) -> Path:
    """Write the teacher backbone as `--export-backbone` asked, in the pipeline's `slt` format (the writer
    `dinopre export` uses, which reloads the file strictly), and record it in artifacts.json."""
    path = Path(run.config.run.export_backbone)
    metadata = backbone_metadata(config_to_dict(run.config), epoch=run.epoch, weights="teacher")
    protected = [*inputs, *([Path(resume_from)] if resume_from is not None else [])]
    # Replacing was agreed to when the run started (the path did not exist, or --overwrite or a resume).
    path, sidecar = write_backbone(run.method.teacher["backbone"].state_dict(), metadata, path, force=True,
                                   inputs=protected, what="--export-backbone", flag="--overwrite")
    run.files.record(path, "export-slt", epoch=run.epoch)
    run.files.record(sidecar, "export-metadata", epoch=run.epoch)
    return path
