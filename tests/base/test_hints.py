"""The commands dinopre prints for the user to run next: pasted into a shell, they run what they say."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from dinopre.base.distributed import Launch
from dinopre.base.hints import export_command, resume_command

TORCHRUN_1_NODE = Launch(rank=0, world_size=2, local_rank=0, local_world_size=2, master_addr="127.0.0.1",
                         master_port=29500, launcher="torchrun")
TORCHRUN_2_NODES = Launch(rank=0, world_size=16, local_rank=0, local_world_size=8, master_addr="node01",
                          master_port=29500, launcher="torchrun")
SRUN = Launch(rank=0, world_size=4, local_rank=0, local_world_size=4, master_addr="n1", master_port=15000,
              launcher="slurm")


def test_a_path_with_spaces_and_quotes_reads_back_as_one_word() -> None:
    run = Path("my runs/it's x")
    command = resume_command(run, "--epochs N", launch=None)
    assert shlex.split(command) == ["dinopre", "resume", str(run), "--epochs", "N"]
    assert shlex.split(export_command(run / "checkpoint_best.pt", "out dir/b.pt")) == [
        "dinopre", "export", str(run / "checkpoint_best.pt"), "out dir/b.pt"]


def test_a_run_under_torchrun_is_resumed_under_torchrun_with_its_process_counts() -> None:
    assert resume_command("my runs/x", launch=TORCHRUN_1_NODE) == \
        "torchrun --standalone --nproc-per-node 2 -m dinopre resume 'my runs/x'"
    assert resume_command("r", "--epochs N", launch=TORCHRUN_2_NODES) == (
        "torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --master-addr node01 --master-port 29500 -m dinopre "
        "resume r --epochs N")
    assert resume_command("r", launch=SRUN) == "srun dinopre resume r"


def test_the_launch_is_read_from_the_environment_after_the_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Ctrl-C message is printed after the process group is gone: the launcher's variables still tell."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    assert resume_command("x") == "dinopre resume x"  # the variables set by hand: not torchrun
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # what torchrun itself sets besides them
    assert resume_command("x") == "torchrun --standalone --nproc-per-node 2 -m dinopre resume x"
    monkeypatch.setenv("RANK", "5")  # variables no launch could set: a plain command rather than a wrong one
    assert resume_command("x") == "dinopre resume x"
