"""Starting, watching and ending real training processes for the multi-process tests (gloo on the CPU).

Each process is `python -m dinopre ...` with the variables torchrun sets (so a test can signal, freeze or kill a
chosen rank), or torchrun itself. Every wait is bounded by LIMIT, so a regression fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

LIMIT = 240  # seconds a launch may take before the test fails instead of hanging
# A tiny ViT on the demo crops: a step takes a few milliseconds, a run of a few epochs outlasts any test's kill.
TINY_RUN = ["--demo", "--quiet", "--batch-size", "16", "--image-size", "32", "--patch-size", "8", "--vit-embed-dim",
            "32", "--vit-depth", "2", "--vit-num-heads", "2", "--num-local-crops", "2", "--local-crop-size", "16",
            "--num-workers", "0", "--log-interval", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any launcher's variables, one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_",
                                                                     "MASTER_", "TORCHELASTIC"))}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def rank_env(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    """What torchrun sets for process `rank` of `world`."""
    return clean_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)


def start_ranks(args_per_rank: list[list[str]], envs: list[dict[str, str]] | None = None) -> list[subprocess.Popen]:
    """Start `python -m dinopre ARGS` once per rank, all joining one group on a free port."""
    port, world = free_port(), len(args_per_rank)
    extra = envs or [{} for _ in range(world)]
    return [subprocess.Popen([sys.executable, "-m", "dinopre", *args], env=rank_env(rank, world, port, **extra[rank]),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank, args in enumerate(args_per_rank)]


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """Wait for every process; (exit code, stderr) per rank."""
    results = []
    try:
        for p in processes:
            _, err = p.communicate(timeout=LIMIT)
            results.append((p.returncode, err))
    finally:
        for p in processes:
            p.kill()
    return results


def wait_for_step(run_dir: Path, step: int, alive: list[Any]) -> None:
    """Until metrics.jsonl has a record of `step` (fails if a process of `alive` ends first)."""
    deadline = time.monotonic() + LIMIT
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step
                                    for line in metrics.read_text().splitlines() if line.endswith("}")):
            return
        if any(p.poll() is not None for p in alive):
            raise AssertionError(f"a process ended before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step}")


def running(pid: int) -> bool:
    """Whether a process (not necessarily a child of this one) still runs; a zombie has ended."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status and "\nState:\tX" not in status


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def log_file(path: Path) -> IO[str]:
    """A file for a process's output: orphans keep writing to it after the test has stopped reading pipes."""
    return open(path, "w")
