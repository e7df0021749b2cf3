"""--logger tensorboard|wandb|mlflow: read back without network; a resumed run continues the same tracker run."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import Recorder, face_config

from dinopre.base.errors import ConfigError
from dinopre.base.events import Notice, NullReporter, StepLogged
from dinopre.files.export import inspect_file
from dinopre.train import trackers
from dinopre.train.engine import fit
from dinopre.viz.run_pictures import run_pictures


class StopAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def emit(self, event: object) -> None:
        if isinstance(event, StepLogged) and event.global_step == self.step:
            raise KeyboardInterrupt


def _logging_config(tiny_settings: dict, face_folder: Path, out: Path, logger: str, **extra: Any):
    """A two-epoch run into `out` that checkpoints every 4 steps and logs to `logger`."""
    return face_config(tiny_settings, face_folder, output_dir=str(out), epochs=2, checkpoint_every=4, logger=[logger],
                       **extra)


def _steps(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["type"] == "step"}


def _interrupted_then_resumed(tiny_settings: dict, face_folder: Path, out: Path, logger: str) -> dict:
    with pytest.raises(KeyboardInterrupt):
        # logged at 10, checkpoint at 8; with the pictures `dinopre train` sends the trackers
        fit(_logging_config(tiny_settings, face_folder, out, logger), StopAt(10), hooks=run_pictures())
    first = torch.load(out / "checkpoint_last.pt", weights_only=True)["trackers"][logger]
    fit(_logging_config(tiny_settings, face_folder, out, logger), NullReporter(), resume_from=out,
        hooks=run_pictures())
    return {"first": first, "then": torch.load(out / "checkpoint_last.pt", weights_only=True)["trackers"][logger]}


def test_tensorboard_event_files_hold_the_run_and_a_resume_continues_them(tiny_settings: dict, face_folder: Path,
                                                                          tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    ids = _interrupted_then_resumed(tiny_settings, face_folder, out, "tensorboard")
    assert ids["first"] == ids["then"]
    events = EventAccumulator(str(out / ids["then"]), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx(_steps(out))  # every logged step once: the steps after the checkpoint were purged
    assert {"views", "attention"} <= set(events.Tags()["images"])
    assert "epoch/knn" not in events.Tags()["scalars"] and "epoch/rankme" in events.Tags()["scalars"]
    assert (out / "attention" / "epoch_0002.png").is_file()


def test_wandb_offline_keeps_one_run_id_across_a_resume(tiny_settings: dict, face_folder: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    ids = _interrupted_then_resumed(tiny_settings, face_folder, out, "wandb")
    assert ids["first"] == ids["then"]
    assert inspect_file(out / "checkpoint_last.pt")["trackers"] == {"wandb": ids["then"]}
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(ids["then"]) for name in runs)


def test_mlflow_file_store_continues_the_same_run(tiny_settings: dict, face_folder: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    ids = _interrupted_then_resumed(tiny_settings, face_folder, out, "mlflow")
    assert ids["first"] == ids["then"]
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run = client.get_run(ids["then"])
    assert run.data.params["optim.epochs"] == "2"
    history = {m.step: m.value for m in client.get_metric_history(ids["then"], "train/loss")}
    assert set(_steps(out)) <= set(history)


def test_a_missing_tracker_package_is_one_sentence_before_training(tiny_settings: dict, face_folder: Path,
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r'pip install "dinopre\[wandb\]"'):
        fit(_logging_config(tiny_settings, face_folder, out, "wandb"), NullReporter())
    assert not (out / "checkpoint_last.pt").exists()


# ============ a tracker never stops or corrupts training ============


class NoticeRecorder(Recorder):
    def notices(self, warning: bool | None = None) -> list[str]:
        return [e.message for e in self.events if isinstance(e, Notice) and warning in (None, e.warning)]


class FakeTracker:
    """A tracker of a remote service: `hang` never connects, `fail_at` raises from the n-th call on."""

    calls: list[str] = []
    hang = threading.Event()
    fail_at: int | None = None

    def __init__(self, run_dir: Path, config: dict, run_id: str | None, step: int) -> None:
        if FakeTracker.hang.is_set():
            threading.Event().wait()
        self.run_id = run_id or "fresh"

    @staticmethod
    def target(run_dir: Path) -> str | None:
        return "http://tracking.example:5000"

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        FakeTracker.calls.append(f"scalars {step}")
        if FakeTracker.fail_at is not None and len(FakeTracker.calls) >= FakeTracker.fail_at:
            raise ConnectionError("the server went away")

    def log_image(self, tag: str, path: Path, step: int) -> None:
        FakeTracker.calls.append(f"image {tag}")

    def close(self) -> None:
        FakeTracker.calls.append("close")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> type[FakeTracker]:
    monkeypatch.setitem(trackers.KINDS, "mlflow", FakeTracker)
    FakeTracker.calls, FakeTracker.fail_at = [], None
    FakeTracker.hang.clear()
    yield FakeTracker
    FakeTracker.hang.clear()


def _step(step: int) -> StepLogged:
    return StepLogged(epoch=0, epochs=1, step_in_epoch=step, steps_per_epoch=10, global_step=step, total_steps=10,
                      metrics={"loss": 1.0})


def test_connecting_says_where_and_gives_up_after_its_timeout(fake: type[FakeTracker], tmp_path: Path) -> None:
    fake.hang.set()
    recorder, started = NoticeRecorder(), time.monotonic()
    with pytest.raises(ConfigError, match=r"--logger mlflow could not start \(no answer within 0.5 s\); fix its "
                                          "set-up or drop it."):
        trackers.Trackers(recorder, ("mlflow",), tmp_path, {}, timeout=0.5)
    assert time.monotonic() - started < 5
    assert recorder.notices() == ["Connecting to http://tracking.example:5000 for --logger mlflow (waiting at most "
                                  "0.5 s; DINOPRE_TRACKER_TIMEOUT sets it)."]
    resumed = NoticeRecorder()  # a resume goes on without it: --logger cannot change, the run must stay resumable
    assert trackers.Trackers(resumed, ("mlflow",), tmp_path, {}, {"mlflow": "abc"}, 8, timeout=0.5).run_ids == {}
    assert resumed.notices(warning=True) == ["--logger mlflow could not start (no answer within 0.5 s); this run goes "
                                             "on without it (metrics.jsonl keeps every step)."]


def test_the_tracker_timeout_is_30_s_unless_the_variable_says(monkeypatch: pytest.MonkeyPatch) -> None:
    assert trackers.tracker_timeout({}) == 30
    assert trackers.tracker_timeout({"DINOPRE_TRACKER_TIMEOUT": "2.5"}) == 2.5
    with pytest.raises(ConfigError, match="DINOPRE_TRACKER_TIMEOUT='-1' is not a positive number of seconds"):
        trackers.tracker_timeout({"DINOPRE_TRACKER_TIMEOUT": "-1"})


def test_a_failing_tracker_is_dropped_with_one_warning_and_the_events_go_on(fake: type[FakeTracker],
                                                                            tmp_path: Path) -> None:
    fake.fail_at = 2
    recorder = NoticeRecorder()
    group = trackers.Trackers(recorder, ("mlflow",), tmp_path, {}, timeout=5)
    for step in range(1, 6):
        group.emit(_step(step))
        time.sleep(0.05)  # the tracker's thread takes its calls meanwhile
    group.close()
    assert [e.global_step for e in recorder.events if isinstance(e, StepLogged)] == [1, 2, 3, 4, 5]
    assert recorder.notices(warning=True) == ["--logger mlflow failed (the server went away); it is dropped for the "
                                              "rest of this process, training goes on and metrics.jsonl keeps every "
                                              "step."]
    assert fake.calls == ["scalars 1", "scalars 2", "close"]  # nothing sent after the failure
    assert group.run_ids == {"mlflow": "fresh"}  # kept: a resume tries that run again


@pytest.mark.slow
def test_an_mlflow_store_deleted_mid_run_and_lost_on_resume_never_stops_training(
        tiny_settings: dict, face_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"

    class DeleteStoreThenStop(NoticeRecorder):
        def emit(self, event: object) -> None:
            super().emit(event)
            if isinstance(event, StepLogged) and event.global_step == 4:
                while (out / "mlruns").exists():  # the store disappears under a live run (whose tracker thread
                    shutil.rmtree(out / "mlruns", ignore_errors=True)  # may write a file into it meanwhile)
            if isinstance(event, StepLogged) and event.global_step == 10:
                raise KeyboardInterrupt

    first = DeleteStoreThenStop()
    with pytest.raises(KeyboardInterrupt):
        fit(_logging_config(tiny_settings, face_folder, out, "mlflow"), first)
    assert len(first.notices(warning=True)) == 1 and "--logger mlflow failed (" in first.notices(warning=True)[0]
    lost = torch.load(out / "checkpoint_last.pt", weights_only=True)["trackers"]["mlflow"]
    assert not (out / "mlruns").exists()
    resumed = NoticeRecorder()
    # Before, this resume failed ("Run ... not found"), and --logger cannot change on resume.
    fit(_logging_config(tiny_settings, face_folder, out, "mlflow"), resumed, resume_from=out)
    new = torch.load(out / "checkpoint_last.pt", weights_only=True)["trackers"]["mlflow"]
    [warning] = resumed.notices(warning=True)
    assert new != lost and warning.startswith(f"--logger mlflow: the run {lost} could not be continued (")
    assert warning.endswith(f"); logging to a new run {new} from step 8 on (metrics.jsonl keeps every step; dinopre "
                            "plot draws them).")
    assert sorted(_steps(out)) == list(range(2, 13, 2))  # metrics.jsonl complete: every logged step once
    history = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri()).get_metric_history(new, "train/loss")
    assert {m.step for m in history} == {10, 12}
