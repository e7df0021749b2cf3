"""Where and how tensors run: device, precision, seeding, thread settings and the generators' states.

Nothing here runs at import time (no side effects on import); `build.build_run` calls `setup()`. The process group
and the cross-process reductions live in `dinopre.base.distributed`, signals in `dinopre.base.signals`.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from dinopre.base.errors import ConfigError


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
