"""The typed training state: the one writer and reader of a checkpoint's contents, format 1 kept as it was."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dinopre.base.errors import CheckpointError
from dinopre.files.checkpoint import load_file
from dinopre.files.schema import SchemaError
from dinopre.files.state import RankShare, TrainingState, load_training_checkpoint

OLD_CHECKPOINT = Path(__file__).parent.parent / "fixtures" / "checkpoint_v1_ibot_step4.pt"
OPTIONAL = ("dinopre_version", "best_knn", "recipe", "evaluations", "data", "world_size", "trackers")


def _same(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_a_checkpoint_written_before_the_typed_state_reads_and_writes_back_the_same_dict() -> None:
    raw = load_file(OLD_CHECKPOINT)
    state = load_training_checkpoint(OLD_CHECKPOINT)
    assert state.epoch == raw["epoch"] and state.global_step == raw["global_step"] and state.ranks is None
    assert _same(state.to_dict(), raw)  # same keys, in the same order, same values


def test_keys_older_files_lack_get_the_value_their_absence_meant() -> None:
    raw = {k: v for k, v in load_file(OLD_CHECKPOINT).items() if k not in OPTIONAL}
    state = TrainingState.from_dict(raw, "old.pt")
    assert (state.best_knn, state.recipe, state.evaluations, state.data, state.world_size, state.trackers,
            state.dinopre_version) == (None, None, [], {}, 1, {}, None)
    assert "recipe" not in state.to_dict() and "dinopre_version" not in state.to_dict()


@pytest.mark.parametrize(("key", "value", "words"), [
    ("world_size", 0, "its world_size is not a process count of 1 or more"),
    ("trackers", {"wandb": 7}, "its trackers is not a mapping of tracker names to run ids"),
    ("ranks", [{"rng": {}, "loss_sums": {}}], "its ranks is not a list of each process's generator states"),
])
def test_the_keys_schema_did_not_check_are_one_sentence_when_damaged(key: str, value: object, words: str) -> None:
    raw = {**load_file(OLD_CHECKPOINT), key: value}
    with pytest.raises(SchemaError, match=words):
        TrainingState.from_dict(raw, "bad.pt")


@pytest.mark.parametrize("data", [
    {"version": 2, "count": -1, "names": "", "sizes": "", "mtimes": "", "roots": []},
    {"version": 2, "count": 3, "names": 7, "sizes": "", "mtimes": "", "roots": []},
    {"version": 2, "count": 3, "names": "", "sizes": "", "mtimes": "", "roots": "/data/face"},
    {"fingerprint": None},
])
def test_a_damaged_fingerprint_of_the_training_images_is_one_sentence(data: dict) -> None:
    """A resume compares these with the folder it scans: a wrong type is refused when the file is read."""
    raw = {**load_file(OLD_CHECKPOINT), "data": data}
    with pytest.raises(SchemaError, match="its data is not the fingerprint of its training images"):
        TrainingState.from_dict(raw, "bad.pt")


def test_keep_blank_is_checked_with_the_rest_of_the_configuration() -> None:
    """Blank crops left out or kept is a setting of the run: a value that is not true or false is refused."""
    raw = load_file(OLD_CHECKPOINT)
    assert "keep_blank" not in raw["config"]["data"]  # written before blank crops were left out: still loads
    raw["config"]["data"]["keep_blank"] = "yes"
    with pytest.raises(CheckpointError, match="keep_blank' must be true or false"):
        TrainingState.from_dict(raw, "bad.pt")


def test_each_process_takes_back_its_own_share_on_as_many_processes() -> None:
    state = TrainingState.from_dict(load_file(OLD_CHECKPOINT), "x.pt")
    shares = [RankShare(rng={"torch": torch.full((3,), r, dtype=torch.uint8)}, loss_sums={"loss": torch.tensor(r)})
              for r in range(2)]
    two = TrainingState(**{**vars(state), "ranks": shares})
    assert two.share(1, 2) == (shares[1].rng, shares[1].loss_sums)
    assert two.to_dict()["ranks"][1] == {"rng": shares[1].rng, "loss_sums": shares[1].loss_sums}
    # on another number of processes: the main process's generator states and the mean sums, for the main only
    assert two.share(0, 3) == (state.rng, state.loss_sums) and two.share(2, 3) == (None, state.loss_sums)
