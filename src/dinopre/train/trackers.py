"""Experiment trackers: TensorBoard, Weights & Biases and MLflow, beside `metrics.jsonl` (which is always written).

Each is an optional extra, imported only when asked for (`--logger NAME`, repeatable), and only by the process that
writes the run directory. A missing package is one sentence before training starts. Each tracker's run id is kept
in the checkpoints, so `dinopre resume` continues the same TensorBoard / W&B / MLflow run instead of starting another.

Where they write: TensorBoard into `RUN_DIR/tensorboard` (so `tensorboard --logdir work_dirs` shows every run);
W&B into `RUN_DIR/wandb`, honouring `WANDB_MODE` (offline, disabled) and `WANDB_PROJECT`; MLflow to
`MLFLOW_TRACKING_URI` if set, else a file store in `RUN_DIR/mlruns`, in the experiment `MLFLOW_EXPERIMENT_NAME`
(default `dinopre`). dinopre itself opens no network connection; W&B and a remote MLflow server do, when chosen.

A tracker can never stop or corrupt training (`Trackers`): connecting waits at most 30 s (`DINOPRE_TRACKER_TIMEOUT`)
after a "connecting to ..." line, every call runs off the training thread, and a tracker that fails is dropped
with one warning while metrics.jsonl stays complete.
"""

from __future__ import annotations

import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from dinopre.base.environment import seconds_from_env
from dinopre.base.errors import ConfigError
from dinopre.base.events import EpochEnded, Notice, StepLogged

TIMEOUT_ENV = "DINOPRE_TRACKER_TIMEOUT"
DEFAULT_TIMEOUT = 30.0  # seconds a tracker may take to connect (W&B's own default waits 90, an MLflow client 250)
QUEUE = 10_000  # calls a tracker may fall behind (a log line each) before it is dropped
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

    @staticmethod
    def target(run_dir: Path) -> str | None:
        """Where it connects to, for the "connecting to" line (None: local files only, nothing to wait for)."""
        ...

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

    @staticmethod
    def target(run_dir: Path) -> str | None:
        return None

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
                              config=config, settings=wandb.Settings(init_timeout=tracker_timeout()))
        self.run_id = self.run.id

    @staticmethod
    def target(run_dir: Path) -> str | None:
        if os.environ.get("WANDB_MODE", "") in ("offline", "disabled", "dryrun"):  # files in RUN_DIR/wandb only
            return None
        return f"W&B at {os.environ.get('WANDB_BASE_URL', 'https://api.wandb.ai')}"

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
        uri = self.target(run_dir) or (run_dir / "mlruns").resolve().as_uri()
        if uri == (run_dir / "mlruns").resolve().as_uri():  # the run's own file store; MLflow 3 asks to opt in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            if not (run_dir / "mlruns").is_dir():  # deleted: MLflow's cached store of that folder needs its layout
                from mlflow.store.tracking.file_store import FileStore

                FileStore(str((run_dir / "mlruns").resolve()))
        # An unreachable server: each request retried for minutes by default; a few tries within the timeout here.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(tracker_timeout() / 3))))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        if run_id is not None and self.client.get_run(run_id).info.lifecycle_stage == "deleted":
            raise ValueError(f"the MLflow run {run_id} was deleted")  # (get_run raises when it is gone altogether)
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

    @staticmethod
    def target(run_dir: Path) -> str | None:
        """MLFLOW_TRACKING_URI (None: the run's own file store, RUN_DIR/mlruns)."""
        return os.environ.get("MLFLOW_TRACKING_URI") or None

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


