"""Watching a run of several processes from the side: its launcher and its peers.

Two daemon threads run while a process belongs to a process group (`distributed.session`):

- **The launcher.** torchrun and srun start each process in a session of its own, so after a `kill -9` of the
  launcher its processes would train on as orphans to the last epoch. A process whose parent changes (it was
  handed to init or a subreaper) sends itself SIGTERM: `signals.StopSignals` lets the current step finish, every
  process agrees to stop at the same step, the checkpoint is written and each exits 143.
- **The peers.** A heartbeat through the run's store: every few seconds each process adds one to its own counter and
  reads its neighbours' (ranks r - 1 and r + 1, so the store's load grows with the processes, not their square). A
  neighbour whose counter has not moved for `PEER_TIMEOUT` seconds (or a store that has not answered for as long)
  is gone: killed, frozen, or its node lost. The collectives would wait out their 30-minute timeout, which stays
  that long on purpose (rank 0's k-NN evaluation runs while the others wait), and the main thread, blocked in one,
  cannot act; so this thread says why and ends the process. Checkpoints are replaced atomically: the last one
  stays loadable. A process that leaves the group cleanly says so first, and is not missed.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from dinopre.base.environment import seconds_from_env
from dinopre.base.rendezvous import reachable

if TYPE_CHECKING:
    import torch.distributed as dist

    from dinopre.base.distributed import Launch

PEER_TIMEOUT_ENV = "DINOPRE_PEER_TIMEOUT"
# Silence before a peer counts as gone: far above any pause of a live process's heartbeat thread, and with the
# beat below it a lost peer is noticed within a minute.
DEFAULT_PEER_TIMEOUT = 45.0
BEAT = 2.0  # seconds between two heartbeats (at most a quarter of the peer timeout)
PARENT_POLL = 1.0  # seconds between two looks at the parent process
STORE_WAIT = datetime.timedelta(seconds=5)  # the longest one heartbeat waits for the store
PEER_LOST_EXIT = 1  # training stopped: the run cannot go on (as for a non-finite loss)
_LEFT = -(10**15)  # added to a counter by a process that leaves cleanly: a negative count means "left"


def peer_timeout(env: Mapping[str, str] | None = None) -> float:
    """Seconds of silence after which a peer is gone (`DINOPRE_PEER_TIMEOUT`, else 45).

    Raises:
        ConfigError: the variable is not a positive number of seconds.
    """
    return seconds_from_env(PEER_TIMEOUT_ENV, DEFAULT_PEER_TIMEOUT, env)


def neighbours(rank: int, world_size: int) -> list[int]:
    """The ranks whose heartbeat `rank` watches: the one before and the one after it, in a ring."""
    return sorted({(rank - 1) % world_size, (rank + 1) % world_size} - {rank})


class Watchdogs:
    """The launcher and peer watchers of one process of a group.

    Args:
        found: this process's launch (the store is at its rendezvous address).
        timeout: seconds of silence after which a peer is gone.
        env: the environment: torchrun's restart count tells apart the heartbeats of its restarts (its store
            outlives them), and only a process that torchrun or srun started watches its parent (one started by
            hand, from a shell that may end, must not stop with it).
    """

    def __init__(self, found: Launch, timeout: float, env: Mapping[str, str]) -> None:
        self.found, self.timeout = found, timeout
        self.beat = min(BEAT, timeout / 4)
        self.prefix = f"dinopre/heartbeat/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self._done = threading.Event()
        self._orphaned = threading.Event()  # the launcher is gone, and under torchrun the store with it
        launched = found.launcher == "slurm" or "TORCHELASTIC_RUN_ID" in env
        self._parent = os.getppid() if launched else 1  # 1: nothing to watch
        self._lock = threading.Lock()
        self._prefix = f"(process {found.rank}) " if found.rank > 0 else ""  # as the command prints its own errors
        self._threads = [threading.Thread(target=self._watch_parent, name="dinopre-launcher-watch", daemon=True),
                         threading.Thread(target=self._heartbeat, name="dinopre-heartbeat", daemon=True)]

    def start(self) -> Watchdogs:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Leave: tell the peers (so that they do not miss this process) and end both threads."""
        self._done.set()
        for thread in self._threads:
            thread.join(timeout=2 * STORE_WAIT.total_seconds())

    # ============ the launcher ============

    def _watch_parent(self) -> None:
        if self._parent == 1:  # started by hand, or by init itself: no launcher to lose
            return
        while not self._done.wait(PARENT_POLL) and not self._launcher_gone():
            pass

    def _launcher_gone(self) -> bool:
        """Whether the launcher is gone; the first thread to notice stops the run as SIGTERM would."""
        with self._lock:
            if not self._orphaned.is_set() and self._parent != 1 and os.getppid() != self._parent:
                self._orphaned.set()
                _say(f"{self._prefix}The launcher of this run (process {self._parent}) is gone; stopping as on "
                     "SIGTERM.")
                os.kill(os.getpid(), signal.SIGTERM)
        return self._orphaned.is_set()

    # ============ the peers ============

    def _heartbeat(self) -> None:
        watched = neighbours(self.found.rank, self.found.world_size)
        started = time.monotonic()
        heard = {rank: (0, started) for rank in watched}  # rank -> (last count, when it last moved)
        left: set[int] = set()
        store, contact = None, started
        while not self._done.wait(self.beat):
            if self._launcher_gone():  # stopping already; a store that went with the launcher would log each try
                store = None
                self._judge(heard, left, contact)
                continue
            try:
                store = store or self._connect()
                store.add(self._key(self.found.rank), 1)
                now = contact = time.monotonic()
                for rank in watched:
                    count = store.add(self._key(rank), 0)
                    if count < 0:
                        left.add(rank)
                    elif count != heard[rank][0]:
                        heard[rank] = (count, now)
            except (RuntimeError, OSError):
                store = None  # reconnect at the next beat
            self._judge(heard, left, contact)
        self._leave(store)

    def _judge(self, heard: dict[int, tuple[int, float]], left: set[int], contact: float) -> None:
        now = time.monotonic()
        if now - contact > self.timeout:
            host = "process 0" if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" else "torchrun"
            self._lost(f"The run's store at {self.found.master_addr}:{self.found.master_port} (held by {host}) has "
                       f"not answered for {self.timeout:g} s")
        silent = [rank for rank, (_, moved) in heard.items() if rank not in left and now - moved > self.timeout]
        if silent:
            self._lost(f"Process {silent[0]} of {self.found.world_size} has not been heard from for "
                       f"{self.timeout:g} s (stopped, hung, or its node is lost)")

    def _lost(self, reason: str) -> None:
        """End this process: its main thread waits in a collective for a peer that will not come."""
        _say(f"Error: {self._prefix}{reason}; this process stops too. The last checkpoint in the run directory is "
             "intact: continue with dinopre resume once every process can run.")
        os._exit(PEER_LOST_EXIT)

    def _leave(self, store: dist.Store | None) -> None:
        # A store that is gone (its host left first, or went with the launcher) has no peer left to miss this
        # process; its client would log a screenful for the failed try, so look with a plain socket first.
        if self._launcher_gone() or not reachable(self.found.master_addr, self.found.master_port, STORE_WAIT):
            return
        try:
            (store or self._connect()).add(self._key(self.found.rank), _LEFT)
        except (RuntimeError, OSError):
            pass

    def _key(self, rank: int) -> str:
        return f"{self.prefix}{rank}"

    def _connect(self) -> dist.Store:
        import torch.distributed as dist

        if not reachable(self.found.master_addr, self.found.master_port, STORE_WAIT):  # else the store logs screenfuls
            raise OSError("the store does not answer")
        return dist.TCPStore(self.found.master_addr, self.found.master_port, None, is_master=False,
                             timeout=STORE_WAIT, wait_for_workers=False)




def _say(line: str) -> None:
    """One line on stderr from a watcher thread (the main thread, which reports everything else, is busy)."""
    os.write(2, (line + "\n").encode("utf-8", errors="replace"))
