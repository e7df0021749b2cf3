"""The commands dinopre tells the user to run next (`resume`, `export`): shell-quoted, so that a path with spaces
or quotes can be pasted as printed, and launched the way the run was (torchrun, srun), so that a resume runs on as
many processes as the run did.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from dinopre.base import distributed
from dinopre.base.errors import ConfigError


def shell_command(*words: str | Path) -> str:
    """The words as one command line a POSIX shell reads back as those words."""
    return " ".join(shlex.quote(str(word)) for word in words)


def resume_command(target: str | Path, options: str = "", launch: distributed.Launch | None = None) -> str:
    """`dinopre resume TARGET`, under the launcher of this process's run, if any.

    Args:
        target: the run directory or checkpoint to continue.
        options: written after the command as they are (e.g. `--epochs N`, where N is for the user to choose).
        launch: the launch to repeat; by default this process's (from its environment once the session is over).

    Returns:
        The command line: `dinopre resume ...`, `torchrun ... -m dinopre resume ...` (with the same process
        counts, and the rendezvous of the first node when there are several) or `srun dinopre resume ...`.
    """
    launch = launch if launch is not None else _this_launch()
    words: list[str | Path] = ["dinopre"]
    if launch is not None and launch.launcher == "torchrun":
        nodes = max(1, launch.world_size // launch.local_world_size)
        # One node: --standalone picks a free rendezvous itself. Several: the same command on each node with its
        # --node-rank (this one is the first node's, where the run directory is written).
        # The options in the README's order.
        processes = ["--nproc-per-node", str(launch.local_world_size)]
        where = ["--standalone", *processes] if nodes == 1 else [
            "--nnodes", str(nodes), "--node-rank", "0", *processes, "--master-addr", launch.master_addr,
            "--master-port", str(launch.master_port)]
        words = ["torchrun", *where, "-m", "dinopre"]
    elif launch is not None and launch.launcher == "slurm":
        words = ["srun", "dinopre"]
    command = shell_command(*words, "resume", target)
    return f"{command} {options}" if options else command


def export_command(checkpoint: str | Path, output: str | Path) -> str:
    """`dinopre export CHECKPOINT OUTPUT` (one process: exporting needs no launcher)."""
    return shell_command("dinopre", "export", checkpoint, output)


def _this_launch() -> distributed.Launch | None:
    """This process's launch, when a launcher started it: torchrun's variables set by hand (each rank started
    from a shell of its own) are not torchrun, which also sets TORCHELASTIC_RUN_ID."""
    launch = distributed.launch()
    if launch is None:
        try:
            launch = distributed.detect()
        except ConfigError:  # variables no launch could set: the run was refused before it started
            return None
    if launch is not None and launch.launcher == "torchrun" and "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return launch
