"""The shared core: `fit(config, reporter)` builds everything, runs the loop, writes the run directory.

The engine never prints: it sends events to a `Reporter` (style principle 9); `dinopre.progress` renders them.
Run directory (design.md section 1): `checkpoint_last.pt` every epoch, `checkpoint_best.pt` (lowest epoch mean
loss), `params.json` (resolved config + environment), `metrics.jsonl` (one JSON object per log step and per
epoch), `artifacts.json` (every checkpoint and export written, with its sha256), and the export when asked.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from dinopre import __version__
from dinopre.augment import ColorJitterSettings, MultiCropAugmentation
from dinopre.checkpoint import (
    FORMAT_VERSION,
    KIND_TRAINING,
    atomic_save,
    atomic_write_text,
    backbone_metadata,
    export_backbone_slt,
    sha256_file,
)
from dinopre.config import PretrainConfig, config_to_dict
from dinopre.data import (
    EpochBatchSampler,
    FolderSource,
    ImageSource,
    MultiCropDataset,
    SyntheticSource,
    build_loader,
    check_dataset_size,
    scan_image_files,
)
from dinopre.errors import RunDirError, TrainingStopped
from dinopre.masking import MaskSampler
from dinopre.method import StudentTeacher, build_method
from dinopre.optim import apply_schedules, build_optimizer, cancel_gradients, clip_gradients_per_tensor
from dinopre.runtime import Runtime, default_num_workers, rng_state, setup
from dinopre.schedules import Schedules, build_schedules
from dinopre.vit import count_parameters

CHECKPOINT_LAST, CHECKPOINT_BEST = "checkpoint_last.pt", "checkpoint_best.pt"


# ============ events and the reporter protocol ============


@dataclass(frozen=True)
class RunStarted:
    config: PretrainConfig
    run_dir: Path
    num_images: int
    data_description: str
    steps_per_epoch: int
    total_steps: int
    device: str
    precision: str
    num_workers: int
    parameters: dict[str, int]


@dataclass(frozen=True)
class StepLogged:
    epoch: int  # 0-based
    epochs: int
    step_in_epoch: int  # steps done in this epoch
    steps_per_epoch: int
    global_step: int  # steps done in the run
    total_steps: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class EpochEnded:
    epoch: int  # 0-based
    epochs: int
    loss: float
    is_best: bool
    seconds: float
    images_per_sec: float
    parts: dict[str, float]  # epoch means of the loss and its parts


@dataclass(frozen=True)
class RunFinished:
    run_dir: Path
    best_loss: float
    best_epoch: int  # 0-based
    last_checkpoint: Path
    best_checkpoint: Path
    export_path: Path | None
    seconds: float


class Reporter(Protocol):
    """Receives the engine's events (RunStarted, StepLogged, EpochEnded, RunFinished)."""

    def emit(self, event: object) -> None: ...


@dataclass
class FitResult:
    """What a finished run leaves behind."""

    run_dir: Path
    best_loss: float
    best_epoch: int
    epoch_losses: list[float]
    export_path: Path | None = None
    epoch_parts: list[dict[str, float]] = field(default_factory=list)


# ============ building the run ============


def build_augmentation(config: PretrainConfig) -> MultiCropAugmentation:
    """The multi-crop augmentation of a configuration."""
    d = config.data
    return MultiCropAugmentation(
        global_size=config.model.image_size,
        local_size=d.local_crop_size,
        num_local_crops=d.num_local_crops,
        global_scale=d.global_crop_scale,
        local_scale=d.local_crop_scale,
        flip_prob=d.flip_prob,
        jitter=ColorJitterSettings(d.brightness, d.contrast, d.saturation, d.hue, d.jitter_prob),
        grayscale_prob=d.grayscale_prob,
        blur_sigma=d.blur_sigma,
    )


