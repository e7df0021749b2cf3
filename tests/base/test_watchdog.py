"""Watching from the side: a rank whose launcher dies stops within 30 s, one whose peer is gone within 60 s, and
either way the last checkpoint stays loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import LIMIT, TINY_RUN, children, clean_env, finish, log_file, running, start_ranks, wait_for_step

from dinopre.base import watchdog
from dinopre.base.errors import ConfigError
from dinopre.files.state import load_training_checkpoint

RUN = ["train", "face", *TINY_RUN, "--epochs", "5", "--checkpoint-every", "4"]  # 160 steps: outlasts every kill


def test_a_lost_peer_is_noticed_within_a_minute_by_default() -> None:
    assert watchdog.peer_timeout({}) + watchdog.BEAT < 60
    assert watchdog.peer_timeout({watchdog.PEER_TIMEOUT_ENV: "5"}) == 5
    with pytest.raises(ConfigError, match="DINOPRE_PEER_TIMEOUT='never' is not a positive number"):
        watchdog.peer_timeout({watchdog.PEER_TIMEOUT_ENV: "never"})


@pytest.mark.parametrize(("rank", "world", "watched"), [(0, 2, [1]), (1, 2, [0]), (0, 1, []), (0, 5, [1, 4]),
                                                        (4, 5, [0, 3]), (2, 5, [1, 3])])
def test_each_process_watches_its_two_neighbours(rank: int, world: int, watched: list[int]) -> None:
    assert watchdog.neighbours(rank, world) == watched


def _step_of_last_checkpoint(run: Path) -> int:
    return load_training_checkpoint(run / "checkpoint_last.pt").global_step


@pytest.mark.slow
def test_ranks_whose_torchrun_is_killed_save_and_stop_within_30_s(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with log_file(tmp_path / "stdout") as stdout, log_file(tmp_path / "stderr") as stderr:
        launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                     "2", "-m", "dinopre", *RUN, "--output-dir", str(out)], env=clean_env(),
                                    stdout=stdout, stderr=stderr)
        try:
            wait_for_step(out, 5, [launcher])
            ranks = children(launcher.pid)
            assert len(ranks) == 2
            launcher.kill()  # torchrun alone: its ranks live in sessions of their own
            killed = time.monotonic()
            while any(running(pid) for pid in ranks) and time.monotonic() - killed < LIMIT:
                time.sleep(0.1)
            stopped_after = time.monotonic() - killed
        finally:
            launcher.kill()
            launcher.wait()
            for pid in children(launcher.pid) + [p for p in ranks if running(p)]:
                os.kill(pid, signal.SIGKILL)
    err = (tmp_path / "stderr").read_text()
    assert stopped_after < 30, err[-3000:]
    assert "The launcher of this run (process" in err and "is gone; stopping as on SIGTERM." in err
    assert "Stopped by SIGTERM at step" in err and "Traceback" not in err
    assert _step_of_last_checkpoint(out) >= 5


@pytest.mark.slow
def test_a_frozen_peer_stops_the_other_rank_which_leaves_its_checkpoint_loadable(tmp_path: Path) -> None:
    """SIGSTOP leaves process 1 alive but silent, as a hung process or a lost node would: process 0 would wait in
    the next collective for 30 minutes. The peer timeout is shortened from 45 s to 5 s for the test."""
    out = tmp_path / "run"
    processes = start_ranks([[*RUN, "--output-dir", str(out)]] * 2, [{watchdog.PEER_TIMEOUT_ENV: "5"}] * 2)
    try:
        wait_for_step(out, 5, processes)
        processes[1].send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        processes[0].wait(timeout=LIMIT)
        stopped_after = time.monotonic() - frozen
    finally:
        processes[1].kill()
    (code, err), _ = finish(processes)
    assert code == watchdog.PEER_LOST_EXIT and stopped_after < 5 + 2 * watchdog.BEAT + 10, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        "Error: Process 1 of 2 has not been heard from for 5 s (stopped, hung, or its node is lost); this process "
        "stops too. The last checkpoint in the run directory is intact: continue with dinopre resume once every "
        "process can run.")
    assert _step_of_last_checkpoint(out) >= 4
