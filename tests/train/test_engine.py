"""The engine end to end on tiny models: the run directory, determinism, refusals, non-finite losses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import Recorder, face_config

from dinopre.base.errors import RunDirError, TrainingStopped
from dinopre.base.events import CheckpointSaved, EpochEnded, RunFinished, RunStarted, ScanProgress, StepLogged
from dinopre.config.loading import build_config
from dinopre.files.checkpoint import sha256_file
from dinopre.model.losses import DINOLoss
from dinopre.train.engine import fit
from dinopre.viz.run_pictures import run_pictures


def test_a_run_leaves_the_full_run_directory(tiny_settings: dict, face_folder: Path) -> None:
    config = face_config(tiny_settings, face_folder, export_backbone=str(Path(tiny_settings["output_dir"]) / "bb.pt"))
    recorder = Recorder()
    result = fit(config, recorder, hooks=run_pictures())  # the pictures `dinopre train` draws: views.png
    run_dir = Path(tiny_settings["output_dir"])
    names = {p.name for p in run_dir.iterdir()}
    assert {"checkpoint_last.pt", "checkpoint_best.pt", "params.json", "metrics.jsonl", "artifacts.json",
            "bb.pt", "bb.json", "views.png"} <= names
    assert [n for n in names if n.startswith(".")] == [".dinopre.lock"]  # no temporary files left behind

    state = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["global_step"] == 2 * (48 // 8)
    assert {"student", "teacher", "optimizer", "loss", "rng", "config", "best_loss"} <= set(state)
    assert state["loss"]["center"].shape == (1, 64)
    assert state["config"]["optim"]["epochs"] == 2

    params = json.loads((run_dir / "params.json").read_text())
    assert params["config"]["model"]["vit_embed_dim"] == 32 and params["environment"]["device"] == "cpu"
    assert params["environment"]["augment_on"] == "device"  # the default, on a CPU too

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    steps = [r for r in records if r["type"] == "step"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert [r["loss"] for r in epochs] == pytest.approx(result.epoch_losses)
    assert len(steps) == 6 and {"loss", "lr", "weight_decay", "momentum", "teacher_temp", "teacher_entropy",
                                "images_per_sec", "data_wait"} <= set(steps[0])

    artifacts = json.loads((run_dir / "artifacts.json").read_text())
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "bb.pt", "bb.json"):
        assert artifacts[name]["sha256"] == sha256_file(run_dir / name)

    kinds = [type(e) for e in recorder.events]
    assert kinds[:2] == [ScanProgress, RunStarted] and kinds[-1] is RunFinished
    assert recorder.events[0] == ScanProgress(48, done=True)
    assert kinds.count(EpochEnded) == 2 and kinds.count(StepLogged) == 6


def test_best_checkpoint_is_the_lowest_epoch_loss(tiny_settings: dict, face_folder: Path) -> None:
    result = fit(face_config(tiny_settings, face_folder, epochs=3), Recorder())
    best = torch.load(Path(tiny_settings["output_dir"]) / "checkpoint_best.pt", weights_only=True)
    assert best["epoch"] == result.best_epoch + 1
    assert best["best_loss"] == min(result.epoch_losses)


def _teacher(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint_last.pt", weights_only=True)["teacher"]


def test_same_seed_same_run_and_other_seed_another(tiny_settings: dict, face_folder: Path, tmp_path: Path) -> None:
    runs = {}
    for name, seed, workers in (("a", 0, 0), ("b", 0, 1), ("c", 1, 0)):
        out = tmp_path / name
        runs[name] = (fit(face_config(tiny_settings, face_folder, seed=seed, num_workers=workers, output_dir=str(out)),
                          Recorder()).epoch_losses, _teacher(out))
    (loss_a, teacher_a), (loss_b, teacher_b), (loss_c, teacher_c) = runs["a"], runs["b"], runs["c"]
    assert loss_a == loss_b  # bit for bit, whether data is loaded in the main process or a worker
    assert all(torch.equal(teacher_a[k], teacher_b[k]) for k in teacher_a)
    assert loss_a != loss_c
    assert not torch.equal(teacher_a["backbone.pos_embed"], teacher_c["backbone.pos_embed"])


def test_an_existing_run_is_not_overwritten_by_accident(tiny_settings: dict, face_folder: Path) -> None:
    config = face_config(tiny_settings, face_folder, epochs=1)
    fit(config, Recorder())
    with pytest.raises(RunDirError, match="dinopre resume .* --overwrite"):
        fit(config, Recorder())
    fit(config, Recorder(), overwrite=True)
    records = (Path(tiny_settings["output_dir"]) / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(r)["type"] == "epoch" for r in records) == 1  # the old log was started afresh


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
    tiny_settings: dict, face_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = DINOLoss.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if calls["n"] > 6 else loss  # epoch 2 diverges

    monkeypatch.setattr(DINOLoss, "forward", poisoned)
    with pytest.raises(TrainingStopped, match=r"non-finite at step \d+ \(epoch 2\): loss nan"):
        fit(face_config(tiny_settings, face_folder), Recorder())
    state = torch.load(Path(tiny_settings["output_dir"]) / "checkpoint_last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in state["teacher"].values())


def test_too_few_images_for_a_batch(tiny_settings: dict, face_folder: Path) -> None:
    from dinopre.base.errors import DataError

    with pytest.raises(DataError, match="fewer than --batch-size 64"):
        fit(face_config(tiny_settings, face_folder, batch_size=64), Recorder())


@pytest.mark.slow
def test_a_short_run_on_structured_images_learns_without_collapsing(tmp_path: Path) -> None:
    """~200 steps of the demo recipe (--demo --train-dir) on face-like JPEGs: the loss falls, no collapse."""
    from dinopre.data.demo import write_synthetic_folder

    folder = tmp_path / "faces"
    write_synthetic_folder(folder, "face", 512, size=64)
    config = build_config("face", demo=True, cli_settings={"train_dir": [str(folder)], "num_workers": 1,
                                                           "output_dir": str(tmp_path / "run")})
    result = fit(config, Recorder())
    losses = result.epoch_losses
    assert losses[-1] < losses[0] - 0.2, losses  # the loss falls from its start...
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["type"] == "step"]
    last = steps[-4:]
    ln_k = next(r["entropy_max"] for r in records if r["type"] == "epoch")  # K as the recipe chose it
    # ...without collapsing: not uniform (entropy well below ln K) and not one-hot (many winning prototypes)
    assert max(r["teacher_entropy"] for r in last) < 0.8 * ln_k
    assert min(r["prototypes_used"] for r in last) >= 4


@pytest.mark.slow
def test_ibot_on_a_folder_lowers_both_loss_parts(tmp_path: Path) -> None:
    """`train hands --demo --algorithm ibot --train-dir DIR`: CLS and patch parts both fall; state is complete."""
    from dinopre.data.demo import write_synthetic_folder

    folder = tmp_path / "hands"
    write_synthetic_folder(folder, "hands", 512, size=64)
    run_dir = tmp_path / "run"
    config = build_config("hands", demo=True, cli_settings={
        "train_dir": [str(folder)], "algorithm": "ibot", "num_workers": 1, "output_dir": str(run_dir),
        "export_backbone": str(run_dir / "backbone.pt")})
    result = fit(config, Recorder())
    first, last = result.epoch_parts[0], result.epoch_parts[-1]
    assert last["cls"] < first["cls"] - 0.2 and last["patch"] < first["patch"] - 0.2, result.epoch_parts
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"type": "epoch"' in line]
    assert {"loss", "cls", "patch"} <= set(epochs[0])
    state = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)
    assert set(state["loss"]) == {"center", "patch_center"}
    assert "backbone.mask_token" in state["student"]
    exported = torch.load(run_dir / "backbone.pt", weights_only=True)
    assert "mask_token" not in exported["model"] and exported["metadata"]["algorithm"] == "ibot"


# ============ measuring the features ============


def _independent_knn(backbone: torch.nn.Module, folder: Path, k: int = 20, temperature: float = 0.07) -> float:
    """A weighted k-NN written here from scratch: numpy, PIL, the exported backbone (not dinopre.train.evaluation)."""
    import numpy as np
    from PIL import Image

    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

    def features(fold: str) -> tuple[np.ndarray, np.ndarray]:
        classes = sorted(p.name for p in (folder / fold).iterdir())
        images, labels = [], []
        for label, name in enumerate(classes):
            for path in sorted((folder / fold / name).iterdir()):
                pixels = np.asarray(Image.open(path).convert("RGB"), np.float64) / 255.0
                images.append(((pixels - mean) / std).transpose(2, 0, 1))
                labels.append(label)
        with torch.no_grad():
            out = backbone(torch.tensor(np.stack(images), dtype=torch.float32)).double().numpy()
        return out / np.linalg.norm(out, axis=1, keepdims=True), np.array(labels)

    (train, train_labels), (test, test_labels) = features("train"), features("test")
    similarity = test @ train.T
    nearest = np.argsort(-similarity, axis=1)[:, :k]
    votes = np.zeros((len(test), 2))
    np.add.at(votes, (np.arange(len(test))[:, None], train_labels[nearest]),
              np.exp(np.take_along_axis(similarity, nearest, 1) / temperature))
    return 100.0 * float((votes.argmax(1) == test_labels).mean())


def test_the_knn_in_the_metrics_is_that_of_the_exported_backbone(tiny_settings: dict, face_folder: Path,
                                                                  labelled_folder: Path) -> None:
    from dinopre.files.export import load_dinov2_backbone

    out = Path(tiny_settings["output_dir"])
    config = face_config(tiny_settings, face_folder, epochs=3, eval_dir=str(labelled_folder),
                     export_backbone=str(out / "bb.pt"))
    recorder = Recorder()
    result = fit(config, recorder)
    epochs = [r for r in _records(out) if r["type"] == "epoch"]
    assert all({"knn", "rankme", "feature_spread", "teacher_entropy", "prototypes_used"} <= set(r) for r in epochs)
    assert epochs[-1]["knn"] == pytest.approx(_independent_knn(load_dinov2_backbone(f"file::{out / 'bb.pt'}"),
                                                               labelled_folder), abs=1.0)
    # --best-by defaults to knn with an --eval-dir: checkpoint_best.pt is the epoch of the highest accuracy.
    knn = [r["knn"] for r in epochs]
    best = torch.load(out / "checkpoint_best.pt", weights_only=True)
    assert best["epoch"] == knn.index(max(knn)) + 1 == result.best_epoch + 1
    assert [r["best"] for r in epochs] == [i == knn.index(max(knn[: i + 1])) for i in range(len(knn))]
    assert next(e for e in recorder.events if isinstance(e, RunFinished)).best_by == "knn"
    assert [e.evaluation["knn"] for e in recorder.events if isinstance(e, EpochEnded)] == knn


def test_eval_every_skips_epochs_but_never_the_last(tiny_settings: dict, face_folder: Path,
                                                    labelled_folder: Path) -> None:
    out = Path(tiny_settings["output_dir"])
    fit(face_config(tiny_settings, face_folder, epochs=3, eval_dir=str(labelled_folder), eval_every=2,
                best_by="loss", monitor_images=0), Recorder())
    epochs = [r for r in _records(out) if r["type"] == "epoch"]
    assert ["knn" in r for r in epochs] == [False, True, True]
    assert "rankme" not in epochs[0]  # monitor_images 0: no label-free signals
    losses = [r["loss"] for r in epochs]
    assert torch.load(out / "checkpoint_best.pt", weights_only=True)["epoch"] == losses.index(min(losses)) + 1


def test_a_collapsed_run_says_so_in_the_metrics(tiny_settings: dict, face_folder: Path) -> None:
    """A teacher temperature of 5 flattens the teacher: every epoch records a uniform collapse, with advice."""
    from dinopre.base.events import CollapseWarning

    recorder = Recorder()
    fit(face_config(tiny_settings, face_folder, teacher_temp=5.0, warmup_teacher_temp=5.0), recorder)
    records = _records(Path(tiny_settings["output_dir"]))
    assert [r["collapse"] for r in records if r["type"] == "epoch"] == ["uniform", "uniform"]
    warnings = [r for r in records if r["type"] == "warning"]
    assert [w["collapse"] for w in warnings] == ["uniform", "uniform"] and "--teacher-temp" in warnings[0]["message"]
    assert [e.verdict for e in recorder.events if isinstance(e, CollapseWarning)] == ["uniform", "uniform"]


def test_a_healthy_run_is_not_called_collapsed(tiny_settings: dict, face_folder: Path) -> None:
    fit(face_config(tiny_settings, face_folder), Recorder())
    records = _records(Path(tiny_settings["output_dir"]))
    assert [r["collapse"] for r in records if r["type"] == "epoch"] == [None, None]
    assert not [r for r in records if r["type"] == "warning"]


# ============ exact resume ============

TIMING = {"images_per_sec", "data_wait", "seconds", "eval_seconds"}


class StopAt(Recorder):
    """Simulates the process dying at a given moment: raises after the matching event."""

    def __init__(self, event_type: type, global_step: int) -> None:
        super().__init__()
        self.event_type, self.global_step = event_type, global_step

    def emit(self, event: object) -> None:
        super().emit(event)
        if isinstance(event, self.event_type) and event.global_step == self.global_step:
            raise KeyboardInterrupt


def _records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint_last.pt", weights_only=True)


@pytest.fixture
def resumable(tiny_settings: dict, face_folder: Path):
    """A tiny 3-epoch run (6 steps per epoch, drop path on) with mid-epoch checkpoints every 4 steps."""
    def make(out: Path, **extra: Any):
        return face_config(tiny_settings, face_folder, **{"epochs": 3, "checkpoint_every": 4, "output_dir": str(out),
                                                      **extra})
    return make


@pytest.mark.parametrize(("stop_event", "stop_step", "checkpoint_step", "algorithm", "augment_on", "evaluate"), [
    (CheckpointSaved, 6, 6, "dino", "workers", False),  # right after an epoch-boundary checkpoint
    (StepLogged, 10, 8, "dino", "workers", False),  # mid-epoch, two steps after the checkpoint at step 8 (logs dropped)
    (StepLogged, 10, 8, "ibot", "workers", False),  # the same with masks, the patch head and the patch center
    (StepLogged, 10, 8, "ibot", "device", False),  # views rendered by the batch augmentation instead of the workers
    (StepLogged, 10, 8, "dino", "device", True),  # with a k-NN probe every epoch and best-by-knn checkpoints
    (StepLogged, 10, 8, "ibot", "device", "recipe"),  # every option of the recipes on at once
])
def test_resume_is_bitwise_identical_to_an_uninterrupted_run(resumable, tmp_path: Path, stop_event: type,
                                                             stop_step: int, checkpoint_step: int, algorithm: str,
                                                             augment_on: str, evaluate: bool | str,
                                                             labelled_folder: Path) -> None:
    settings = {"algorithm": algorithm, "augment_on": augment_on,
                **({"eval_dir": str(labelled_folder)} if evaluate else {})}
    if evaluate == "recipe":  # KoLeo, Sinkhorn-Knopp, the contrastive and Drloc heads, a luma teacher, zero-mean
        settings.update(koleo_weight=0.1, centering="sinkhorn", contrast_weight=0.5, drloc_weight=0.5,
                        teacher_view="pattern", zero_mean_patches=True)
    fit(resumable(tmp_path / "straight", **settings), Recorder())
    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        fit(resumable(interrupted, **settings), StopAt(stop_event, stop_step))
    assert _state(interrupted)["global_step"] == checkpoint_step
    recorder = Recorder()
    fit(resumable(interrupted, **settings), recorder, resume_from=interrupted)
    started = next(e for e in recorder.events if isinstance(e, RunStarted))
    assert started.start_step == checkpoint_step and started.resumed_from == interrupted

    straight, resumed = _state(tmp_path / "straight"), _state(interrupted)
    for part in ("student", "teacher"):
        assert all(torch.equal(straight[part][k], resumed[part][k]) for k in straight[part]), part
    assert all(torch.equal(straight["loss"][k], resumed["loss"][k]) for k in straight["loss"])
    assert straight["epoch_losses"] == resumed["epoch_losses"]
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in straight["evaluations"]] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in resumed["evaluations"]]
    assert _records(tmp_path / "straight") == _records(interrupted)  # same logged losses, no duplicates


def test_resume_refuses_other_settings_and_lists_them(resumable, tmp_path: Path) -> None:
    from dinopre.base.errors import ConfigError, RunComplete

    run_dir = tmp_path / "run"
    fit(resumable(run_dir, epochs=1), Recorder())
    with pytest.raises(ConfigError) as info:
        fit(resumable(run_dir, epochs=2, learning_rate=0.01, out_dim=32), Recorder(), resume_from=run_dir)
    assert "out_dim: checkpoint 64, requested 32; learning_rate: checkpoint " in str(info.value)
    assert ", requested 0.01" in str(info.value)  # the lr the auto recipe chose differs from the one asked for
    with pytest.raises(RunComplete, match="is complete: it has done all its 1 epochs"):
        fit(resumable(run_dir, epochs=1), Recorder(), resume_from=run_dir)
    result = fit(resumable(run_dir, epochs=2, num_workers=1, log_interval=3), Recorder(), resume_from=run_dir)
    assert len(result.epoch_losses) == 2  # more epochs, other workers and log interval are fine


def test_resume_refuses_changed_data(resumable, tmp_path: Path, face_folder: Path) -> None:
    import shutil

    from dinopre.base.errors import ConfigError

    data = tmp_path / "data"
    shutil.copytree(face_folder, data)
    run_dir = tmp_path / "run"
    fit(resumable(run_dir, epochs=1, train_dir=[str(data)]), Recorder())
    (data / "signer_a" / "face_000000.jpg").rename(data / "signer_a" / "renamed.jpg")
    with pytest.raises(ConfigError, match="training images changed"):
        fit(resumable(run_dir, epochs=2, train_dir=[str(data)]), Recorder(), resume_from=run_dir)


def test_resume_config_keeps_the_checkpoint_settings(resumable, tmp_path: Path) -> None:
    from dinopre.train.resume import resume_config

    run_dir = tmp_path / "run"
    fit(resumable(run_dir, epochs=1), Recorder())
    config, path = resume_config(run_dir, {"epochs": 2, "device": None})
    assert path == run_dir / "checkpoint_last.pt"
    assert config.optim.epochs == 2 and config.model.out_dim == 64 and config.run.output_dir == str(run_dir)


def test_a_signal_before_the_loop_stops_at_once_with_its_exit_code(tiny_settings: dict, face_folder: Path) -> None:
    """SIGTERM while the folder is scanned (before any step) stops the run with exit code 143, saving nothing."""
    import os
    import signal

    from dinopre.base.errors import Interrupted

    class SignalDuringScan(Recorder):
        def emit(self, event: object) -> None:
            super().emit(event)
            if isinstance(event, ScanProgress):
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted, match="Stopped by SIGTERM outside the training loop") as info:
        fit(face_config(tiny_settings, face_folder), SignalDuringScan())
    assert info.value.exit_code == 143
    assert not (Path(tiny_settings["output_dir"]) / "checkpoint_last.pt").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


@pytest.mark.slow
def test_compiled_and_eager_runs_agree(tiny_settings: dict, face_folder: Path, tmp_path: Path) -> None:
    """--compile runs the same training: step losses equal the eager run's up to float rounding, and the
    checkpoint keeps the plain parameter names (no `_orig_mod.` prefix)."""
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compiled_{compiled}"
        fit(face_config(tiny_settings, face_folder, epochs=1, log_interval=1, output_dir=str(out), compile=compiled),
            Recorder())
        runs[compiled] = [r["loss"] for r in _records(out) if r["type"] == "step"]
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)
    assert "backbone.pos_embed" in _state(tmp_path / "compiled_True")["teacher"]



def test_checkpoints_from_before_augment_on_continue_rendering_in_the_workers(resumable, tmp_path: Path) -> None:
    """A checkpoint without `augment_on` (written before the option existed) resumes with the workers rendering
    its views, as when it was written, not with the new default."""
    from dinopre.train.resume import resume_config, saved_config

    run = tmp_path / "old"
    fit(resumable(run, epochs=1, augment_on="workers"), Recorder())
    state = _state(run)
    del state["config"]["data"]["augment_on"]
    torch.save(state, run / "checkpoint_last.pt")
    assert saved_config(state).data.augment_on == "workers"
    config, _ = resume_config(run, {"epochs": 2})
    assert config.data.augment_on == "workers"
    assert resume_config(run, {"epochs": 2, "augment_on": "device"})[0].data.augment_on == "device"
