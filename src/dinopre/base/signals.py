"""Stopping cleanly: SIGINT and SIGTERM during a run, and data workers that leave both to the trainer."""

from __future__ import annotations

import ctypes
import signal
import sys
import threading
from types import FrameType

from dinopre.base.errors import Interrupted


class StopSignals:
    """While active, SIGINT and SIGTERM stop a run cleanly instead of killing the process.

    While `deferring` (the training loop runs), a signal only sets `received`: the loop finishes its current step,
    writes a checkpoint and exits with 128 + the signal number; a second Ctrl-C then raises KeyboardInterrupt at
    once (the previous checkpoint stays intact: writes are atomic). Before the loop (scanning, building) the
    signal raises `Interrupted` at once. After the last step (`finish`) the run is complete: a signal is noted in
    `ignored` and the run writes its last files and ends as usual, so that a scheduler that sent it does not
    requeue a finished job; a second Ctrl-C still quits at once. Outside the main thread (where Python cannot
    install handlers) it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferring = False
        self.finished = False
        self.ignored: int | None = None
        self._previous: dict[int, object] = {}

    def finish(self) -> None:
        """The last step is done: from now a signal is ignored (one that came during the last step too)."""
        self.finished, self.deferring = True, False
        if self.received is not None:
            self.ignored, self.received = self.received, None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.finished:
            if self.ignored is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.ignored = signum
            return
        if not self.deferring:
            raise Interrupted(f"Stopped by {signal.Signals(signum).name} outside the training loop; checkpoints "
                              "already in the run directory are intact.", 128 + signum)
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    @property
    def ignored_name(self) -> str | None:
        """The signal that arrived after the last step, if any (`SIGTERM`, `SIGINT`)."""
        return signal.Signals(self.ignored).name if self.ignored is not None else None


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: leave SIGINT/SIGTERM to the trainer, which stops the workers itself after saving
    (`pipeline.worker_processes`), and die with the trainer.

    A Ctrl-C reaches the whole process group; a worker killed by it would make the loader raise in the trainer
    while it writes its checkpoint. A trainer killed with SIGKILL cannot stop its workers, so on Linux each worker
    asks the kernel for a SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), even one blocked in a read.
    """
    for signum in StopSignals.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    _die_with_parent()


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # no prctl: the loader's own watchdog still notices within seconds
        pass