def build_mask_sampler(config: PretrainConfig) -> MaskSampler | None:
    """iBOT's mask generator for the global views; None for DINO."""
    m = config.method
    if m.algorithm != "ibot":
        return None
    return MaskSampler(config.model.image_size // config.model.patch_size, m.mask_probability,
                       m.patch_mask_ratio, m.mask_shape)


def build_source(config: PretrainConfig) -> tuple[ImageSource, str]:
    """The images of a run and a one-line description of them."""
    if config.data.demo and not config.data.train_dir:
        source = SyntheticSource(config.preset, config.data.demo_images)
        return source, f"{len(source)} built-in synthetic {config.preset} crops (--demo)"
    files = scan_image_files(config.data.train_dir)
    return FolderSource(tuple(files)), f"{len(files)} images under {', '.join(config.data.train_dir)}"


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create the output folder; refuse to start over a run that has checkpoints unless `overwrite`.

    Raises:
        RunDirError: checkpoints exist and `overwrite` is False, or the folder cannot be created or written.
    """
    existing = [name for name in (CHECKPOINT_LAST, CHECKPOINT_BEST) if (run_dir / name).exists()]
    if existing and not overwrite:
        raise RunDirError(
            f"'{run_dir}' already holds a run ({existing[0]}); continue it with `dinopre resume {run_dir}`, "
            "start over with --overwrite, or choose another --output-dir."
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"Cannot write to output folder '{run_dir}': {exc.strerror or exc}; "
                          "choose another --output-dir.") from None
    if overwrite:
        for name in ("metrics.jsonl", "artifacts.json"):
            (run_dir / name).unlink(missing_ok=True)


def environment_info(runtime: Runtime, num_workers: int) -> dict[str, Any]:
    """What the run executed on, saved next to the config in params.json."""
    info: dict[str, Any] = {
        "dinopre": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(runtime.device),
        "precision": runtime.precision_name,
        "num_workers": num_workers,
        "torch_threads": torch.get_num_threads(),
        "argv": sys.argv,
    }
    if runtime.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(runtime.device)
    return info


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
) -> dict[str, torch.Tensor]:
    """One optimizer step of DINO; returns the detached loss parts (no host synchronisation)."""
    # apply schedules
    apply_schedules(optimizer, values["lr"], values["weight_decay"])
    # forward and losses (trunk in autocast, loss maths in fp32)
    with runtime.autocast():
        losses = method(batch, values["teacher_temp"], values.get("teacher_patch_temp"), diagnostics=diagnostics)
    # backward, clip, step (dino order: clip, then cancel the last layer's gradients)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if clip_grad_norm > 0:
        clip_gradients_per_tensor(method.trainable_parameters(), clip_grad_norm)
    if freeze_last_layer:
        cancel_gradients(method.last_layer_parameters())
    optimizer.step()
    # teacher EMA
    method.update_teacher(values["momentum"])
    return {name: value.detach() for name, value in losses.items()}


# ============ the run ============


@dataclass
class _Run:
    """Everything a run needs while it loops."""

    config: PretrainConfig
    run_dir: Path
    runtime: Runtime
    method: StudentTeacher
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    steps_per_epoch: int
    reporter: Reporter
    epoch_losses: list[float] = field(default_factory=list)
    epoch_parts: list[dict[str, float]] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = -1
    global_step: int = 0
    artifacts: dict[str, Any] = field(default_factory=dict)


def fit(config: PretrainConfig, reporter: Reporter, *, overwrite: bool = False) -> FitResult:
    """Train a model as configured and write the run directory.

    Args:
        config: the validated configuration.
        reporter: receives progress events.
        overwrite: start over in an output folder that already holds a run.

    Returns:
        The run's summary.

    Raises:
        UserError: bad data, an unusable output folder or device.
        TrainingStopped: a non-finite loss; the last good checkpoint is kept.
    """
    started = time.perf_counter()
    runtime = setup(config.run.device, config.run.precision, config.run.seed)
    run_dir = Path(config.run.output_dir)
    source, description = build_source(config)
    steps_per_epoch = check_dataset_size(len(source), config.optim.batch_size)
    prepare_run_dir(run_dir, overwrite)
    method = build_method(config).to(runtime.device)
    run = _Run(config, run_dir, runtime, method, build_optimizer(method.student, runtime.device),
               build_schedules(config, steps_per_epoch), steps_per_epoch, reporter)
    num_workers = config.data.num_workers if config.data.num_workers is not None else default_num_workers()
    params = {"config": config_to_dict(config), "environment": environment_info(runtime, num_workers)}
    atomic_write_text(json.dumps(params, indent=2) + "\n", run_dir / "params.json")
    reporter.emit(RunStarted(
        config, run_dir, len(source), description, steps_per_epoch, steps_per_epoch * config.optim.epochs,
        str(runtime.device), runtime.precision_name, num_workers,
        {f"student {name.replace('_', ' ')}": count_parameters(module) for name, module in method.student.items()},
    ))
    dataset = MultiCropDataset(source, build_augmentation(config), config.run.seed, build_mask_sampler(config))
    sampler = EpochBatchSampler(len(source), config.optim.batch_size, config.run.seed, 0, config.optim.epochs)
    loader = build_loader(dataset, sampler, num_workers, pin_memory=runtime.device.type == "cuda")
    _loop(run, iter(loader))
    export_path = _export(run) if config.run.export_backbone else None
    reporter.emit(RunFinished(run_dir, run.best_loss, run.best_epoch, run_dir / CHECKPOINT_LAST,
                              run_dir / CHECKPOINT_BEST, export_path, time.perf_counter() - started))
    return FitResult(run_dir, run.best_loss, run.best_epoch, run.epoch_losses, export_path, run.epoch_parts)


def _loop(run: _Run, batches: Any) -> None:
    config = run.config
    method = run.method.train()
    for epoch in range(config.optim.epochs):
        epoch_start = time.perf_counter()
        loss_sums = {name: torch.zeros((), device=run.runtime.device) for name in method.loss_names}
        window = _LogWindow()
        for step_in_epoch in range(run.steps_per_epoch):
            wait_start = time.perf_counter()
            batch = next(batches).to(run.runtime.device)
            window.data_wait += time.perf_counter() - wait_start
            values = run.schedules.at(run.global_step)
            log_now = (step_in_epoch + 1) % config.run.log_interval == 0 or step_in_epoch + 1 == run.steps_per_epoch
            losses = train_step(method, run.optimizer, batch, values, runtime=run.runtime,
                                clip_grad_norm=config.optim.clip_grad_norm,
                                freeze_last_layer=epoch < config.optim.freeze_last_layer_epochs,
                                diagnostics=log_now)
            for name, total in loss_sums.items():
                total += losses[name]
            run.global_step += 1
            window.images += batch.batch_size
            if log_now:
                _log_step(run, epoch, step_in_epoch + 1, losses, values, window)
                window = _LogWindow()
        seconds = time.perf_counter() - epoch_start
        means = {name: float(total) / run.steps_per_epoch for name, total in loss_sums.items()}
        _end_epoch(run, epoch, means, seconds)


@dataclass
class _LogWindow:
    """Counters between two log lines."""

    start: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    images: int = 0


def _log_step(run: _Run, epoch: int, step_in_epoch: int, losses: dict[str, torch.Tensor],
              values: dict[str, float], window: _LogWindow) -> None:
    metrics = {name: float(value) for name, value in losses.items()}  # the one host sync per log interval
    if not all(math.isfinite(v) for v in metrics.values()):
        parts = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        raise TrainingStopped(
            f"The loss became non-finite at step {run.global_step} (epoch {epoch + 1}): {parts}. The last good "
            f"checkpoint in '{run.run_dir}' is kept; lower --learning-rate or --teacher-temp, or use --precision fp32."
        )
    elapsed = max(time.perf_counter() - window.start, 1e-9)
    metrics.update(values)
    metrics["images_per_sec"] = window.images / elapsed
    metrics["data_wait"] = min(1.0, window.data_wait / elapsed)
    event = StepLogged(epoch, run.config.optim.epochs, step_in_epoch, run.steps_per_epoch, run.global_step,
                       run.steps_per_epoch * run.config.optim.epochs, metrics)
    _append_metrics(run.run_dir, {"type": "step", "epoch": epoch + 1, "step": run.global_step, **metrics})
    run.reporter.emit(event)


def _append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _end_epoch(run: _Run, epoch: int, means: dict[str, float], seconds: float) -> None:
    loss = means["loss"]
    if not math.isfinite(loss):
        raise TrainingStopped(f"The mean loss of epoch {epoch + 1} is non-finite ({loss}); the last good checkpoint "
                              f"in '{run.run_dir}' is kept. Lower --learning-rate or use --precision fp32.")
    run.epoch_losses.append(loss)
    run.epoch_parts.append(means)
    is_best = loss < run.best_loss
    if is_best:
        run.best_loss, run.best_epoch = loss, epoch
    last = run.run_dir / CHECKPOINT_LAST
    atomic_save(_training_state(run, epoch + 1), last)
    _record_artifact(run, last, "checkpoint", epoch + 1)
    if is_best:
        best = run.run_dir / CHECKPOINT_BEST
        _copy_atomic(last, best)
        _record_artifact(run, best, "checkpoint", epoch + 1)
    images_per_sec = run.steps_per_epoch * run.config.optim.batch_size / max(seconds, 1e-9)
    _append_metrics(run.run_dir, {"type": "epoch", "epoch": epoch + 1, **means, "best": is_best,
                                  "seconds": seconds, "images_per_sec": images_per_sec})
    run.reporter.emit(EpochEnded(epoch, run.config.optim.epochs, loss, is_best, seconds, images_per_sec, means))


def _training_state(run: _Run, epochs_done: int) -> dict[str, Any]:
    """Everything needed to continue the run, as tensors and plain values (weights_only-loadable)."""
    method = run.method
    return {
        "kind": KIND_TRAINING,
        "format_version": FORMAT_VERSION,
        "dinopre_version": __version__,
        "config": config_to_dict(run.config),
        "epoch": epochs_done,
        "global_step": run.global_step,
        "student": method.student.state_dict(),
        "teacher": method.teacher.state_dict(),
        "loss": method.loss_state(),
        "optimizer": run.optimizer.state_dict(),
        "rng": rng_state(),
        "best_loss": run.best_loss,
        "best_epoch": run.best_epoch + 1,
        "epoch_losses": list(run.epoch_losses),
    }


def _copy_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        shutil.copyfile(source, tmp)
        tmp.replace(target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunDirError(f"Could not write '{target}': {exc.strerror or exc}; free disk space or choose another "
                          "--output-dir.") from None


def _record_artifact(run: _Run, path: Path, kind: str, epoch: int) -> None:
    try:
        name = str(path.relative_to(run.run_dir))
    except ValueError:
        name = str(path)
    run.artifacts[name] = {"kind": kind, "epoch": epoch, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                           "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(json.dumps(run.artifacts, indent=2) + "\n", run.run_dir / "artifacts.json")


def _export(run: _Run) -> Path:
    """Write the teacher backbone as `--export-backbone` asked, in the pipeline's `slt` format."""
    path = Path(run.config.run.export_backbone)
    backbone_state = run.method.teacher["backbone"].state_dict()
    metadata = backbone_metadata(config_to_dict(run.config), epoch=run.config.optim.epochs, weights="teacher")
    sidecar = export_backbone_slt(backbone_state, metadata, path)
    _record_artifact(run, path, "export-slt", run.config.optim.epochs)
    _record_artifact(run, sidecar, "export-metadata", run.config.optim.epochs)
    return path
