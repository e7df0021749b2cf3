"""Where and how tensors run: device, precision, seeding, thread settings and cross-process reductions.

Nothing here runs at import time (style principle: no side effects on import); `engine.fit` calls `setup()`.
Collectives are no-ops in a single process, so every piece of maths runs in a CPU test (unlike dino's
`DINOLoss.update_center`, which calls `all_reduce` unconditionally; dino_ibot.md section 5, problem 4).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from dataclasses import dataclass
from types import FrameType

import torch
import torch.distributed as dist

from dinopre.errors import ConfigError, Interrupted


@dataclass(frozen=True)
class Runtime:
    """The resolved execution settings of a run."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32

    @property
    def precision_name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16"}[self.amp_dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the trunk, chosen once (nanoGPT's `ctx`): a no-op context in fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def resolve_device(name: str) -> torch.device:
    """Turn `auto|cpu|cuda|cuda:i` into a device, refusing CUDA when there is none.

    Raises:
        ConfigError: CUDA was asked for but is not available, or the index does not exist.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} was asked but this machine has no usable CUDA GPU; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name} does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (no loss scaler needed; dino#58 fp16 NaNs), fp32 on CPU unless asked."""
    if name == "fp32" or (name == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("This GPU does not support bf16; use --precision fp32.")
    return torch.bfloat16


def setup(device_name: str, precision: str, seed: int) -> Runtime:
    """Resolve device and precision, seed the global generators and set backend flags for speed."""
    device = resolve_device(device_name)
    amp_dtype = resolve_precision(precision, device)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device=device, amp_dtype=amp_dtype)


def share_cpus(runtime: Runtime) -> None:
    """On CPU, give the trainer one thread per core this process may use.

    PyTorch's default counts every core the host reports, which inside a container or a SLURM allocation can be
    far more than the process may use, and oversubscribed OpenMP threads spin-wait on each other. Data workers
    are not subtracted: on the 2-core C1 workload (benchmarks/bench.py) 2 threads gave 30-34 img/s against 20-22
    with 1, because decoding and augmentation take little of a step. The count does not depend on --num-workers,
    since the thread count changes the order of float reductions: a run stays bit-identical whatever it is.
    """
    if runtime.device.type == "cpu":
        torch.set_num_threads(max(1, available_cpus()))


def available_cpus() -> int:
    """CPUs this process may use (respects affinity masks of containers and SLURM)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_num_workers() -> int:
    """DataLoader workers that keep the trainer fed without starving it: one core stays with the main process."""
    return max(1, min(8, available_cpus() - 1))


def world_size() -> int:
    """Number of training processes (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average a tensor across processes in place; returns it unchanged in a single process."""
    if world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor across processes in place; returns it unchanged in a single process."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum across processes, in place; unchanged in a single process."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global torch generator states (drop path draws come from them), as tensors for a checkpoint.

    CUDA's is saved only for a run on a GPU: reading it creates a CUDA context, which a CPU run must not.
    """
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore the generator states saved by `rng_state`."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class StopSignals:
    """While active, SIGINT and SIGTERM stop a run cleanly instead of killing the process.

    While `deferring` (the training loop runs), a signal only sets `received`: the loop finishes its current step,
    writes a checkpoint and exits with 128 + the signal number; a second Ctrl-C then raises KeyboardInterrupt at
    once (the previous checkpoint stays intact: writes are atomic). Outside the loop (scanning, building,
    exporting) the signal raises `Interrupted` at once. Outside the main thread (where Python cannot install
    handlers) it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferring = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.deferring:
            raise Interrupted(f"Stopped by {signal.Signals(signum).name} outside the training loop; checkpoints "
                              "already in the run directory are intact.", 128 + signum)
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""


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