KINDS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The run's trackers, fed by the engine's events; a reporter in front of the terminal's reporter.

    Each tracker runs behind a thread of its own (`_Guarded`): the training thread queues its calls and never waits
    for a service. Connecting is bounded by `timeout`; a tracker that fails later (its store deleted, its server
    gone) is dropped with one warning, and training and metrics.jsonl go on. On resume, a tracker run that cannot be
    continued (deleted, lost with its `mlruns/`) is replaced by a new one, said in a warning; the new id goes into
    the next checkpoints. The new run starts at the resumed step: `dinopre plot` reads metrics.jsonl for the rest.

    Args:
        inner: the reporter events go on to.
        loggers: the tracker names.
        run_dir: the run directory.
        config: the resolved configuration (logged as hyper-parameters).
        run_ids: each tracker's run id from the checkpoint being resumed, if any.
        step: the global step the run starts at.
        timeout: seconds a tracker may take to connect and, at the end, to finish (None: `tracker_timeout()`).

    Raises:
        ConfigError: a tracker of a new run could not connect (a resumed run goes on without it).
    """

    def __init__(self, inner: Any, loggers: tuple[str, ...], run_dir: Path, config: dict[str, Any],
                 run_ids: dict[str, str] | None = None, step: int = 0, timeout: float | None = None) -> None:
        self.inner = inner
        self.timeout = tracker_timeout() if timeout is None else timeout
        self.active: dict[str, _Guarded] = {}
        self.ids: dict[str, str] = {}
        for name in loggers:
            self._connect(name, run_dir, config, (run_ids or {}).get(name), step, resuming=run_ids is not None)

    def _connect(self, name: str, run_dir: Path, config: dict[str, Any], previous: str | None, step: int, *,
                 resuming: bool) -> None:
        kind = KINDS[name]
        target = kind.target(run_dir)
        if target:
            self.inner.emit(Notice(f"Connecting to {target} for --logger {name} (waiting at most {self.timeout:g} s; "
                                   f"{TIMEOUT_ENV} sets it)."))
        guarded = _Guarded(name, lambda: kind(run_dir, config, previous, step), self.timeout)
        why = guarded.connected()
        if why is not None and previous is not None and not guarded.timed_out:  # that run is lost: start another
            guarded = _Guarded(name, lambda: kind(run_dir, config, None, step), self.timeout)
            if guarded.connected() is None:
                self.inner.emit(Notice(f"--logger {name}: the run {previous} could not be continued ({why}); logging "
                                       f"to a new run {guarded.run_id} from step {step} on (metrics.jsonl keeps every "
                                       "step; dinopre plot draws them).", warning=True))
            why = guarded.connected()
        if why is None:
            self.active[name], self.ids[name] = guarded, guarded.run_id
        elif resuming:  # --logger cannot change on resume: the run must not become unresumable for a tracker
            self.inner.emit(Notice(f"--logger {name} could not start ({why}); this run goes on without it "
                                   "(metrics.jsonl keeps every step).", warning=True))
        else:
            self.close()
            raise ConfigError(f"--logger {name} could not start ({why}); fix its set-up or drop it.")

    @property
    def run_ids(self) -> dict[str, str]:
        """{tracker: run id}, saved in each checkpoint (a dropped tracker's too: a resume tries it again)."""
        return dict(self.ids)

    def emit(self, event: object) -> None:
        if isinstance(event, StepLogged):
            self._scalars({f"train/{k}": v for k, v in event.metrics.items()}, event.global_step)
        elif isinstance(event, EpochEnded):
            values = {f"epoch/{k}": v for k, v in {**event.parts, **event.evaluation}.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self._scalars({**values, "epoch/epoch": event.epoch + 1}, event.global_step)
        self._drop_failed()
        self.inner.emit(event)

    def _scalars(self, values: dict[str, float], step: int) -> None:
        for guarded in self.active.values():
            guarded.submit(lambda tracker: tracker.log_scalars(values, step))

    def log_image(self, tag: str, path: Path, step: int) -> None:
        """Send a picture of the run (views.png, an attention grid) to every tracker."""
        for guarded in self.active.values():
            guarded.submit(lambda tracker: tracker.log_image(tag, path, step))
        self._drop_failed()

    def _drop_failed(self) -> None:
        for name, guarded in list(self.active.items()):
            if guarded.failure is not None:
                del self.active[name]
                guarded.close()
                self.inner.emit(Notice(f"--logger {name} failed ({guarded.failure}); it is dropped for the rest of "
                                       "this process, training goes on and metrics.jsonl keeps every step.",
                                       warning=True))

    def close(self) -> None:
        """Let each tracker finish what is queued (at most `timeout`) and close it; say so if one could not."""
        for name, guarded in list(self.active.items()):
            why = guarded.close()
            if why is not None:
                self.inner.emit(Notice(f"--logger {name} did not finish ({why}); metrics.jsonl has every step.",
                                       warning=True))
        self.active.clear()


def tracker_timeout(env: Mapping[str, str] | None = None) -> float:
    """Seconds a tracker may take to connect (`DINOPRE_TRACKER_TIMEOUT`, else 30).

    Raises:
        ConfigError: the variable is not a positive number of seconds.
    """
    return seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT, env, if_unset="wait")


class _Guarded:
    """One tracker behind a thread of its own: connected there, then fed calls through a queue in order.

    The training thread only queues; a call that raises marks the tracker failed (the rest of its calls are
    skipped), and a service that does not answer only holds up this thread, never training.
    """

    def __init__(self, name: str, connect: Callable[[], Tracker], timeout: float) -> None:
        self.timeout = timeout
        self.tracker: Tracker | None = None
        self.failure: str | None = None
        self.timed_out = False
        self._calls: queue.Queue[Callable[[Tracker], None] | None] = queue.Queue(QUEUE)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(connect,), name=f"dinopre-{name}", daemon=True)
        self._thread.start()

    @property
    def run_id(self) -> str:
        assert self.tracker is not None
        return self.tracker.run_id

    def connected(self) -> str | None:
        """None once connected, else why not (its error, or no answer within the timeout)."""
        if not self._ready.wait(self.timeout):
            self.timed_out = True
            return f"no answer within {self.timeout:g} s"
        return self.failure

    def _serve(self, connect: Callable[[], Tracker]) -> None:
        try:
            self.tracker = connect()
        except Exception as exc:  # any failure of a third-party client: its message is what the user needs
            self.failure = _detail(exc)
        self._ready.set()
        if self.tracker is None:
            return
        while (call := self._calls.get()) is not None:
            if self.failure is None:
                try:
                    call(self.tracker)
                except Exception as exc:
                    self.failure = _detail(exc)
        try:
            self.tracker.close()
        except Exception:  # closing must never hide the error that ended the run
            pass

    def submit(self, call: Callable[[Tracker], None]) -> None:
        if self.failure is None and self.tracker is not None:
            try:
                self._calls.put_nowait(call)
            except queue.Full:
                self.failure = f"it fell {QUEUE} calls behind"

    def close(self) -> str | None:
        """Finish the queued calls and close, waiting at most the timeout; why that failed, if it did."""
        if self.tracker is None:
            return None
        try:
            self._calls.put(None, timeout=self.timeout)
        except queue.Full:
            return f"it fell {QUEUE} calls behind"
        self._thread.join(self.timeout)
        if self._thread.is_alive():
            return f"it did not finish within {self.timeout:g} s"
        return self.failure


def _detail(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
