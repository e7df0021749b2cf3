"""From a configuration to everything a run trains with: the one way to build a run.

`engine.fit` and `benchmarks/bench.py` both call `build_run`, so a benchmark measures exactly what training runs
(`--compile` included) and the recipe is resolved the same way for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dinopre.config import PretrainConfig
from dinopre.data import check_dataset_size
from dinopre.events import Reporter
from dinopre.method import StudentTeacher, build_method
from dinopre.optim import build_optimizer
from dinopre.pipeline import DataSource, build_source
from dinopre.recipe import ResolvedRecipe, resolve
from dinopre.runtime import Runtime, default_num_workers, setup
from dinopre.schedules import Schedules, build_schedules


@dataclass
class RunParts:
    """What a run trains with.

    Attributes:
        config: the complete configuration (the recipe's choices filled in).
        recipe: what the recipe derived, and why.
        runtime: device and precision.
        data: the training images.
        steps_per_epoch: optimizer steps per epoch (the last incomplete batch is dropped).
        num_workers: data-loading processes.
        method: student and teacher on the device (backbones compiled with `--compile`).
        optimizer: AdamW over the student.
        schedules: the per-step lr, weight decay, momentum and temperatures.
    """

    config: PretrainConfig
    recipe: ResolvedRecipe
    runtime: Runtime
    data: DataSource
    steps_per_epoch: int
    num_workers: int
    method: StudentTeacher
    optimizer: torch.optim.Optimizer
    schedules: Schedules


def compile_backbones(method: StudentTeacher) -> None:
    """torch.compile the student's and the teacher's backbone (the bulk of the FLOPs).

    Only `forward_features` is replaced, on the instances, so state dicts, checkpoints and exports keep their keys
    (no `_orig_mod.` prefix, cf. nanoGPT) and both the DINO and the iBOT (masked) paths run compiled. Heads and
    losses stay eager: they are small, and the iBOT masks give them data-dependent shapes.
    """
    for model in (method.student, method.teacher):
        backbone = model["backbone"]
        backbone.forward_features = torch.compile(backbone.forward_features)


def build_run(config: PretrainConfig, reporter: Reporter | None = None,
              previous_recipe: dict[str, str] | None = None, *, rescan: bool = False) -> RunParts:
    """Set up the device, find the images, resolve the recipe and build the model, optimizer and schedules.

    The global generator is seeded before the model is built, so the same configuration gives the same weights.

    Args:
        config: the configuration (recipe settings may be unset).
        reporter: receives the scan's progress.
        previous_recipe: the derived settings' reasons of a run being resumed.
        rescan: list the training folders afresh instead of reading the cached index (a resume does, so that it
            sees files rewritten in place).

    Raises:
        UserError: no usable device, no images, fewer images than a batch, or an invalid derived setting.
    """
    runtime = setup(config.run.device, config.run.precision, config.run.seed)
    data = build_source(config, reporter, use_cache=not rescan)
    steps_per_epoch = check_dataset_size(len(data.source), config.optim.batch_size)
    recipe = resolve(config, len(data.source), previous_recipe)
    config = recipe.config
    method = build_method(config).to(runtime.device)
    if config.run.compile:
        compile_backbones(method)
    num_workers = config.data.num_workers if config.data.num_workers is not None else default_num_workers()
    return RunParts(config, recipe, runtime, data, steps_per_epoch, num_workers, method,
                    build_optimizer(method.student, runtime.device), build_schedules(config, steps_per_epoch))
