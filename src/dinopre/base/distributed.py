"""Several training processes: how they were launched, the process group, and the decisions they take together.

dinopre has no launcher of its own. `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or SLURM's
`srun` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the job's node list) start the processes; `detect` reads
their variables and `session` joins the process group for the life of a run. Without either, a run is one process
with no process group at all, and every collective in `dinopre.train.runtime` is a no-op.

The rules every process keeps, so that N processes neither write twice nor wait forever for each other:
- global rank 0 is the only writer (never LOCAL_RANK 0: one run folder per node is a classic mistake);
- a decision that changes the control flow (stop on a signal, stop on a non-finite loss, refuse to start) is taken
  on values all processes share, so that every process takes it at the same step;
- a failure that only one process sees is passed to the others through `agree` before anyone trains, so that no
  process waits forever in a collective for a peer that has gone.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dinopre.base.errors import ConfigError, UserError

if TYPE_CHECKING:
    import torch

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# SLURM gives no port: one derived from the job id lets several jobs share a node (a common convention; an explicit
# MASTER_PORT wins).
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000
# Longer than any single-process phase between two collectives (rank 0's k-NN evaluation, a checkpoint write of a
# large model on a slow file system), short enough that a lost peer ends the job within the hour.
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Launch:
    """Where this process stands among the processes of a run.

    Attributes:
        rank: global rank (0 writes the run directory).
        world_size: number of processes.
        local_rank: rank on this node (picks the GPU).
        local_world_size: processes on this node (share its CPU cores).
        master_addr: host of the rendezvous.
        master_port: its port.
        launcher: `torchrun` or `slurm`.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str


_launch: Launch | None = None  # the launch of the session in progress (None: a single process)


def detect(env: Mapping[str, str] | None = None) -> Launch | None:
    """The launch described by the environment: torchrun's variables, else an srun step's, else None.

    Raises:
        ConfigError: some of torchrun's variables are set and others not, or a value is not a number.
    """
    env = os.environ if env is None else env
    present = [name for name in TORCHRUN_VARIABLES if name in env]
    in_srun = "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env
    # In an srun step, MASTER_ADDR / MASTER_PORT alone are the user's choice of rendezvous, not a torchrun launch.
    if present and not (in_srun and set(present) <= {"MASTER_ADDR", "MASTER_PORT"}):
        if len(present) < len(TORCHRUN_VARIABLES):
            missing = ", ".join(name for name in TORCHRUN_VARIABLES if name not in env)
            raise ConfigError(f"The environment sets {', '.join(present)} but not {missing}: launch with torchrun "
                              "(which sets all five), or unset them to train in one process.")
        world = _number(env, "WORLD_SIZE", 1)
        return _checked(Launch(_number(env, "RANK"), world, _number(env, "LOCAL_RANK"),
                               _number(env, "LOCAL_WORLD_SIZE", 1) if "LOCAL_WORLD_SIZE" in env else world,
                               env["MASTER_ADDR"], _number(env, "MASTER_PORT", 1), "torchrun"))
    # Only an srun step sets SLURM_STEP_NUM_TASKS: a batch script that runs `dinopre train` itself is one process,
    # whatever --ntasks the allocation has.
    if in_srun:
        world = _number(env, "SLURM_NTASKS", 1) if "SLURM_NTASKS" in env else _number(env, "SLURM_STEP_NUM_TASKS", 1)
        if world == 1:
            return None
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        port = (_number(env, "MASTER_PORT", 1) if "MASTER_PORT" in env
                else SLURM_PORT_BASE + int(env.get("SLURM_JOB_ID", "0") or 0) % SLURM_PORT_SPAN)
        local_world = _number(env, "SLURM_NTASKS_PER_NODE", 1) if env.get("SLURM_NTASKS_PER_NODE", "").isdigit() \
            else _tasks_on_first_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""))
        return _checked(Launch(_number(env, "SLURM_PROCID"), world, _number(env, "SLURM_LOCALID"), local_world,
                               env.get("MASTER_ADDR") or first_host(nodelist) or "127.0.0.1", port, "slurm"))
    return None


# The variables each launcher's values come from, for the refusals of `_checked`.
_NAMES = {"torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"),
          "slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE", "MASTER_PORT")}


