"""What a run keeps on disk: its checkpoints (saved from the run and restored into it) and its exported backbone.

`training_state` and `restore` are inverses through `files.state.TrainingState`, the one writer and reader of a
checkpoint's contents: resuming restores everything a step depends on (weights, optimizer, loss centers, generator
states, the partial epoch's loss sums), so a resumed run is bit for bit the uninterrupted one on a CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dinopre.base import distributed
from dinopre.base.errors import CheckpointError, TrainingStopped
from dinopre.base.events import CheckpointSaved
from dinopre.config.settings import PretrainConfig, config_to_dict
from dinopre.files.checkpoint import backbone_metadata
from dinopre.files.export import write_backbone
from dinopre.files.outputs import check_export_paths, check_parent_writable
from dinopre.files.state import RankShare, TrainingState
from dinopre.model.method import StudentTeacher
from dinopre.train.run import Run, RunRequest
from dinopre.train.runtime import rng_state, set_rng_state

# ============ checkpoints ============


def save(run: Run, *, best: bool, mid_epoch: bool) -> None:
    """Write checkpoint_last.pt (every process calls this at the same step; the main process writes).

    Raises:
        TrainingStopped: a process's partial loss sum is not finite (every process raises it here).
    """
    shares = _gather_shares(run)  # one sync per checkpoint
    if any(share["loss_sums"] and not bool(torch.isfinite(share["loss_sums"]["loss"])) for share in shares):
        raise distributed.mark_collective(TrainingStopped(
            f"The loss became non-finite before step {run.global_step} (epoch {run.epoch + 1}); the last good "
            f"checkpoint in '{run.files.path}' is kept. Lower --learning-rate or --teacher-temp, or use "
            "--precision fp32."
        ))
    for share in shares[1:]:  # files only the other processes met
        run.bad_files.update(share["bad_files"])
    if run.bad_files:
        run.files.write_bad_files(run.bad_files)
    path = run.files.save_checkpoint(training_state(run, shares).to_dict(), best=best)
    run.last_saved_step = run.global_step
    run.reporter.emit(CheckpointSaved(path=path, epoch=run.epoch, global_step=run.global_step, mid_epoch=mid_epoch))


def _gather_shares(run: Run) -> list[dict[str, Any]]:
    """Each process's part of the run state, in rank order: generator states, partial loss sums, bad files."""
    mine = {"rng": rng_state(run.runtime.device),
            "loss_sums": {k: v.detach().clone() for k, v in run.loss_sums.items()},
            "bad_files": dict(run.bad_files)}
    if distributed.launch() is None:
        return [mine]
    mine["rng"] = {k: v.cpu() for k, v in mine["rng"].items()}  # pickled across processes: host tensors only
    mine["loss_sums"] = {k: v.cpu() for k, v in mine["loss_sums"].items()}
    return distributed.gather(mine)


def training_state(run: Run, shares: list[dict[str, Any]]) -> TrainingState:
    """Everything needed to continue the run (the inverse of `restore`).

    With several processes, `ranks` keeps each one's generator states and partial loss sums
    (`TrainingState.share`), and `rng` / `loss_sums` the main process's states and the processes' mean sums, which
    any number of processes can continue from.
    """
    ranks = [RankShare(rng=s["rng"], loss_sums=s["loss_sums"]) for s in shares] if len(shares) > 1 else None
    return TrainingState(
        config=config_to_dict(run.config),
        epoch=run.epoch,
        step_in_epoch=run.step_in_epoch,
        global_step=run.global_step,
        student=run.method.student.state_dict(),
        teacher=run.method.teacher.state_dict(),
        loss=run.method.loss_state(),
        loss_sums=_mean_sums(shares, run.runtime.device),
        optimizer=run.parts.optimizer.state_dict(),
        rng=shares[0]["rng"],
        best_loss=run.best_loss,
        best_epoch=run.best_epoch + 1,
        epoch_losses=list(run.epoch_losses),
        epoch_parts=[dict(p) for p in run.epoch_parts],
        best_knn=run.best_knn,
        recipe=dict(run.parts.recipe.derived),
        evaluations=[dict(record) for record in run.evaluations],
        data=run.parts.data.fingerprint.to_state(),
        world_size=run.world_size,
        trackers=run.trackers.run_ids if run.trackers is not None else {},
        ranks=ranks,
    )


