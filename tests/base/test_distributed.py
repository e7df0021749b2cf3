"""Several processes (torchrun, srun) on the CPU with gloo: the same run as one process, one writer, resume.

The multi-process tests start real processes the way the launchers do: torchrun itself, or the variables torchrun
and srun set (so a test can signal or kill one chosen process). Each run is a tiny ViT on the built-in demo crops.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from processes import finish, wait_for_step

from dinopre.base.distributed import detect, first_host
from dinopre.base.errors import ConfigError
from dinopre.base.events import NullReporter
from dinopre.config.loading import build_config
from dinopre.data.dataset import EpochBatchSampler
from dinopre.files.export import inspect_file
from dinopre.files.rundir import RunDirectory
from dinopre.train.engine import fit

# KoLeo and drop path are per process (as in DINOv2), so runs on 1 and 2 processes differ by them: off here.
SETTINGS: dict[str, Any] = {"epochs": 2, "batch_size": 16, "image_size": 32, "patch_size": 8, "vit_embed_dim": 32,
                            "vit_depth": 2, "vit_num_heads": 2, "num_local_crops": 2, "local_crop_size": 16,
                            "num_workers": 0, "log_interval": 1, "koleo_weight": 0.0, "drop_path_rate": 0.0}
TINY = ["--demo", "--quiet"] + [x for k, v in SETTINGS.items() for x in (f"--{k.replace('_', '-')}", str(v))]
STEPS = 64  # 512 demo crops / 16, 2 epochs
TIMING = {"images_per_sec", "data_wait", "seconds", "eval_seconds"}
LIMIT = 240  # seconds a launch may take before the test fails instead of hanging


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_",
                                                                     "MASTER_", "TORCHELASTIC"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _rank_env(rank: int, world: int, port: int, launcher: str) -> dict[str, str]:
    env = _clean_env()
    if launcher == "slurm":  # what an srun step sets (no MASTER_ADDR: the first host of the node list is used)
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS=str(world), SLURM_LOCALID=str(rank),
                   SLURM_STEP_NUM_TASKS=str(world), SLURM_STEP_NODELIST="localhost", SLURM_JOB_ID="1",
                   MASTER_PORT=str(port))
    else:
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def _start(args: list[str], world: int, launcher: str = "env") -> list[subprocess.Popen]:
    """Start `python -m dinopre ARGS` as `world` processes (one per rank)."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "dinopre", *args], env=_rank_env(rank, world, port, launcher),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(world)]


def _train(out: Path, world: int, *extra: str, launcher: str = "env") -> list[tuple[int, str]]:
    return finish(_start(["train", "face", *TINY, "--output-dir", str(out), *extra], world, launcher))


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "dinopre", "train", "face", *TINY, "--output-dir", str(out), *extra]
    return subprocess.run(command, env=_clean_env(), capture_output=True, text=True, timeout=LIMIT)


def _one_process(out: Path, **extra: Any) -> None:
    """The same run in this process (one process, no process group)."""
    settings = {**SETTINGS, "output_dir": str(out), **extra}
    fit(build_config("face", demo=True, cli_settings=settings), NullReporter())


def _state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoint_last.pt", weights_only=True)