def _checked(found: Launch) -> Launch:
    """Refuse launch variables that cannot describe a real launch: a rank that no process of the group can have
    would wait for the others until the rendezvous times out.

    Raises:
        ConfigError: one sentence naming the variables.
    """
    rank, world, local_rank, local_world, port = _NAMES[found.launcher]
    if found.rank >= found.world_size:
        raise ConfigError(f"{rank}={found.rank} is not below {world}={found.world_size}: ranks count from 0, so a "
                          "group of N processes has ranks 0 to N-1; check the launch command.")
    # SLURM's tasks per node is the first node's count, which another node's local ids may exceed.
    local_fits = found.local_rank < found.local_world_size or found.launcher == "slurm"
    if found.local_world_size > found.world_size or not local_fits:
        raise ConfigError(f"{local_rank}={found.local_rank} and {local_world}={found.local_world_size} do not fit "
                          f"{world}={found.world_size}: a node runs at most all the processes, with local ranks "
                          "0 to its count - 1; check the launch command.")
    if found.master_port > 65535:
        raise ConfigError(f"{port}={found.master_port} is not a TCP port (1 to 65535); check the launch command.")
    return found


def _number(env: Mapping[str, str], name: str, minimum: int = 0) -> int:
    value = env.get(name, "")
    if not value.strip().isdigit() or int(value) < minimum:
        raise ConfigError(f"The environment variable {name}={value!r} is not a whole number of at least {minimum}; "
                          "check the launch command.")
    return int(value)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[07-09,12],cpu1` -> `gpu07` (zero padding kept)."""
    match = re.match(r"\s*([^,\[\s]+)(?:\[([^\]]*)\])?", nodelist)
    if not match:
        return ""
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    return prefix + re.split(r"[-,]", ranges)[0]


def _tasks_on_first_node(tasks_per_node: str) -> int:
    """`4(x2),3` -> 4: the task count SLURM gives the first node."""
    match = re.match(r"\s*(\d+)", tasks_per_node)
    return int(match.group(1)) if match else 1


# ============ the session ============


def launch() -> Launch | None:
    """The launch of the run in progress (None in a single process)."""
    return _launch


def rank() -> int:
    """Global rank of this process (0 in a single process)."""
    return _launch.rank if _launch is not None else 0


def is_main() -> bool:
    """Whether this process writes the run directory and reports progress (global rank 0)."""
    return rank() == 0


def local_rank() -> int | None:
    """Rank of this process on its node, or None in a single process."""
    return _launch.local_rank if _launch is not None else None


def local_world_size() -> int:
    """Training processes on this node (they share its cores)."""
    return _launch.local_world_size if _launch is not None else 1


@contextlib.contextmanager
def session(device_type: str, env: Mapping[str, str] | None = None, *, rendezvous_timeout: float | None = None,
            notify: Callable[[str], None] | None = None) -> Iterator[Launch | None]:
    """Join the process group of a torchrun or srun launch for the duration of the block (nothing otherwise).

    The wait for the others is bounded and interruptible (`rendezvous.join`); once joined, the launcher and the peers
    are watched (`watchdog.Watchdogs`) until the block ends.

    Args:
        device_type: `cuda` (NCCL, one GPU per local rank) or `cpu` (gloo).
        env: the environment to read (the process's own by default).
        rendezvous_timeout: seconds to wait for the others (None: `DINOPRE_RENDEZVOUS_TIMEOUT`, else 5 minutes).
        notify: told, in one sentence, when the wait for the others lasts.

    Raises:
        ConfigError: a partial or impossible launch environment, more processes on a node than it has GPUs, or
            processes that did not all join in time.
        Interrupted: SIGINT or SIGTERM while waiting for the others.
    """
    global _launch
    import torch
    import torch.distributed as dist

    from dinopre.base import rendezvous, watchdog

    found = detect(env)
    if found is None or (dist.is_available() and dist.is_initialized()):
        yield None
        return
    if device_type == "cuda" and found.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"Process {found.rank} has LOCAL_RANK {found.local_rank}, but this node has "
                          f"{torch.cuda.device_count()} GPU(s); start at most one process per GPU.")
    timeout, silence = rendezvous.rendezvous_timeout(rendezvous_timeout, env), watchdog.peer_timeout(env)
    os.environ.setdefault("MASTER_ADDR", found.master_addr)
    os.environ.setdefault("MASTER_PORT", str(found.master_port))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(found.local_rank)
    store = rendezvous.join(found, timeout, notify, env)
    try:
        dist.init_process_group(backend, store=store, rank=found.rank, world_size=found.world_size, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise ConfigError(f"Process {found.rank} of {found.world_size} could not join the others at "
                          f"{found.master_addr}:{found.master_port} ({detail}); check MASTER_ADDR and MASTER_PORT "
                          "and that every process was started.") from None
    _launch = found
    dogs = watchdog.Watchdogs(found, silence, os.environ if env is None else env).start()
    try:
        yield found
    finally:
        dogs.stop()
        _launch = None
        with contextlib.suppress(RuntimeError, ValueError):
            dist.destroy_process_group()


# ============ decisions taken together ============


def agree(error: BaseException | None, share: Any = None) -> list[Any]:
    """Pass a failure of any process to all of them, so that they leave together before training.

    Every process calls this with the error it ran into, or None, at a point where the others call it too: not
    necessarily the same line, since a process that failed skips ahead to the next agreement, where the others' next
    call is (`build.build_run` agrees before the first collective of its own, the engine after the set-up). Afterwards
    either all of them go on, or all of them raise: the process that failed raises its own error; the others raise a
    `UserError` that quotes it. Only the main process's message is printed (`errors.shown_here`). An error raised by
    an agreement is raised again by the next one at once: every process raises at the same agreement, so no process
    is left waiting in it.

    Args:
        error: this process's failure, or None.
        share: a small value to compare across processes (e.g. a digest of the settings).

    Returns:
        Every process's `share`, in rank order, when none failed.

    Raises:
        BaseException: this process's own `error`.
        UserError: another process failed.
    """
    if error is not None and getattr(error, "agreed", False):
        raise error
    if error is not None:
        mark_collective(error)
    if _launch is None:
        if error is not None:
            raise _agreed(error)
        return [share]
    import torch.distributed as dist

    records: list[Any] = [None] * _launch.world_size
    dist.all_gather_object(records, (None if error is None else str(error), share))
    failed = [(r, message) for r, (message, _) in enumerate(records) if message is not None]
    if error is not None and (is_main() or failed[0][0] == rank()):
        raise _agreed(error)
    if failed:
        first, message = failed[0]
        raise _agreed(mark_collective(UserError(f"Process {first} of {_launch.world_size} stopped: {message}")))
    return [value for _, value in records]


def _agreed(error: BaseException) -> BaseException:
    error.agreed = True  # type: ignore[attr-defined]
    return error


def mark_collective(error: BaseException) -> BaseException:
    """Note that every process raises this error together, so only the main process prints it."""
    error.collective = True  # type: ignore[attr-defined]
    return error


def shown_here(error: BaseException) -> bool:
    """Whether this process should print `error`: always on the main process; on the others only a failure of
    their own that the main process cannot know about."""
    return launched_rank() == 0 or not getattr(error, "collective", False)


def launched_rank() -> int:
    """The global rank the launcher gave this process (0 when there is none, or its variables are incomplete),
    readable before and after the session."""
    try:
        found = detect()
    except ConfigError:
        return 0
    return found.rank if found is not None else 0


def gather(value: Any) -> list[Any]:
    """Every process's `value`, in rank order (a one-element list in a single process). Tensors must be on the CPU."""
    if _launch is None:
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * _launch.world_size
    dist.all_gather_object(values, value)
    return values


def barrier() -> None:
    """Wait for every process (nothing in a single process)."""
    if _launch is not None:
        import torch.distributed as dist

        dist.barrier()


def stop_requested(received: int | None, device: torch.device) -> int | None:
    """The stop signal any process received, agreed by all (the largest number wins), or None.

    One small all-reduce per step: SLURM signals every task but not at the same instant, so each process must learn
    of a peer's signal before it decides whether to run the next step.
    """
    if _launch is None:
        return received
    import torch
    import torch.distributed as dist

    flag = torch.tensor([received or 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    value = int(flag.item())
    return value or None


# ============ reductions (no-ops in one process) ============


_local_only = False  # inside `local_collectives`: reductions cover this process only


def world_size() -> int:
    """Number of training processes whose tensors a reduction covers (1 without torch.distributed)."""
    import torch.distributed as dist

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
    import torch.distributed as dist

    if world_size() > 1:
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor across processes in place; returns it unchanged in a single process."""
    import torch.distributed as dist

    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum across processes, in place; unchanged in a single process."""
    import torch.distributed as dist

    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every process's `tensor`, concatenated along the first dimension in rank order, with gradients; `tensor`
    itself in a single process (and inside `local_collectives`). Every process must pass the same shape.

    Every process computes the same loss on the gathered rows. A process's own rows then receive its slice of the
    gradient summed over the processes, i.e. W times the gradient of that one loss; DDP averages the parameters'
    gradients over the W processes, so the step is the step of one process on the whole batch (the `GatherLayer` of
    SimCLR's implementations; torch's `distributed.nn.all_gather` needs reduce_scatter, which gloo lacks).
    """
    if world_size() == 1:
        return tensor
    return _gather_function().apply(tensor)


@functools.cache
def _gather_function() -> type:
    """The autograd function of `all_gather_with_grad` (built on first use: this module imports no torch)."""
    import torch
    import torch.distributed as dist

    class AllGather(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, tensor.contiguous())
            ctx.rows = tensor.shape[0]
            return torch.cat(parts)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            grad = grad.contiguous().clone()  # reduced in place: never the caller's tensor
            dist.all_reduce(grad)
            start = dist.get_rank() * ctx.rows
            return grad[start:start + ctx.rows]

    return AllGather
