"""From a configuration to everything a run trains with: the one way to build a run.

`engine.fit` and `benchmarks/bench.py` both call `build_run`, so a benchmark measures exactly what training runs
(`--compile` included) and the recipe is resolved the same way for both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dinopre.base import distributed
from dinopre.base.errors import ConfigError, UserError
from dinopre.base.events import Reporter
from dinopre.config.recipe import ResolvedRecipe, resolve
from dinopre.config.settings import PretrainConfig, config_to_dict
from dinopre.data.dataset import check_dataset_size
from dinopre.data.pipeline import DataSource, build_source
from dinopre.model.method import StudentTeacher, build_method
from dinopre.model.optim import build_optimizer
from dinopre.model.schedules import Schedules, build_schedules
from dinopre.train.init_from import InitPlan, load_init, plan_init
from dinopre.train.runtime import Runtime, default_num_workers, setup


@dataclass(kw_only=True)
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
        model: what a step calls: `method` itself, or `method` in DistributedDataParallel when several processes
            train (its gradients are averaged across them).
        world_size: training processes.
        init: how a new run started from its --init-from source (None otherwise, and on resume).
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
    model: nn.Module
    world_size: int = 1
    init: InitPlan | None = None

    @property
    def batch_per_rank(self) -> int:
        """Images each process takes of a global batch of `--batch-size`."""
        return self.config.optim.batch_size // self.world_size


def data_parallel(method: StudentTeacher, device: torch.device) -> nn.Module:
    """Wrap the method for several processes: DDP averages the gradients of what the optimizer trains.

    DDP registers its hooks on parameters that require gradients, i.e. the student's backbone and heads; the teacher
    (frozen) and the loss centers (buffers) stay out of it. Buffers are not broadcast each step
    (`broadcast_buffers=False`): the centers are already equal on every process, since their update is all-reduced.
    Checkpoints save `method.student` itself, so no key gains a `module.` prefix.
    """
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    # torch >= 2.12 names the option `forward_sync_buffers` (and warns about the old name); both keep the
    # initial broadcast, after which every process holds the same centers anyway.
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else "broadcast_buffers")
    return DistributedDataParallel(method, device_ids=[device] if device.type == "cuda" else None, **{no_sync: False})


def compile_backbones(method: StudentTeacher) -> None:
    """torch.compile the student's and the teacher's backbone (the bulk of the FLOPs).

    Only `forward_features` is replaced, on the instances, so state dicts, checkpoints and exports keep their keys
    (no `_orig_mod.` prefix, cf. nanoGPT) and both the DINO and the iBOT (masked) paths run compiled. Heads and
    losses stay eager: they are small, and the iBOT masks give them data-dependent shapes.
    """
    for model in (method.student, method.teacher):
        backbone = model["backbone"]
        backbone.forward_features = torch.compile(backbone.forward_features)


# Settings each process may set for itself, left out of the settings the processes compare: which device it uses,
# how it loads its share of the data, how long it waits for the others (README: "Several GPUs and nodes").
PER_PROCESS = frozenset({"device", "num_workers", "rendezvous_timeout"})


def shared_settings(config: PretrainConfig, num_images: int) -> dict[str, Any]:
    """What every process of a run must have alike: the resolved settings but `PER_PROCESS`, and the number of
    training images found (the recipe derives settings from it)."""
    flat = {name: value for section in config_to_dict(config).values() if isinstance(section, dict)
            for name, value in section.items() if name not in PER_PROCESS}
    return {"preset": config.preset, **flat, "images found": num_images}


def agree_on_settings(error: UserError | None, settings: Callable[[], dict[str, Any]]) -> None:
    """Stop every process together when any failed to set up, or when their settings differ: a digest of each
    process's `shared_settings` first, then, only when the digests differ, the differing settings in one sentence.

    Raises:
        UserError: this process's failure, another's, or the differing settings (all processes raise together).
    """
    digests = distributed.agree(error, None if error is not None else _digest(settings()))
    if all(digest == digests[0] for digest in digests):
        return
    everyone = distributed.gather(settings())
    distributed.agree(ConfigError(settings_differences(everyone)))


def _digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def settings_differences(everyone: list[dict[str, Any]]) -> str:
    """One sentence naming each setting in which a process differs from process 0, with both values."""
    first, parts = everyone[0], []
    for name in dict.fromkeys(key for settings in everyone for key in settings):
        rank = next((r for r, settings in enumerate(everyone) if settings.get(name) != first.get(name)), None)
        if rank is not None:
            parts.append(f"{name} ({first.get(name)!r} on process 0, {everyone[rank].get(name)!r} on process {rank})")
    return (f"The training processes were started with different settings: {', '.join(parts)}; give every process "
            f"the same command and configuration (only {', '.join(sorted(PER_PROCESS))} may differ).")


def build_run(config: PretrainConfig, reporter: Reporter | None = None,
              previous_recipe: dict[str, str] | None = None, *, rescan: bool = False, new: bool = True) -> RunParts:
    """Set up the device, find the images, resolve the recipe and build the model, optimizer and schedules.

    The global generator is seeded before the model is built, so the same configuration gives the same weights.

    Args:
        config: the configuration (recipe settings may be unset).
        reporter: receives the scan's progress.
        previous_recipe: the derived settings' reasons of a run being resumed.
        rescan: list the training folders afresh instead of reading the cached index (a resume does, so that it
            sees files rewritten in place).
        new: a new run, whose backbones start from `--init-from` when it is set (a resumed run has its weights
            in its checkpoint, and never reads the source again).

    Raises:
        UserError: no usable device, no images, fewer images than a batch, or an invalid derived setting.
    """
    world = distributed.launch().world_size if distributed.launch() is not None else 1
    error: UserError | None = None
    init: InitPlan | None = None
    try:  # a failure here on any process reaches all of them before the first collective (DDP's, below)
        if config.optim.batch_size % world:
            raise ConfigError(f"--batch-size {config.optim.batch_size} is the global batch and must divide by the "
                              f"{world} training processes; use a multiple of {world}.")
        runtime = setup(config.run.device, config.run.precision, config.run.seed, distributed.local_rank())
        if new and config.model.init_from:  # before the images: a bad source is refused at once
            init = plan_init(config)
            config, previous_recipe = init.config, init.reasons
        data = build_source(config, reporter, use_cache=not rescan)
        steps_per_epoch = check_dataset_size(len(data.source), config.optim.batch_size)
        recipe = resolve(config, len(data.source), previous_recipe)
    except UserError as exc:
        error = exc
    agree_on_settings(error, lambda: shared_settings(recipe.config, len(data.source)))
    config = recipe.config
    method = build_method(config)
    if init is not None:  # after the random draws of a scratch run, so the heads are drawn as they would be
        load_init(method, init)
    method = method.to(runtime.device)
    if config.run.compile:
        compile_backbones(method)
    model = data_parallel(method, runtime.device) if distributed.launch() is not None else method
    if distributed.rank() > 0:  # drop path: each process draws its own (the weights above are the same everywhere)
        torch.manual_seed(config.run.seed + 1_000_003 * distributed.rank())
    num_workers = (config.data.num_workers if config.data.num_workers is not None
                   else default_num_workers(distributed.local_world_size()))
    o = config.optim
    # Continued pretraining gets a parameter group per backbone layer; every other run keeps the two groups of its
    # checkpoints.
    layered = o.layer_decay < 1.0 or (o.head_warmup_epochs or 0.0) > 0.0
    optimizer = build_optimizer(method.student, runtime.device, layered=layered, depth=config.model.vit_depth,
                                layer_decay=o.layer_decay)
    return RunParts(config=config, recipe=recipe, runtime=runtime, data=data, steps_per_epoch=steps_per_epoch,
                    num_workers=num_workers, method=method, optimizer=optimizer,
                    schedules=build_schedules(config, steps_per_epoch), model=model, world_size=world, init=init)
