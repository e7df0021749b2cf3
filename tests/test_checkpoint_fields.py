"""Every field of a training checkpoint, damaged one at a time: `dinopre resume` and `dinopre inspect-checkpoint`
answer with one sentence and exit 2, never a TypeError, KeyError, AttributeError or RuntimeError traceback.

The checkpoint is a real one: a tiny demo run stopped in the middle of its second epoch, given the `ranks` share
of a run of 2 processes (what a run under torchrun writes), so that every field `TrainingState.from_dict` reads is
present before one of them is changed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY
from typer.testing import CliRunner

from dinopre.base.events import CheckpointSaved
from dinopre.cli import app
from dinopre.config.loading import build_config
from dinopre.train.engine import fit

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("single_thread")


class _KeepMidEpoch:
    """A reporter that copies the mid-epoch checkpoint aside as it is written."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def emit(self, event: object) -> None:
        if isinstance(event, CheckpointSaved) and event.mid_epoch:
            shutil.copy(event.path, self.target)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The contents of a real mid-epoch checkpoint (step 3 of 2 epochs of 2 steps) with two processes' shares."""
    root = tmp_path_factory.mktemp("fields")
    kept = root / "mid_epoch.pt"
    config = build_config("face", demo=True, cli_settings={**TINY, "demo_images": 16, "checkpoint_every": 3,
                                                           "output_dir": str(root / "run")})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DINOPRE_CACHE_DIR", str(root / "cache"))
        fit(config, _KeepMidEpoch(kept))
    state = torch.load(kept, weights_only=True)
    assert state["global_step"] == 3 and state["step_in_epoch"] == 1 and state["loss_sums"]
    share = {"rng": state["rng"], "loss_sums": state["loss_sums"]}
    state.update(world_size=2, ranks=[share, {"rng": dict(share["rng"]), "loss_sums": dict(share["loss_sums"])}],
                 trackers={"tensorboard": "run-1"})
    return state


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda state: state.update({key: value})


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda state: state.pop(key)