def _records(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_ok(results: list[tuple[int, str]]) -> None:
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}: {err[-2000:]}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted DINO run on 2 processes, launched by torchrun itself."""
    out = tmp_path_factory.mktemp("straight") / "run"
    done = _torchrun(out, "--checkpoint-every", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


# ============ launch ============


def test_torchrun_variables_are_all_or_nothing() -> None:
    full = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "29500"}
    launch = detect(full)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.master_addr, launch.master_port) == \
        (1, 4, 1, "node1", 29500)
    assert detect({}) is None
    partial = {k: v for k, v in full.items() if k != "MASTER_PORT"}
    with pytest.raises(ConfigError, match="MASTER_PORT"):
        detect(partial)
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        detect({**full, "WORLD_SIZE": "two"})


def test_srun_steps_are_detected_but_a_batch_script_is_one_process() -> None:
    step = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "8",
            "SLURM_STEP_NODELIST": "gpu[07-09,12]", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_ID": "12345"}
    launch = detect(step)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size, launch.master_addr) == \
        (5, 8, 1, 4, "gpu07")
    assert launch.master_port == detect(step).master_port  # derived from the job id: the same on every task
    batch_script = {k: v for k, v in step.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert detect(batch_script) is None  # `dinopre train` run by the script itself, without srun
    assert detect({**step, "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1"}) is None
    torchrun_in_slurm = {**step, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a",
                         "MASTER_PORT": "1"}
    assert detect(torchrun_in_slurm).launcher == "torchrun"
    chosen = detect({**step, "MASTER_ADDR": "login2", "MASTER_PORT": "23456"})  # a rendezvous set in the script
    assert (chosen.launcher, chosen.master_addr, chosen.master_port) == ("slurm", "login2", 23456)
    with pytest.raises(ConfigError, match="RANK"):  # outside srun, MASTER_* alone is a partial torchrun launch
        detect({"MASTER_ADDR": "a", "MASTER_PORT": "1"})


@pytest.mark.parametrize(("nodes", "first"), [("gpu[07-09,12],cpu1", "gpu07"), ("node3,node4", "node3"),
                                              ("single", "single"), ("a[1,2]", "a1"), ("", "")])
def test_the_rendezvous_host_is_the_first_of_the_node_list(nodes: str, first: str) -> None:
    assert first_host(nodes) == first


def test_each_process_takes_its_slice_of_every_global_batch() -> None:
    whole = list(EpochBatchSampler(100, 12, 3, 0, 2))
    for world in (2, 3, 4):
        shares = [list(EpochBatchSampler(100, 12, 3, 0, 2, 0, rank, world)) for rank in range(world)]
        for step, batch in enumerate(whole):
            assert [key for share in shares for key in share[step]] == batch
    resumed = list(EpochBatchSampler(100, 12, 3, 0, 2, 5, 1, 2))  # mid-epoch: the same stream, later
    assert resumed == [b[6:] for b in whole[5:]]


def test_a_partial_torchrun_environment_is_one_clear_error(tmp_path: Path) -> None:
    env = {**_clean_env(), "RANK": "0", "WORLD_SIZE": "2"}
    done = subprocess.run([sys.executable, "-m", "dinopre", "train", "face", *TINY, "--output-dir",
                           str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=LIMIT)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "LOCAL_RANK, MASTER_ADDR, MASTER_PORT" in done.stderr and "torchrun" in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_global_batch_that_does_not_divide_is_refused_by_one_message(tmp_path: Path) -> None:
    results = _train(tmp_path / "run", 2, "--batch-size", "15")
    assert [code for code, _ in results] == [2, 2]
    assert "must divide by the 2 training processes" in results[0][1]
    assert results[1][1].strip() == ""  # the same refusal, said once
    assert not (tmp_path / "run").exists()


def test_a_live_run_folder_stops_every_process_and_names_its_holder(tmp_path: Path) -> None:
    holder = RunDirectory(tmp_path / "run")
    holder.lock()
    try:
        results = _train(tmp_path / "run", 2)
    finally:
        holder.unlock()
    assert [code for code, _ in results] == [2, 2]
    assert f"process {os.getpid()} on {socket.gethostname()}" in results[0][1]
    assert "Traceback" not in results[0][1] + results[1][1]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ============ the same run on 1 and 2 processes ============


def _close(a: dict, b: dict, atol: float) -> None:
    for part in ("student", "teacher"):
        worst = max((a[part][k] - b[part][k]).abs().max().item() for k in a[part])
        assert worst < atol, f"{part} differs by {worst}"
    for name in a["loss"]:
        assert torch.allclose(a["loss"][name], b["loss"][name], atol=atol)
    assert a["epoch_losses"] == pytest.approx(b["epoch_losses"], rel=1e-4)


@pytest.mark.parametrize("algorithm", ["dino", "ibot"])
def test_two_processes_train_like_one_on_the_same_global_batch(straight: Path, tmp_path: Path,
                                                               algorithm: str) -> None:
    _one_process(tmp_path / "one", algorithm=algorithm)
    if algorithm == "dino":
        two = straight  # torchrun
    else:
        two = tmp_path / "two"
        _assert_ok(_train(two, 2, "--algorithm", algorithm, launcher="slurm"))  # srun's variables
    _close(_state(tmp_path / "one"), _state(two), atol=1e-4)
    params = json.loads((two / "params.json").read_text())["environment"]
    assert (params["world_size"], params["batch_per_rank"]) == (2, 8)
    state = _state(two)
    assert state["global_step"] == STEPS and not any(k.startswith("module.") for k in state["student"])
    assert inspect_file(two / "checkpoint_last.pt")["world_size"] == 2


def test_the_teacher_stays_identical_on_every_process(tmp_path: Path) -> None:
    script = tmp_path / "steps.py"
    script.write_text(f"""
