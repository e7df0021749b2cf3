"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, beside `metrics.jsonl` (which is always written).

Each is an optional extra, imported only when asked for (`--logger NAME`, repeatable), and only by the process that
writes the run directory. A missing package is one sentence before training starts. Each tracker's run id is kept
in the checkpoints, so `dinopre resume` continues the same TensorBoard / W&B / MLflow run instead of starting another.

Where they write: TensorBoard into `RUN_DIR/tensorboard` (so `tensorboard --logdir work_dirs` shows every run);
W&B into `RUN_DIR/wandb`, honouring `WANDB_MODE` (offline, disabled) and `WANDB_PROJECT`; MLflow to
`MLFLOW_TRACKING_URI` if set, else a file store in `RUN_DIR/mlruns`, in the experiment `MLFLOW_EXPERIMENT_NAME`
(default `dinopre`). dinopre itself opens no network connection; W&B and a remote MLflow server do, when chosen.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any, Protocol

from dinopre.base.errors import ConfigError
from dinopre.base.events import EpochEnded, StepLogged

INSTALL = {  # logger -> (module to import, pip extra)
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


def check_installed(loggers: tuple[str, ...]) -> None:
    """Refuse, before anything is trained, a logger whose package is missing.

    Raises:
        ConfigError: one sentence naming the package and the pip command.
    """
    import importlib.util

    for name in loggers:
        module, extra = INSTALL[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"--logger {name} needs the {module} package: install it with "
                              f'pip install "dinopre[{extra}]", or drop --logger {name}.')


class Tracker(Protocol):
    """What a tracker does for a run."""

    run_id: str

    def log_scalars(self, values: dict[str, float], step: int) -> None: ...

    def log_image(self, tag: str, path: Path, step: int) -> None: ...

    def close(self) -> None: ...


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'out_dim': 1024}} -> {'model.out_dim': 1024}, lists as text (hyper-parameter tables want scalars)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


class TensorBoardTracker:
    """Event files in RUN_DIR/tensorboard; a resumed run drops the events after its checkpoint (`purge_step`)."""

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_id = run_id or "tensorboard"
        # Events logged after the checkpoint being resumed (step > `step`) were written by the interrupted process
        # and are written again now: TensorBoard drops them (the checkpoint's own step stays).
        self.writer = SummaryWriter(log_dir=str(run_dir / self.run_id), purge_step=step + 1 if run_id else None)
        if run_id is None:
            self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in _flat(config).items()), 0)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as image:
            self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run whose id is kept in the checkpoints (`resume="allow"`), files under RUN_DIR/wandb."""

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None, step: int) -> None:
        import wandb

        self.wandb = wandb
        (run_dir / "wandb").mkdir(exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "dinopre"), name=run_dir.name,
                              dir=str(run_dir), id=run_id or secrets.token_hex(6), resume="allow",
                              config=config)
        self.run_id = self.run.id

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """An MLflow run (continued by id on resume); a file store in RUN_DIR/mlruns unless MLFLOW_TRACKING_URI says."""

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None, step: int) -> None:
        import mlflow

        self.mlflow = mlflow
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the run's own file store; MLflow 3 asks file-store users to opt in to it
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "dinopre")
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            for key, value in _flat(config).items():
                self.client.log_param(run_id, key, str(value)[:500])  # MLflow's limit on a parameter's length
        self.run_id = run_id

    def log_scalars(self, values: dict[str, float], step: int) -> None:

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step)
                                                    for k, v in values.items()])

    def log_image(self, tag: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path=tag)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


KINDS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The run's trackers, fed by the engine's events; a reporter in front of the terminal's reporter.

    Args:
        inner: the reporter events go on to.
        loggers: the tracker names.
        run_dir: the run directory.
        config: the resolved configuration (logged as hyper-parameters).
        run_ids: each tracker's run id from the checkpoint being resumed, if any.
        step: the global step the run starts at.
    """

    def __init__(self, inner: Any, loggers: tuple[str, ...], run_dir: Path, config: dict[str, Any],
                 run_ids: dict[str, str] | None = None, step: int = 0) -> None:
        self.inner = inner
        self.trackers: dict[str, Tracker] = {}
        try:
            for name in loggers:
                self.trackers[name] = KINDS[name](run_dir, config, (run_ids or {}).get(name), step)
        except Exception as exc:  # a tracker that cannot start (a bad MLFLOW_TRACKING_URI, W&B not logged in)
            self.close()
            detail = " ".join(str(exc).split())[:300]
            raise ConfigError(f"--logger {name} could not start ({detail}); fix its set-up or drop it.") from None

    @property
    def run_ids(self) -> dict[str, str]:
        """{tracker: run id}, saved in each checkpoint."""
        return {name: tracker.run_id for name, tracker in self.trackers.items()}

    def emit(self, event: object) -> None:
        if isinstance(event, StepLogged):
            self._scalars({f"train/{k}": v for k, v in event.metrics.items()}, event.global_step)
        elif isinstance(event, EpochEnded):
            values = {f"epoch/{k}": v for k, v in {**event.parts, **event.evaluation}.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self._scalars({**values, "epoch/epoch": event.epoch + 1}, event.global_step)
        self.inner.emit(event)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers.values():
            tracker.log_scalars(values, step)

    def log_image(self, tag: str, path: Path, step: int) -> None:
        """Send a picture of the run (views.png, an attention grid) to every tracker."""
        for tracker in self.trackers.values():
            tracker.log_image(tag, path, step)

    def close(self) -> None:
        for tracker in self.trackers.values():
            try:
                tracker.close()
            except Exception:  # closing must never hide the error that ended the run
                pass