def _inner(key: str, inner: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda state: state[key].update({inner: value})


def _share(index: int, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda state: state["ranks"][index].update({key: value})


def _first_weight(key: str, value: Callable[[torch.Tensor], Any]) -> Callable[[dict[str, Any]], None]:
    def edit(state: dict[str, Any]) -> None:
        name = next(iter(state[key]))
        state[key][name] = value(state[key][name])
    return edit


BYTE = torch.zeros(10, dtype=torch.uint8)
# (id, edit, words of the one sentence, also refused by inspect-checkpoint); the ones inspect lets through need the
# model the configuration builds to be told apart (the weights' shapes, the loss names), which only a resume builds.
EDITS: list[tuple[str, Callable[[dict[str, Any]], None], str, bool]] = [
    ("format_version-missing", _drop("format_version"), "it has no format_version", True),
    ("format_version-text", _set("format_version", "1"), "its format_version is not", True),
    ("format_version-zero", _set("format_version", 0), "its format_version is not", True),
    ("format_version-newer", _set("format_version", 99), "was written by a newer dinopre", True),
    ("config-missing", _drop("config"), "it has no config", True),
    ("config-number", _set("config", 5), "its config is not", True),
    ("config-section-number", _set("config", {"model": 5}), "holds a configuration this dinopre cannot use", True),
    ("config-value", lambda s: s["config"]["optim"].update(epochs="many"), "cannot use", True),
    ("epoch-missing", _drop("epoch"), "it has no epoch", True),
    ("epoch-text", _set("epoch", "1"), "its epoch is not", True),
    ("epoch-negative", _set("epoch", -1), "its epoch is not", True),
    ("epoch-beyond-steps", _set("epoch", 7), "completed epochs took fewer steps", True),
    ("epoch-beyond-history", _set("epoch", 2), "entries for 2 completed epochs", True),
    ("step_in_epoch-float", _set("step_in_epoch", 1.5), "its step_in_epoch is not", True),
    ("step_in_epoch-beyond", _set("step_in_epoch", 9), "exceeds its global_step", True),
    ("global_step-none", _set("global_step", None), "its global_step is not", True),
    ("global_step-bool", _set("global_step", True), "its global_step is not", True),
    ("student-list", _set("student", [1, 2]), "its student is not", True),
    ("student-value", _inner("student", "backbone.norm.weight", 5), "its student is not", True),
    ("student-empty", _set("student", {}), "does not fit the model", False),
    ("student-shape", _first_weight("student", lambda t: torch.zeros(3)), "does not fit the model", False),
    ("teacher-missing", _drop("teacher"), "it has no teacher", True),
    ("teacher-shape", _first_weight("teacher", lambda t: torch.zeros(*t.shape, 2)), "does not fit the model", False),
    ("loss-missing", _drop("loss"), "it has no loss", True),
    ("loss-no-center", _set("loss", {}), "it has no loss center", True),
    ("loss-center-shape", _inner("loss", "center", torch.zeros(3)), "instead of (1, K)", True),
    ("loss-center-integers", _inner("loss", "center", torch.zeros(1, 64, dtype=torch.int64)), "instead of (1, K)",
     True),
    ("loss-center-width", _inner("loss", "center", torch.zeros(1, 3)), "not (1, 64) as its configuration says",
     False),
    ("loss_sums-list", _set("loss_sums", [1.0]), "its loss_sums is not", True),
    ("loss_sums-shape", _inner("loss_sums", "loss", torch.zeros(2)), "loss sums are not single floating-point", True),
    ("loss_sums-integer", _inner("loss_sums", "loss", torch.tensor(3)), "not single floating-point", True),
    ("loss_sums-names", _set("loss_sums", {"other": torch.tensor(1.0)}), "its loss sums are of other", False),
    ("loss_sums-empty-mid-epoch", _set("loss_sums", {}), "its epoch in progress has no loss sums", False),
    ("optimizer-number", _set("optimizer", 5), "its optimizer is not", True),
    ("optimizer-groups", _inner("optimizer", "param_groups", [5]), "its optimizer is not", True),
    ("optimizer-no-groups", _inner("optimizer", "param_groups", []), "does not fit the model", False),
    ("optimizer-params", _inner("optimizer", "param_groups", [{"params": 5}]), "does not fit the model", False),
    ("optimizer-state", _inner("optimizer", "state", {0: 5}), "does not fit the model", False),
    ("rng-missing", _drop("rng"), "it has no rng", True),
    ("rng-no-torch", _set("rng", {"cuda": BYTE}), "its rng is not", True),
    ("rng-shape", _inner("rng", "torch", BYTE), "its generator state has the wrong shape", True),
    ("rng-type", _inner("rng", "torch", torch.zeros(5056)), "its generator state has the wrong shape", True),
    ("rng-cuda", _inner("rng", "cuda", torch.zeros(2, 2)), "its generator state for CUDA", True),
    ("best_loss-text", _set("best_loss", "low"), "its best_loss is not", True),
    ("best_loss-nan", _set("best_loss", float("nan")), "its best_loss is not", True),
    ("best_epoch-negative", _set("best_epoch", -1), "its best_epoch is not", True),
    ("best_epoch-beyond", _set("best_epoch", 5), "is after its last completed epoch", True),
    ("epoch_losses-text", _set("epoch_losses", ["a"]), "its epoch_losses is not", True),
    ("epoch_losses-length", _set("epoch_losses", [1.0, 2.0]), "its epoch_losses has 2 entries", True),
    ("epoch_parts-numbers", _set("epoch_parts", [5]), "its epoch_parts is not", True),
    ("epoch_parts-text", _set("epoch_parts", [{"loss": "x"}]), "its epoch_parts is not", True),
    ("best_knn-text", _set("best_knn", "high"), "its best_knn is not", True),
    ("best_knn-nan", _set("best_knn", float("nan")), "its best_knn is not", True),
    ("recipe-list", _set("recipe", [1]), "its recipe is not", True),
    ("recipe-number", _set("recipe", {"learning_rate": 5}), "its recipe is not", True),
    ("evaluations-number", _set("evaluations", 5), "its evaluations is not", True),
    ("evaluations-no-epoch", _set("evaluations", [{"knn": 50.0}]), "its evaluations is not", True),
    ("evaluations-knn-text", _set("evaluations", [{"epoch": 1, "knn": "x"}]), "its evaluations is not", True),
    ("evaluations-negative-epoch", _set("evaluations", [{"epoch": -1, "knn": 1.0}]), "its evaluations is not", True),
    ("data-list", _set("data", [1, 2]), "its data is not", True),
    ("data-version", _inner("data", "version", 3), "its data is not", True),
    ("data-count", _inner("data", "count", "48"), "its data is not", True),
    ("data-roots", _inner("data", "roots", "/data"), "its data is not", True),
    ("data-names", _inner("data", "names", None), "its data is not", True),
    ("world_size-zero", _set("world_size", 0), "its world_size is not", True),
    ("world_size-text", _set("world_size", "2"), "its world_size is not", True),
    ("world_size-other", _set("world_size", 3), "2 processes' shares for a world_size of 3", True),
    ("trackers-id", _set("trackers", {"wandb": 7}), "its trackers is not", True),
    ("trackers-list", _set("trackers", ["wandb"]), "its trackers is not", True),
    ("ranks-number", _set("ranks", 5), "its ranks is not", True),
    ("ranks-empty-share", _set("ranks", [{"rng": {}, "loss_sums": {}}] * 2), "its ranks is not", True),
    ("ranks-one", lambda s: s.update(ranks=s["ranks"][:1]), "1 processes' shares for a world_size of 2", True),
    ("ranks-rng-shape", _share(1, "rng", {"torch": BYTE}), "the generator state of its process 1", True),
    ("ranks-sums-shape", _share(1, "loss_sums", {"loss": torch.zeros(3)}), "the loss sums of its process 1", True),
    ("ranks-sums-names", _share(1, "loss_sums", {"other": torch.tensor(1.0)}), "its loss sums are of other",
     False),
    ("dinopre_version-number", _set("dinopre_version", 1), "its dinopre_version is not", True),
]


def _one_sentence(result: Any) -> str:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.mark.parametrize(("edit", "words", "inspected"), [pytest.param(*e[1:], id=e[0]) for e in EDITS])
def test_each_damaged_field_is_one_sentence_and_exit_2(checkpoint: dict[str, Any], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       edit: Callable[[dict[str, Any]], None], words: str,
                                                       inspected: bool) -> None:
    monkeypatch.setenv("DINOPRE_CACHE_DIR", str(tmp_path / "cache"))
    state = {key: (dict(value) if isinstance(value, dict) else value) for key, value in checkpoint.items()}
    state["ranks"] = [dict(share) for share in checkpoint["ranks"]]
    state["config"] = {key: (dict(value) if isinstance(value, dict) else value)
                       for key, value in checkpoint["config"].items()}
    edit(state)
    path = tmp_path / "run" / "checkpoint_last.pt"
    path.parent.mkdir()
    torch.save(state, path)
    resumed = runner.invoke(app, ["resume", str(path.parent), "--epochs", "3", "-q"], prog_name="dinopre")
    assert resumed.exit_code == 2, resumed.output
    assert words in _one_sentence(resumed)
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint_last.pt"]  # nothing written beside it
    inspected_result = runner.invoke(app, ["inspect-checkpoint", str(path)], prog_name="dinopre")
    if inspected:
        assert inspected_result.exit_code == 2, inspected_result.output
        assert words in _one_sentence(inspected_result)
    else:
        assert inspected_result.exit_code == 0, inspected_result.output


def test_the_undamaged_checkpoint_resumes_and_inspects(checkpoint: dict[str, Any], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: the same file, unedited, continues to its end (on one process, from two processes' shares)."""
    monkeypatch.setenv("DINOPRE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "run" / "checkpoint_last.pt"
    path.parent.mkdir()
    torch.save(checkpoint, path)
    assert runner.invoke(app, ["inspect-checkpoint", str(path)], prog_name="dinopre").exit_code == 0
    resumed = runner.invoke(app, ["resume", str(path.parent), "-q"], prog_name="dinopre")
    assert resumed.exit_code == 0, resumed.output
    assert torch.load(path, weights_only=True)["global_step"] == 4
