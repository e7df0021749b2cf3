"""Building a run of several processes: they agree on their settings, and a set-up error of one reaches all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from processes import TINY_RUN, finish, start_ranks

from dinopre.config.loading import build_config
from dinopre.train.build import PER_PROCESS, settings_differences, shared_settings


def test_settings_a_process_may_choose_for_itself_are_not_compared() -> None:
    config = build_config("face", demo=True, cli_settings={"num_workers": 3, "device": "cpu",
                                                           "rendezvous_timeout": 60})
    other = build_config("face", demo=True, cli_settings={"num_workers": 0, "device": "auto"})
    assert shared_settings(config, 512) == shared_settings(other, 512)
    assert not PER_PROCESS & set(shared_settings(config, 512))
    assert shared_settings(config, 512) != shared_settings(config, 511)  # the recipe derives settings from the count


def test_differing_settings_are_named_in_one_sentence_with_their_values() -> None:
    first = shared_settings(build_config("face", demo=True), 512)
    second = {**first, "learning_rate": 0.002, "epochs": 3}
    message = settings_differences([first, first, second])
    assert message == (
        "The training processes were started with different settings: epochs (12 on process 0, 3 on process 2), "
        "learning_rate (None on process 0, 0.002 on process 2); give every process the same command and "
        "configuration (only device, num_workers, rendezvous_timeout may differ).")


def _only_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.mark.slow
def test_processes_started_with_different_settings_refuse_together(tmp_path: Path) -> None:
    base = ["train", "face", *TINY_RUN, "--epochs", "1", "--output-dir", str(tmp_path / "run")]
    results = finish(start_ranks([[*base, "--learning-rate", "0.001", "--num-workers", "1"],
                                  [*base, "--learning-rate", "0.002", "--log-interval", "3"]]))
    assert [code for code, _ in results] == [2, 2]
    assert _only_error_line(results[0][1]) == (
        "Error: The training processes were started with different settings: learning_rate (0.001 on process 0, "
        "0.002 on process 1), log_interval (1 on process 0, 3 on process 1); give every process the same command and "
        "configuration (only device, num_workers, rendezvous_timeout may differ).")
    assert results[1][1].strip() == ""  # the same refusal, said once
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_set_up_error_of_process_0_alone_stops_every_process_with_its_one_sentence(tmp_path: Path) -> None:
    """`--logger wandb` where only process 0 lacks wandb: before, process 1 went on into DDP's collectives and the
    run ended in a 100-line "DDP expects same model across all ranks" traceback instead of the sentence."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import importlib.util\n_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a, **k: None if name == 'wandb' else _find(name, *a, **k)\n")
    args = ["train", "face", *TINY_RUN, "--epochs", "1", "--logger", "wandb", "--output-dir", str(tmp_path / "run")]
    path = os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])
    results = finish(start_ranks([args, args], [{"PYTHONPATH": path}, {"WANDB_MODE": "offline"}]))
    assert [code for code, _ in results] == [2, 2]
    assert _only_error_line(results[0][1]) == (
        'Error: --logger wandb needs the wandb package: install it with pip install "dinopre[wandb]", or drop '
        "--logger wandb.")
    assert results[1][1].strip() == ""
    assert not (tmp_path / "run").exists()