import sys, torch
from dinopre.base import distributed
from dinopre.train.build import build_run
from dinopre.config.loading import build_config
from dinopre.data.dataset import EpochBatchSampler
from dinopre.train.step import train_step
from dinopre.data.pipeline import build_data_loader, device_batches

settings = dict(epochs=1, batch_size=16, image_size=32, patch_size=8, vit_embed_dim=32, vit_depth=2, vit_num_heads=2,
                num_local_crops=2, local_crop_size=16, num_workers=0, drop_path_rate=0.1, algorithm="ibot",
                output_dir=r"{tmp_path / 'unused'}")
with distributed.session("cpu"):
    parts = build_run(build_config("face", demo=True, cli_settings=settings))
    c = parts.config
    sampler = EpochBatchSampler(len(parts.data.source), 16, c.run.seed, 0, 1, 0, distributed.rank(), parts.world_size)
    loader, render = build_data_loader(c, parts.data.source, parts.runtime.device, sampler, 0)
    for step, batch in zip(range(6), device_batches(iter(loader), parts.runtime.device, render)):
        train_step(parts.method, parts.optimizer, batch, parts.schedules.at(step + 40), runtime=parts.runtime,
                   clip_grad_norm=3.0, freeze_last_layer=False, model=parts.model)
    torch.save({{"teacher": parts.method.teacher.state_dict(), "loss": parts.method.loss_state()}},
               r"{tmp_path}/rank%d.pt" % distributed.rank())
