"""--logger tensorboard|wandb|mlflow: read back without network; a resumed run continues the same tracker run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import face_config

from dinopre.base.errors import ConfigError
from dinopre.base.events import NullReporter, StepLogged
from dinopre.files.export import inspect_file
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
