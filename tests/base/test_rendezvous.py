"""Joining the others: launch variables checked, the wait bounded by its own timeout, Ctrl-C and SIGTERM obeyed."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from processes import TINY_RUN, free_port, rank_env
from typer.testing import CliRunner

from dinopre.base import distributed, rendezvous
from dinopre.base.distributed import detect
from dinopre.base.errors import ConfigError, Interrupted
from dinopre.base.signals import StopSignals
from dinopre.cli import app

TORCHRUN = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
SRUN = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_ID": "1"}


@pytest.mark.parametrize(("env", "named"), [
    ({**TORCHRUN, "RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 is not below WORLD_SIZE=1"),
    ({**TORCHRUN, "RANK": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    ({**TORCHRUN, "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}, "LOCAL_RANK=2 and LOCAL_WORLD_SIZE=2 do not fit"),
    ({**TORCHRUN, "LOCAL_WORLD_SIZE": "3"}, "LOCAL_RANK=0 and LOCAL_WORLD_SIZE=3 do not fit WORLD_SIZE=2"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ({**SRUN, "SLURM_PROCID": "2"}, "SLURM_PROCID=2 is not below SLURM_NTASKS=2"),
])
def test_launch_variables_no_launch_could_set_are_refused(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        detect(env)


def test_a_rank_beyond_the_world_is_one_sentence_and_exit_2_at_once(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    for name, value in {**TORCHRUN, "RANK": "1", "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(name, value)
    started = time.monotonic()
    result = CliRunner().invoke(app, ["train", "face", *TINY_RUN, "--output-dir", str(tmp_path / "run")])
    assert result.exit_code == 2 and time.monotonic() - started < 30
    assert result.output.strip().splitlines() == [
        "Error: RANK=1 is not below WORLD_SIZE=1: ranks count from 0, so a group of N processes has ranks 0 to N-1; "
        "check the launch command."]


def test_the_rendezvous_timeout_is_the_option_else_the_variable_else_five_minutes() -> None:
    assert rendezvous.rendezvous_timeout(None, {}) == 300
    assert rendezvous.rendezvous_timeout(None, {rendezvous.TIMEOUT_ENV: "42"}) == 42
    assert rendezvous.rendezvous_timeout(7.5, {rendezvous.TIMEOUT_ENV: "42"}) == 7.5
    for bad in ("soon", "0", "-3", "nan", "inf"):
        with pytest.raises(ConfigError, match=f"{rendezvous.TIMEOUT_ENV}='{bad}' is not a positive number"):
            rendezvous.rendezvous_timeout(None, {rendezvous.TIMEOUT_ENV: bad})
    assert rendezvous.TIMEOUT_ENV == "DINOPRE_RENDEZVOUS_TIMEOUT"


def _launched(monkeypatch: pytest.MonkeyPatch, rank: int, port: int) -> None:
    """This test process as process `rank` of 2 (restored afterwards: the session sets MASTER_* if missing)."""
    for name, value in rank_env(rank, 2, port).items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_lone_process_gives_up_after_its_own_timeout_and_says_so_while_waiting(
        monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    _launched(monkeypatch, rank, free_port())
    monkeypatch.setattr(rendezvous, "NOTICE_AFTER", 0.5)
    notices: list[str] = []
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"Waited 2 s for the other processes at 127\.0\.0\.1:\d+ \((1 of 2 here|"
                                          r"none reachable yet)\); start all 2 .* --rendezvous-timeout or "
                                          "DINOPRE_RENDEZVOUS_TIMEOUT"):
        with distributed.session("cpu", rendezvous_timeout=2, notify=notices.append):
            pass
    assert time.monotonic() - started < 15
    assert len(notices) == 1 and "giving up after 2 s (--rendezvous-timeout or DINOPRE_RENDEZVOUS_TIMEOUT)" in \
        notices[0]
    assert distributed.launch() is None


def test_sigterm_ends_a_process_waiting_for_process_0(monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process: the handler of `StopSignals` runs while the wait goes on in Python."""
    _launched(monkeypatch, 1, free_port())
    timer = threading.Timer(1.0, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM))
    started = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Interrupted, match="Stopped by SIGTERM while waiting for the other processes at") as caught:
            with StopSignals(), distributed.session("cpu", rendezvous_timeout=60):
                pass
    finally:
        timer.cancel()
    assert caught.value.exit_code == 143 and time.monotonic() - started < 10


def _wait_until_listening(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"process 0 never listened: {process.communicate()}")


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_end_process_0_of_a_group_whose_peer_never_comes(tmp_path: Path, signum: int,
                                                                            code: int) -> None:
    """`RANK=0 WORLD_SIZE=2 dinopre train ...` and no second process: the signal ends it within seconds."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "dinopre", "train", "face", *TINY_RUN, "--output-dir",
                                str(tmp_path / "run")], env=rank_env(0, 2, port), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        _wait_until_listening(port, process)
        time.sleep(0.5)
        process.send_signal(signum)
        started = time.monotonic()
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == code and time.monotonic() - started < 10
    name = signal.Signals(signum).name
    assert f"Stopped by {name} while waiting for the other processes at 127.0.0.1:{port}; nothing was trained." \
        in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()