""")
    port = _free_port()
    processes = [subprocess.Popen([sys.executable, str(script)], env=_rank_env(rank, 2, port, "env"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    _assert_ok(finish(processes))
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for part in ("teacher", "loss"):  # bit for bit, with drop path drawn differently on each process
        assert all(torch.equal(first[part][k], second[part][k]) for k in first[part]), part


# ============ stop, resume, one writer ============


def _one_run_directory(run_dir: Path) -> None:
    names = {p.name for p in run_dir.iterdir()}
    assert names == {"checkpoint_last.pt", "checkpoint_best.pt", "params.json", "metrics.jsonl", "artifacts.json",
                     ".dinopre.lock", "views.png"}, names
    steps = [(r["type"], r["step"]) for r in _records(run_dir)]
    assert len(steps) == len(set(steps)), "metrics.jsonl has duplicate lines"


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The straight run's settings, stopped by a SIGTERM to process 1 alone, mid-epoch."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    processes = _start(["train", "face", *TINY, "--output-dir", str(out), "--checkpoint-every", "8"], 2)
    wait_for_step(out, 11, processes)
    processes[1].send_signal(signal.SIGTERM)
    results = finish(processes)
    assert [code for code, _ in results] == [143, 143], results
    assert "Continue with: dinopre resume" in results[0][1] and results[1][1].strip() == ""
    state = _state(out)
    assert 11 <= state["global_step"] < STEPS // 2  # it stopped in the first epoch, right after the signal
    return out


def test_a_signal_to_one_process_stops_all_and_resume_is_bit_for_bit(straight: Path, stopped: Path,
                                                                     tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    _assert_ok(finish(_start(["resume", str(run), "--quiet"], 2)))
    a, b = _state(straight), _state(run)
    for part in ("student", "teacher"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert all(torch.equal(a["loss"][k], b["loss"][k]) for k in a["loss"])
    assert a["epoch_losses"] == b["epoch_losses"]
    assert _records(straight) == _records(run)  # the same logged losses: all-reduced, no duplicates
    _one_run_directory(run)
    _one_run_directory(straight)


def test_a_two_process_run_continues_on_one_process(straight: Path, stopped: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    done = subprocess.run([sys.executable, "-m", "dinopre", "resume", str(run), "--quiet"], env=_clean_env(),
                          capture_output=True, text=True, timeout=LIMIT)
    assert done.returncode == 0, done.stderr[-2000:]
    _close(_state(straight), _state(run), atol=1e-4)  # the same data stream, up to all-reduce rounding
    assert json.loads((run / "params.json").read_text())["environment"]["world_size"] == 1


def test_kill_9_of_one_process_leaves_a_checkpoint_that_resumes(straight: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    processes = _start(["train", "face", *TINY, "--output-dir", str(out), "--checkpoint-every", "8"], 2)
    wait_for_step(out, 19, processes)
    processes[1].kill()
    results = finish(processes)
    assert results[1][0] == -signal.SIGKILL and results[0][0] != 0  # the survivor does not hang
    assert _state(out)["global_step"] in (16, 24)  # the last complete checkpoint, loadable
    _assert_ok(finish(_start(["resume", str(out), "--quiet"], 2)))
    a, b = _state(straight), _state(out)
    for part in ("student", "teacher"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_koleo_and_the_contrastive_loss_see_the_global_batch_with_its_gradient(tmp_path: Path) -> None:
    """On each of 2 processes, the terms of its half of a batch equal the terms of the whole batch in one process,
    and its features get W times their share of the whole batch's gradient (DDP then averages over the W)."""
    script = tmp_path / "terms.py"
    script.write_text(f"""
import torch
from dinopre.base import distributed
from dinopre.data.dataset import CropBatch
from dinopre.model.regularisers.contrast import Contrast, ProjectionHead
from dinopre.model.regularisers.koleo import KoLeo
from dinopre.model.regularisers.regulariser import StudentGlobals

def terms(cls, images):
    student = StudentGlobals(cls, None, CropBatch(torch.zeros(2 * images, 3, 8, 8), None, torch.arange(images)), 8)
    torch.manual_seed(1)
    contrast = Contrast(1.0, ProjectionHead(16, 32, 8), 0.2)
    return torch.stack([KoLeo(1.0).loss(student), contrast.loss(student)])

torch.manual_seed(0)
whole = torch.randn(2 * 8, 16)  # 2 global views of 8 images, crop-major
with distributed.session("cpu"):
    rank = distributed.rank()
    reference = whole.clone().requires_grad_(True)
    with distributed.local_collectives():
        expected = terms(reference, 8)
    expected.sum().backward()
    rows = [v * 8 + rank * 4 + i for v in range(2) for i in range(4)]  # this process's 4 images, crop-major
    mine = whole[rows].clone().requires_grad_(True)
    got = terms(mine, 4)
    got.sum().backward()
    torch.save({{"got": got.detach(), "expected": expected.detach(), "grad": mine.grad,
                "expected_grad": 2 * reference.grad[rows]}}, r"{tmp_path}/rank%d.pt" % rank)
""")
    port = _free_port()
    processes = [subprocess.Popen([sys.executable, str(script)], env=_rank_env(rank, 2, port, "env"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    _assert_ok(finish(processes))
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.allclose(result["got"], result["expected"], rtol=1e-5), (rank, result["got"], result["expected"])
        assert torch.allclose(result["grad"], result["expected_grad"], rtol=1e-4, atol=1e-6), rank


# KoLeo over the global batch and drop path keyed by sample: the default recipe needs nothing turned off.
DEFAULT_RECIPE = [x for k, v in SETTINGS.items() if k not in ("koleo_weight", "drop_path_rate", "log_interval")
                  for x in (f"--{k.replace('_', '-')}", str(v))]


def _largest_relative_difference(a: dict, b: dict) -> float:
    """max over the student's and the teacher's tensors of max|a - b| / max|a|."""
    return max(float((a[part][k].double() - b[part][k].double()).abs().max() / a[part][k].double().abs().max())
               for part in ("student", "teacher") for k in a[part])


@pytest.mark.slow
def test_the_default_recipe_trains_the_same_run_on_one_and_two_processes(tmp_path: Path) -> None:
    """The same global batch, 48 steps, KoLeo on (auto's 0.1, gathered over the processes). Measured on this
    machine: 1.1e-2 (with every regulariser off: 4.2e-3; KoLeo per process, as before: 0.56)."""
    config = tmp_path / "smaller.toml"
    config.write_text("demo_images = 384\n")  # 24 steps per epoch of 16, 2 epochs
    args = ["train", "face", "--demo", "--quiet", *DEFAULT_RECIPE, "--log-interval", "8", "--config", str(config)]
    _assert_ok(finish(_start([*args, "--output-dir", str(tmp_path / "two")], 2)))
    one = subprocess.run([sys.executable, "-m", "dinopre", *args, "--output-dir", str(tmp_path / "one")],
                         env=_clean_env(), capture_output=True, text=True, timeout=LIMIT)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert a["global_step"] == b["global_step"] == 48
    method = b["config"]["method"]
    assert (method["koleo_weight"], method["regulariser_scope"], b["config"]["model"]["drop_path_scope"]) == \
        (0.1, "global", "sample")
    assert _largest_relative_difference(a, b) < 2e-2
