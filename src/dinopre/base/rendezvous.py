"""Joining the other processes of a run: a bounded wait that Ctrl-C and SIGTERM interrupt.

torch's own join (`init_process_group` with `env://`) waits inside the C++ store, which retries its connection
after an interrupted sleep: a Python signal handler never runs, and a missing process keeps the others waiting for
the whole collective timeout (30 minutes), deaf to Ctrl-C and SIGTERM. Here the store's port is tried with a plain
socket for at most a second at a time, from a Python loop, and the processes count themselves in through the store,
again polled from Python: Python regains control at least once a second, so `signals.StopSignals` can stop the wait
(exit 130 / 143), and the wait gives up after its own timeout: 5 minutes, unless `--rendezvous-timeout` or
`DINOPRE_RENDEZVOUS_TIMEOUT` say otherwise.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from dinopre.base.environment import seconds_from_env
from dinopre.base.errors import ConfigError, Interrupted

if TYPE_CHECKING:
    import torch.distributed as dist

    from dinopre.base.distributed import Launch

TIMEOUT_ENV = "DINOPRE_RENDEZVOUS_TIMEOUT"
# Long enough for every process of a job to start (importing torch on a busy node takes seconds, a SLURM step's
# tasks start within a minute), short enough that a missing one is reported long before the collective timeout.
DEFAULT_TIMEOUT = 300.0
ATTEMPT = datetime.timedelta(seconds=1)  # one try of the store: how long Python may lose control
POLL = 0.05  # seconds between two counts of the processes that joined
NOTICE_AFTER = 5.0  # a normal start joins within this; a longer wait is announced once
# torchrun's agent hosts the store for every process of every restart; a restart's processes count in separately.
_AGENT_STORE = "TORCHELASTIC_USE_AGENT_STORE"


def rendezvous_timeout(option: float | None, env: Mapping[str, str] | None = None) -> float:
    """Seconds to wait for the others: the option, else the environment variable, else 5 minutes.

    Raises:
        ConfigError: the environment variable is not a positive number of seconds.
    """
    if option is not None:
        return option
    return seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT, env, if_unset="wait the default")


def join(found: Launch, timeout: float, notify: Callable[[str], None] | None = None,
         env: Mapping[str, str] | None = None) -> dist.Store:
    """Reach the run's store and wait until every process has counted itself in.

    Args:
        found: this process's launch.
        timeout: seconds to wait in all.
        notify: told once, in one sentence, when the wait lasts (what it waits for and for how long at most).
        env: the environment (the process's own by default).

    Returns:
        The store, its timeout raised to the collective timeout, ready for `init_process_group`.

    Raises:
        ConfigError: the others did not all join in time, or the rendezvous address cannot be used.
        Interrupted: SIGINT or SIGTERM arrived while waiting.
    """
    env = os.environ if env is None else env
    wait = _Wait(found, timeout, notify)
    try:
        store = _connect(found, wait, env.get(_AGENT_STORE) == "True")
        _count_in(store, found, wait, env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except Interrupted as exc:
        raise Interrupted(f"Stopped by {'SIGINT' if exc.exit_code == 130 else 'SIGTERM'} while waiting for the "
                          f"other processes at {wait.address}; nothing was trained.", exc.exit_code) from None
    from dinopre.base.distributed import TIMEOUT

    store.set_timeout(TIMEOUT)  # from here, gloo and NCCL wait as long as any collective may
    return store


class _Wait:
    """The clock of one rendezvous: its deadline, and the one notice a long wait gets."""

    def __init__(self, found: Launch, timeout: float, notify: Callable[[str], None] | None) -> None:
        self.found, self.timeout, self.notify = found, timeout, notify
        self.started = time.monotonic()
        self.address = f"{found.master_addr}:{found.master_port}"
        self.noticed = False

    def tick(self, joined: int | None) -> None:
        """Between two tries: announce a long wait once, and give up at the deadline."""
        waited = time.monotonic() - self.started
        here = "none reachable yet" if joined is None else f"{joined} of {self.found.world_size} here"
        if waited >= self.timeout:
            raise ConfigError(
                f"Waited {self.timeout:g} s for the other processes at {self.address} ({here}); start all "
                f"{self.found.world_size} (and check MASTER_ADDR and MASTER_PORT), or wait longer with "
                f"--rendezvous-timeout or {TIMEOUT_ENV}.")
        if not self.noticed and waited >= NOTICE_AFTER and self.notify is not None:
            self.noticed = True
            self.notify(f"Waiting for the other processes at {self.address} ({here}); giving up after "
                        f"{self.timeout:g} s (--rendezvous-timeout or {TIMEOUT_ENV}).")


def _connect(found: Launch, wait: _Wait, agent_store: bool) -> dist.Store:
    """Process 0 hosts the store (unless torchrun's agent does); the others try it a second at a time."""
    import torch.distributed as dist

    if found.rank == 0 and not agent_store:
        try:
            return dist.TCPStore(found.master_addr, found.master_port, found.world_size, is_master=True,
                                 timeout=ATTEMPT, wait_for_workers=False, multi_tenant=True)
        except (RuntimeError, ValueError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise ConfigError(f"Process 0 cannot host the rendezvous at {wait.address} ({detail}); choose a free "
                              "MASTER_PORT.") from None
    while True:
        # A plain socket first: the store's own connect logs a screenful per refused try, and retries in C++.
        if reachable(found.master_addr, found.master_port):
            try:
                return dist.TCPStore(found.master_addr, found.master_port, None, is_master=False, timeout=ATTEMPT,
                                     wait_for_workers=False)
            except (RuntimeError, ValueError):  # something else answered, or the host went away again
                pass
        wait.tick(None)
        time.sleep(POLL)


def reachable(host: str, port: int, timeout: datetime.timedelta = ATTEMPT) -> bool:
    """Whether something listens at host:port (tried for at most `timeout`; the rendezvous and the watchdog ask
    before they call the store, whose own failed tries log screenfuls and cannot be interrupted)."""
    try:
        with socket.create_connection((host, port), timeout=timeout.total_seconds()):
            return True
    except OSError:
        return False


def _count_in(store: dist.Store, found: Launch, wait: _Wait, attempt: str) -> None:
    """Add this process to the count and wait until every process has."""
    key = f"dinopre/rendezvous/{attempt}/joined"
    try:
        joined = store.add(key, 1)
        while joined < found.world_size:
            wait.tick(joined)
            time.sleep(POLL)
            joined = store.add(key, 0)
    except RuntimeError as exc:  # the host of the store went away
        detail = " ".join(str(exc).split())[:200]
        raise ConfigError(f"The rendezvous at {wait.address} went away while waiting for the other processes "
                          f"({detail}); start all {found.world_size} again.") from None
