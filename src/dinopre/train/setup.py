"""Setting a run up: build it (or rebuild the one a checkpoint continues), take its folder, write params.json,
announce it, and open its batches; everything `fit` does before and around the loop.

Every process sets up; the refusals (bad data, an unusable output folder, device or checkpoint, an incompatible
resume) come before anything in the run folder is touched.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dinopre import __version__
from dinopre.base import distributed
from dinopre.base.errors import ConfigError, DataError
from dinopre.base.events import Reporter, RunStarted
from dinopre.base.signals import StopSignals
from dinopre.config.recipe import ResolvedRecipe
from dinopre.config.settings import PretrainConfig, config_to_dict, setting, with_settings
from dinopre.config.validation import advisories
from dinopre.data.dataset import EpochBatchSampler, ImageSource
from dinopre.data.pipeline import augments_on_device, build_data_loader, device_batches, worker_processes
from dinopre.files.rundir import NullRunDirectory, RunDirectory
from dinopre.files.state import TrainingState
from dinopre.model.vit import count_parameters
from dinopre.train.build import build_run
from dinopre.train.checkpointing import check_export_path, load_weights
from dinopre.train.evaluation import Evaluator, check_decoded_classes, monitor_indices, scan_labelled
from dinopre.train.hooks import RunHooks
from dinopre.train.resume import continued_config, find_checkpoint, load_resume_state
from dinopre.train.run import Run, RunRequest
from dinopre.train.runtime import Runtime, share_cpus
from dinopre.train.trackers import Trackers, check_installed


@dataclass
class Opened:
    """What setting a run up opened, to close when the run ends: the run directory's lock and the trackers."""

    files: RunDirectory | None = None
    trackers: Trackers | None = None

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close()
        if self.files is not None:
            self.files.unlock()


@dataclass(frozen=True, kw_only=True)
class Prepared:
    """A run set up, and the checkpoint it continues (restored into it once every process has set up)."""

    run: Run
    state: TrainingState | None


def open_run(config: PretrainConfig, reporter: Reporter, request: RunRequest, stop: StopSignals,
             hooks: tuple[RunHooks, ...], opened: Opened) -> Prepared:
    """Build the run `config` asks for, or the one `request.resume_from` continues, and take its folder.

    Args:
        config: the validated configuration.
        reporter: receives the scan's progress; the trackers, when asked for, come in front of it.
        request: what `fit` was asked besides the configuration.
        stop: the signals that stop the run.
        hooks: what the run calls at its start and the end of each epoch.
        opened: receives the run directory and the trackers as they are opened, so that they are closed even
            when a later part fails.

    Returns:
        The run (not yet restored) and the checkpoint it continues, if any.

    Raises:
        UserError: bad data, an unusable output folder, device or checkpoint, or an incompatible resume.
    """
    # A run that is complete ends here on every process alike (`RunComplete`), before any other check.
    state = load_resume_state(request.resume_from, config) if request.resume_from is not None else None
    if distributed.is_main():
        check_installed(config.run.logger)  # before anything is trained
    if state is not None:
        config = continued_config(config, state)
    parts = build_run(config, reporter, state.recipe if state is not None else None, rescan=state is not None,
                      new=state is None)
    parts.config = absolute_outputs(parts.config)  # after the processes compared settings: their folders may differ
    if state is not None:  # refusals before anything in the run folder is touched
        refusal, _ = parts.data.fingerprint.change(state.data)
        if refusal is not None:
            raise ConfigError(refusal)
        load_weights(parts.method, parts.optimizer, state, find_checkpoint(request.resume_from))
    evaluator = build_evaluator(parts.config, parts.data.source, parts.num_workers) if distributed.is_main() \
        else None
    if parts.config.run.export_backbone and distributed.is_main():  # at the start, not after hours of training
        check_export_path(parts.config, may_replace=request.overwrite or state is not None, request=request)
    folder = Path(parts.config.run.output_dir)
    files = opened.files = RunDirectory(folder) if distributed.is_main() else NullRunDirectory(folder)
    files.prepare(overwrite=request.overwrite, resuming=state is not None)  # holds the folder until the run ends
    if parts.config.run.logger and distributed.is_main():
        run_ids, step = (state.trackers, state.global_step) if state is not None else (None, 0)
        opened.trackers = Trackers(reporter, parts.config.run.logger, files.path, config_to_dict(parts.config),
                                   run_ids, step)
        reporter = opened.trackers
    run = Run(parts=parts, files=files, reporter=reporter, stop=stop, request=request, evaluator=evaluator,
              trackers=opened.trackers, hooks=hooks)
    return Prepared(run=run, state=state)


def absolute_outputs(config: PretrainConfig) -> PretrainConfig:
    """`config` with its output paths (--output-dir, --export-backbone) made absolute against the working directory
    of the process that starts the run, once: params.json and the checkpoints keep them so, and a resume from
    another directory writes where the run said it would, not a second export beside a stale first one."""
    values = {"output_dir": os.path.abspath(config.run.output_dir)}
    if config.run.export_backbone:
        values["export_backbone"] = os.path.abspath(config.run.export_backbone)
    return with_settings(config, values)


def build_evaluator(config: PretrainConfig, source: ImageSource, num_workers: int) -> Evaluator:
    """The probe images of a run: its `--eval-dir` (if any) and the monitored subset of its training images.

    Raises:
        DataError: the --eval-dir cannot be used.
    """
    e = config.eval
    labelled = scan_labelled(e.eval_dir, config.run.seed, e.eval_test_share) if e.eval_dir else None
    monitored = monitor_indices(len(source), e.monitor_images, config.run.seed)
    evaluator = Evaluator(config.model.image_size, [lambda i=i: source.load(i) for i in monitored], labelled,
                          k=e.knn_k, temperature=e.knn_temperature, threads=max(1, num_workers))
    if e.eval_dir:
        check_decoded_classes(evaluator, e.eval_dir)
    return evaluator