def _mean_sums(shares: list[dict[str, Any]], device: torch.device) -> dict[str, torch.Tensor]:
    if len(shares) == 1:
        return shares[0]["loss_sums"]
    return {name: (sum(share["loss_sums"][name] for share in shares) / len(shares)).to(device)
            for name in shares[0]["loss_sums"]}


def load_weights(method: StudentTeacher, optimizer: torch.optim.Optimizer, state: TrainingState, path: Path) -> None:
    """Put a checkpoint's weights and optimizer state in place (before anything in the run folder is touched, so
    a checkpoint of another architecture is refused without a trace).

    Raises:
        CheckpointError: the weights, the optimizer state or the partial loss sums do not fit the model the
            configuration builds.
    """
    state.check_loss_sums(path, method.loss_names)
    try:
        method.student.load_state_dict(state.student)
        method.teacher.load_state_dict(state.teacher)
        optimizer.load_state_dict(state.optimizer)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 300 else detail[:detail.rfind(" ", 0, 297)] + " ..."
        raise CheckpointError(f"The checkpoint does not fit the model of its own configuration ({detail}).") from None


def restore(run: Run, state: TrainingState) -> None:
    """Put a run back exactly where the checkpoint left it (its weights are in place already: `load_weights`)."""
    run.method.load_loss_state(state.loss)
    rng, loss_sums = state.share(distributed.rank(), run.world_size)
    if rng is not None:
        set_rng_state(rng, run.runtime.device)
    run.epoch, run.step_in_epoch, run.global_step = state.epoch, state.step_in_epoch, state.global_step
    run.loss_sums = {k: v.to(run.runtime.device) for k, v in loss_sums.items()}
    run.epoch_losses, run.epoch_parts = list(state.epoch_losses), list(state.epoch_parts)
    run.best_loss, run.best_epoch = state.best_loss, state.best_epoch - 1
    run.best_knn = state.best_knn
    run.evaluations = [dict(record) for record in state.evaluations]
    run.files.truncate_metrics(run.global_step)
    run.bad_files = run.files.read_bad_files()
    run.last_saved_step = run.global_step


# ============ the exported backbone ============


def check_export_path(config: PretrainConfig, *, may_replace: bool, request: RunRequest) -> None:
    """Refuse an export path (or its sidecar) that cannot or should not be written: an existing file without
    --overwrite (or a resume), a folder or special file, the config file or the checkpoint being read.

    Raises:
        RunDirError: the path must not or cannot be written.
    """
    path = Path(config.run.export_backbone)
    check_export_paths(path, force=may_replace, inputs=request.protected, what="--export-backbone",
                       flag="--overwrite")
    check_parent_writable(path, "the --export-backbone file")


def export(run: Run) -> Path:
    """Write the teacher backbone as `--export-backbone` asked, in the pipeline's `slt` format (the writer
    `dinopre export` uses, which reloads the file strictly), and record it in artifacts.json."""
    path = Path(run.config.run.export_backbone)
    metadata = backbone_metadata(config_to_dict(run.config), epoch=run.epoch, weights="teacher")
    # Replacing was agreed to when the run started (the path did not exist, or --overwrite or a resume).
    path, sidecar = write_backbone(run.method.teacher["backbone"].state_dict(), metadata, path, force=True,
                                   inputs=run.request.protected, what="--export-backbone", flag="--overwrite")
    run.files.record(path, "export-slt", epoch=run.epoch)
    run.files.record(sidecar, "export-metadata", epoch=run.epoch)
    return path
