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
from collections.abc import Iterator
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


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """Turn `auto|cpu|cuda|cuda:i` into a device, refusing CUDA when there is none.

    Args:
        name: the `--device` setting.
        local_rank: this process's rank on its node when several processes train (each takes GPU `local_rank`).

    Raises:
        ConfigError: CUDA was asked for but is not available, or the index does not exist, or a GPU index was
            given to several processes.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and local_rank is not None:
        if device.index is not None:
            raise ConfigError(f"--device {name} would put every process on one GPU; with torchrun or srun use "
                              "--device cuda (or auto): each process takes the GPU of its LOCAL_RANK.")
        device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} was asked but this machine has no usable CUDA GPU; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name} does not exist: this machine has {torch.cuda.device_count()} GPU(s).")
    return device


def device_type(name: str) -> str:
    """`cuda` or `cpu`: the kind of device `--device name` resolves to, without creating a CUDA context."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (no loss scaler needed; dino#58 fp16 NaNs), fp32 on CPU unless asked."""
    if name == "fp32" or (name == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("This GPU does not support bf16; use --precision fp32.")
    return torch.bfloat16


def setup(device_name: str, precision: str, seed: int, local_rank: int | None = None) -> Runtime:
    """Resolve device and precision, seed the global generators and set backend flags for speed.

    Every process of a run seeds alike, so that they all build the same initial weights.
    """
    device = resolve_device(device_name, local_rank)
    amp_dtype = resolve_precision(precision, device)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device=device, amp_dtype=amp_dtype)


def share_cpus(runtime: Runtime, processes: int = 1) -> None:
    """On CPU, give the trainer one thread per core this process may use (its share when `processes` trainers run on
    the node).

    PyTorch's default counts every core the host reports, which inside a container or a SLURM allocation can be
    far more than the process may use, and oversubscribed OpenMP threads spin-wait on each other. Data workers
    are not subtracted: on the 2-core C1 workload (benchmarks/bench.py) 2 threads gave 30-34 img/s against 20-22
    with 1, because decoding and augmentation take little of a step. The count does not depend on --num-workers,
    since the thread count changes the order of float reductions: a run stays bit-identical whatever it is.
    """
    if runtime.device.type == "cpu":
        torch.set_num_threads(max(1, available_cpus() // max(1, processes)))


def available_cpus() -> int:
    """CPUs this process may use (respects affinity masks of containers and SLURM)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_num_workers(processes: int = 1) -> int:
    """DataLoader workers that keep the trainer fed without starving it: one core stays with each trainer (of the
    `processes` on this node)."""
    return max(1, min(8, available_cpus() // max(1, processes) - 1))


_local_only = False  # inside `local_collectives`: reductions cover this process only


def world_size() -> int:
    """Number of training processes whose tensors a reduction covers (1 without torch.distributed)."""
    if _local_only or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


@contextlib.contextmanager
def local_collectives() -> Iterator[None]:
    """Within the block, the reductions of this module cover this process alone: for work only the main process
    does (the evaluation), which must not wait for peers that never join."""
    global _local_only
    previous, _local_only = _local_only, True
    try:
        yield
    finally:
        _local_only = previous


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