def check_same_data(run: Run) -> None:
    """Refuse to train when the processes found different images (a folder that changed between their scans).

    Raises:
        DataError: the processes' scans differ (every process raises it).
    """
    fingerprint = run.parts.data.fingerprint
    digests = distributed.gather((fingerprint.count, fingerprint.names, fingerprint.sizes))
    if any(d != digests[0] for d in digests):
        raise distributed.mark_collective(DataError(
            "The training processes found different images (the folder changed while they scanned it); start again "
            "once it no longer changes."))


# ============ params.json and the announcement ============


def write_params(run: Run, state: TrainingState | None) -> tuple[str, ...]:
    """Give the trainer its share of the CPUs and write params.json (the configuration, the recipe's choices
    and the environment) and blank_files.json (the blank crops the scan left out).

    Returns:
        A warning when a resumed run's params.json no longer says what its checkpoint does (edited by hand): the
        checkpoint wins, and params.json is written again from it.
    """
    parts = run.parts
    warnings = _edited_params(run.files.read_params(), state) if state is not None else ()
    share_cpus(parts.runtime, distributed.local_world_size())
    run.files.write_params({"config": config_to_dict(parts.config), "recipe": recipe_record(parts.recipe),
                            "environment": environment_info(parts.runtime, parts.num_workers,
                                                            augments_on_device(parts.config), parts.world_size,
                                                            parts.batch_per_rank)})
    run.files.write_blank_files(parts.data.blank)
    return warnings


def _edited_params(params: dict[str, Any] | None, state: TrainingState) -> tuple[str, ...]:
    """The warning about a params.json whose settings differ from the checkpoint's (none when it agrees or is
    missing)."""
    if params is None:
        return ()
    written = params.get("config")
    if not isinstance(written, dict):
        return ("params.json could not be read as the run wrote it; it is written again from the checkpoint.",)
    saved, found = _flat(state.config), _flat(written)
    differing = [key for key in (*saved, *(k for k in found if k not in saved)) if found.get(key) != saved.get(key)]
    if not differing:
        return ()
    return (f"params.json differs from the checkpoint in {', '.join(differing)} (edited by hand?); the run continues "
            "with the checkpoint's settings and params.json is written again from them (a resume changes settings "
            "with its options, see dinopre resume --help).",)


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """{setting: value} of a configuration as `config_to_dict` writes it (sections merged)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


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


def run_started(run: Run, state: TrainingState | None, notes: tuple[str, ...] = ()) -> RunStarted:
    """The event that announces the run: what it trains, on what, and what the user should know first (with
    `notes` of the start, e.g. `write_params`'s)."""
    parts, config = run.parts, run.config
    data, recipe = parts.data, parts.recipe
    warnings = (tuple(advisories(config, len(data.source), set(recipe.derived))) + data.warnings + notes
                + _evaluation_notes(run.evaluator) + _data_notes(run, state) + _process_notes(run))
    return RunStarted(
        config=config, run_dir=run.files.path, num_images=len(data.source), data_description=data.description,
        steps_per_epoch=parts.steps_per_epoch, total_steps=parts.steps_per_epoch * config.optim.epochs,
        device=str(parts.runtime.device), precision=parts.runtime.precision_name, num_workers=parts.num_workers,
        parameters={f"student {name.replace('_', ' ')}": count_parameters(module)
                    for name, module in parts.method.student.items()},
        resumed_from=run.request.resume_from, start_step=run.global_step, warnings=warnings,
        augment_on="device" if augments_on_device(config) else "workers", recipe_notes=tuple(recipe.notes()),
        init_notes=parts.init.notes if parts.init is not None else (),
    )


def _process_notes(run: Run) -> tuple[str, ...]:
    parts = run.parts
    if parts.world_size == 1:
        return ()
    return (f"{parts.world_size} processes train together: each takes {parts.batch_per_rank} images of every global "
            f"batch of {parts.config.optim.batch_size}; this process (rank 0) writes the run directory.",)


def _data_notes(run: Run, state: TrainingState | None) -> tuple[str, ...]:
    """What a resumed run should know about its images (rewritten files were refused in `open_run`)."""
    if state is None:
        return ()
    _, warning = run.parts.data.fingerprint.change(state.data)
    return (warning,) if warning else ()


def _evaluation_notes(evaluator: Evaluator | None) -> tuple[str, ...]:
    if evaluator is None or not evaluator.skipped:
        return ()
    name, reason = evaluator.skipped[0]
    return (f"{len(evaluator.skipped)} image(s) of --eval-dir could not be decoded and are left out of the k-NN "
            f"(e.g. '{name}': {reason}).",)


# ============ the batches ============


@contextlib.contextmanager
def open_batches(run: Run) -> Iterator[Iterator[Any]]:
    """The run's remaining batches on its device, from where it stands (a resumed run's sampler skips the part of
    the epoch it has done without loading it); the data workers end with the block."""
    config, runtime, source = run.config, run.runtime, run.source
    sampler = EpochBatchSampler(len(source), config.optim.batch_size, config.run.seed, run.epoch, config.optim.epochs,
                                run.step_in_epoch, distributed.rank(), run.world_size)
    loader, render = build_data_loader(config, source, runtime.device, sampler, run.parts.num_workers)
    with worker_processes(loader) as loaded:
        yield device_batches(loaded, runtime.device, render)
