"""Throughput harness for dinopre: three fixed workloads (W1, W2, C1, below) on synthetic JPEG folders.

    python benchmarks/bench.py W1 --steps 50 --warmup 10 --json w1.json
    python benchmarks/bench.py C1 --device cpu
    python benchmarks/bench.py W1 --set batch_size=64 --set num_local_crops=6     # any size on the command line
    python benchmarks/bench.py W1 --processes 8  # 8 processes (torchrun --standalone), --set batch_size is global

Workloads (same data and settings for every system compared):
- W1: ViT-S/16, DINO, 2 x 224 + 8 x 96 crops, K = 65536, batch 128, bf16 on CUDA.
- W2: ViT-S/16, iBOT, 2 x 224 + 8 x 96, shared head K = 8192, half the views masked at ratio 0.1-0.5.
- C1: CPU, ViT embed 192, depth 6, heads 3, patch 16, 112 px globals, 4 x 48 px locals, batch 32.

It runs the real training step (`dinopre.train.step.train_step`) on the real data pipeline (JPEG decoding and
augmentation in DataLoader workers), `--warmup` steps first, then measures:
- end to end: images/s over `--steps` steps and the share of that time spent waiting for data;
- a breakdown over `--breakdown-steps` further steps, synchronising the device at each phase boundary: data
  (waiting for the workers, and the copy to the device), augment (rendering the views on the device, with
  the default; 0 with `--set augment_on=workers`, when the workers render them), forward (with losses),
  backward, optimizer (clipping + AdamW), teacher update (EMA);
- peak memory: `torch.cuda.max_memory_allocated` on CUDA, the process's peak resident set size on CPU;
- model FLOP utilisation: analytic FLOPs per image (below) x images/s / the device's peak (`--peak-tflops`, known
  for H100/H200: 989 dense bf16 TFLOP/s; not reported on CPU unless given).

Analytic FLOPs (multiply-accumulate = 2 FLOPs; norms, softmax, GELU and the optimizer are ignored, as is usual for
MFU). For a ViT of width D, depth L, MLP width H, patch P on a view of n = (S / P)^2 + 1 tokens:
    patch embedding 2 (n - 1) D 3 P^2
    per block       2 n (4 D^2 + 2 D H) + 4 n^2 D        (qkv + proj + MLP, then QK^T and AV)
A DINO head on R rows: 2 R (D Hh + Hh^2 + Hh B + B K) for hidden Hh, bottleneck B, K prototypes.
Per image: the student backbone and head on every view count 3x (forward + backward = 2x forward), the teacher's
on the 2 global views 1x; for iBOT the student patch head runs on the expected number of masked tokens and the
teacher's on every patch token.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import _checkout  # noqa: F401  (first: puts the checkout's src/ on sys.path when dinopre is not installed)
import torch

from dinopre.base import distributed
from dinopre.config.loading import build_config
from dinopre.config.settings import PretrainConfig
from dinopre.data.dataset import EpochBatchSampler, ImageSource, RawBatch
from dinopre.data.demo import write_synthetic_folder
from dinopre.data.pipeline import augments_on_device, build_data_loader
from dinopre.train.build import RunParts, build_run
from dinopre.train.runtime import Runtime, device_type, share_cpus
from dinopre.train.step import train_step

# The reference recipe: the official code's head (2048-wide MLP) and drop path, whatever the auto recipe derives.
WORKLOADS: dict[str, dict[str, Any]] = {
    "W1": {"image_size": 224, "local_crop_size": 96, "num_local_crops": 8, "out_dim": 65536, "batch_size": 128,
           "algorithm": "dino", "recipe": "reference"},
    "W2": {"image_size": 224, "local_crop_size": 96, "num_local_crops": 8, "out_dim": 8192, "batch_size": 128,
           "algorithm": "ibot", "shared_head": True, "mask_probability": 0.5, "patch_mask_ratio": (0.1, 0.5),
           "recipe": "reference"},
    "C1": {"image_size": 112, "local_crop_size": 48, "num_local_crops": 4, "vit_embed_dim": 192, "vit_depth": 6,
           "vit_num_heads": 3, "patch_size": 16, "batch_size": 32, "algorithm": "dino", "recipe": "reference"},
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak (NVIDIA data sheets, SXM)
PHASES = ("data", "augment", "forward", "backward", "optimizer", "teacher")


def vit_flops(config: PretrainConfig, size: int) -> float:
    """Forward FLOPs of the backbone on one view of `size` pixels."""
    m = config.model
    d, p, hidden = m.vit_embed_dim, m.patch_size, int(m.vit_embed_dim * m.vit_mlp_ratio)
    n = (size // p) ** 2 + 1
    per_block = 2 * n * (4 * d * d + 2 * d * hidden) + 4 * n * n * d
    return 2 * (n - 1) * d * 3 * p * p + m.vit_depth * per_block


def head_flops(config: PretrainConfig, rows: float, out_dim: int) -> float:
    """Forward FLOPs of a DINO head on `rows` rows."""
    m = config.model
    d, hh, b = m.vit_embed_dim, m.head_hidden_dim, m.head_bottleneck_dim
    return 2 * rows * (d * hh + hh * hh + hh * b + b * out_dim)


def flops_per_image(config: PretrainConfig) -> float:
    """Training FLOPs per image of a configuration (see the module docstring)."""
    m, d = config.model, config.data
    views = 2 + d.num_local_crops
    student = 2 * vit_flops(config, m.image_size) + d.num_local_crops * vit_flops(config, d.local_crop_size)
    student += head_flops(config, views, m.out_dim)
    teacher = 2 * vit_flops(config, m.image_size) + head_flops(config, 2, m.out_dim)
    if config.method.algorithm == "ibot":
        patches = (m.image_size // m.patch_size) ** 2
        low, high = config.method.patch_mask_ratio
        masked = 2 * patches * config.method.mask_probability * (low + high) / 2
        student += head_flops(config, masked, config.resolved_patch_out_dim)
        teacher += head_flops(config, 2 * patches, config.resolved_patch_out_dim)
    return 3 * student + teacher


def synthetic_folder(root: Path, count: int, size: int) -> Path:
    """A folder of `count` synthetic face JPEGs of `size` pixels, made once and reused."""
    folder = root / f"faces_{size}px_{count}"
    if len(list(folder.glob("*.jpg"))) < count:
        write_synthetic_folder(folder, "face", count, size=size)
    return folder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Workload(NamedTuple):
    """A workload made ready to run: its settings, the run built from them (`dinopre.train.build.build_run`, as
    training builds it) and a sampler."""

    settings: dict[str, Any]
    parts: RunParts
    sampler: EpochBatchSampler

    @property
    def config(self) -> PretrainConfig:
        return self.parts.config

    @property
    def runtime(self) -> Runtime:
        return self.parts.runtime

    @property
    def source(self) -> ImageSource:
        return self.parts.data.source

    @property
    def workers(self) -> int:
        return self.parts.num_workers


def _prepare(name: str, overrides: dict[str, Any], *, images: int, data_root: Path, device: str,
             steps: int) -> _Workload:
    """Settings, a synthetic JPEG folder of `images` crops, and a sampler covering `steps` batches."""
    settings = {**WORKLOADS[name], **overrides, "device": device, "output_dir": str(data_root / "unused")}
    size = 256 if settings.get("image_size", 224) > 128 else 128
    settings["train_dir"] = [str(synthetic_folder(data_root, images, size))]
    parts = build_run(build_config("face", cli_settings=settings))
    config = parts.config
    sampler = EpochBatchSampler(len(parts.data.source), config.optim.batch_size, config.run.seed, 0,
                                -(-steps // parts.steps_per_epoch), 0, distributed.rank(), parts.world_size)
    return _Workload(settings, parts, sampler)


def data_throughput(name: str, overrides: dict[str, Any], *, steps: int, warmup: int, images: int,
                    data_root: Path, device: str) -> dict[str, Any]:
    """How fast the data loader alone delivers a workload's batches (no model): what the workers can feed.

    With the views rendered on the device (the default), the workers decode and draw and the rendering is timed
    separately on `device`; with `--set augment_on=workers` they render every view themselves.
    """
    w = _prepare(name, overrides, images=images, data_root=data_root, device=device, steps=warmup + steps)
    config, runtime = w.config, w.runtime
    loader, render = build_data_loader(config, w.source, runtime.device, w.sampler, w.workers)
    batches = iter(loader)
    for _ in range(warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(batches).to(runtime.device)
    _sync(runtime.device)
    elapsed = time.perf_counter() - start
    render_seconds = 0.0
    if isinstance(batch, RawBatch) and render is not None:  # timed apart, so the workers' rate stays their own
        batch.render(render)
        _sync(runtime.device)
        begin = time.perf_counter()
        for _ in range(steps):
            batch.render(render)
        _sync(runtime.device)
        render_seconds = time.perf_counter() - begin
    count = steps * config.optim.batch_size
    return {
        "workload": name,
        "mode": "data only",
        "device": torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else "cpu",
        "augment_on": "device" if augments_on_device(config) else "workers",
        "num_workers": w.workers,
        "images_per_sec_loader": count / max(elapsed, 1e-9),
        "images_per_sec_per_worker": count / max(elapsed, 1e-9) / max(w.workers, 1),
        "render_ms_per_batch": 1000 * render_seconds / steps,
        "steps": steps,
    }


def run_workload(name: str, overrides: dict[str, Any], *, steps: int, warmup: int, breakdown_steps: int,
                 images: int, data_root: Path, device: str, peak_tflops: float | None) -> dict[str, Any]:
    """Run one workload and return its measurements."""
    w = _prepare(name, overrides, images=images, data_root=data_root, device=device,
                 steps=warmup + steps + breakdown_steps)
    config, runtime, settings, workers = w.config, w.runtime, w.settings, w.workers
    method, optimizer, schedules = w.parts.method.train(), w.parts.optimizer, w.parts.schedules
    share_cpus(runtime, distributed.local_world_size())
    loader, render = build_data_loader(config, w.source, runtime.device, w.sampler, workers)
    batches = iter(loader)
    state = {"step": 0}

    def step(on_phase: Any = None) -> float:
        wait = time.perf_counter()
        batch = next(batches).to(runtime.device)
        waited = time.perf_counter() - wait
        if on_phase is not None:
            _sync(runtime.device)
            on_phase("data")
        if isinstance(batch, RawBatch) and render is not None:
            batch = batch.render(render)
            if on_phase is not None:
                _sync(runtime.device)
                on_phase("augment")
        train_step(method, optimizer, batch, schedules.at(state["step"]), runtime=runtime,
                   clip_grad_norm=config.optim.clip_grad_norm, freeze_last_layer=False, on_phase=on_phase,
                   model=w.parts.model)
        state["step"] += 1
        return waited

    for _ in range(warmup):
        step()
    _sync(runtime.device)
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    start = time.perf_counter()
    data_wait = sum(step() for _ in range(steps))
    _sync(runtime.device)
    elapsed = time.perf_counter() - start
    breakdown = _breakdown(step, runtime.device, breakdown_steps)
    images_per_sec = steps * config.optim.batch_size / elapsed  # the global batch: all processes together
    flops = flops_per_image(config)
    peak = peak_tflops or _known_peak(runtime.device)
    return {
        "workload": name,
        "device": torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "precision": runtime.precision_name,
        "num_workers": workers,
        "processes": w.parts.world_size,
        "augment_on": "device" if augments_on_device(config) else "workers",
        "torch_threads": torch.get_num_threads(),
        "settings": {k: v for k, v in settings.items() if k not in ("train_dir", "output_dir")},
        "steps": steps,
        "images_per_sec": images_per_sec,
        "data_wait_share": data_wait / elapsed,
        "step_breakdown_ms": breakdown,
        "peak_memory_gib": _peak_memory(runtime.device),
        "gflop_per_image": flops / 1e9,
        "mfu": flops * images_per_sec / (peak * 1e12) if peak else None,
        "peak_tflops": peak,
    }


def _breakdown(step: Any, device: torch.device, count: int) -> dict[str, float]:
    """Mean milliseconds per phase over `count` steps, synchronising the device at every phase boundary."""
    totals = dict.fromkeys(PHASES, 0.0)
    for _ in range(count):
        last = [time.perf_counter()]

        def on_phase(phase: str) -> None:
            _sync(device)
            now = time.perf_counter()
            totals[phase] += now - last[0]
            last[0] = now

        step(on_phase)
    return {phase: 1000 * total / max(count, 1) for phase, total in totals.items()}


def _peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _known_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        overrides[key] = tuple(value) if isinstance(value, list) else value
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("workload", choices=sorted(WORKLOADS), help="W1 / W2: ViT-S/16 DINO / iBOT; C1: small ViT, CPU")
    parser.add_argument("--steps", type=int, default=30, help="measured steps (end to end)")
    parser.add_argument("--warmup", type=int, default=5, help="steps before measuring")
    parser.add_argument("--breakdown-steps", type=int, default=5, help="extra steps timed phase by phase")
    parser.add_argument("--images", type=int, default=2048, help="synthetic JPEGs in the folder")
    parser.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parent / ".data",
                        help="where the synthetic folders are made (reused between runs)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:INDEX")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (known for H100/H200)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, e.g. --set batch_size=64 --set global_crop_scale=[0.3,1]")
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this file")
    parser.add_argument("--processes", type=int, default=1,
                        help="training processes on this machine (started with torchrun --standalone; one GPU each)")
    parser.add_argument("--data-only", action="store_true",
                        help="time the data loader alone (images/s the workers deliver, and the device rendering)")
    args = parser.parse_args(argv)
    if args.processes > 1 and distributed.detect() is None:
        return _relaunch(args, list(sys.argv[1:] if argv is None else argv))
    if args.data_only:
        result = data_throughput(args.workload, _parse_overrides(args.overrides), steps=args.steps,
                                 warmup=args.warmup, images=args.images, data_root=args.data_root, device=args.device)
        text = json.dumps(result, indent=2)
        print(text)  # noqa: T201 - a benchmark script's output is its result
        if args.json is not None:
            args.json.write_text(text + "\n")
        return 0
    with distributed.session(device_type(args.device)):
        result = run_workload(args.workload, _parse_overrides(args.overrides), steps=args.steps, warmup=args.warmup,
                              breakdown_steps=args.breakdown_steps, images=args.images, data_root=args.data_root,
                              device=args.device, peak_tflops=args.peak_tflops)
        if not distributed.is_main():
            return 0
    text = json.dumps(result, indent=2)
    print(text)  # noqa: T201 - a benchmark script's output is its result
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0


def _relaunch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run this benchmark in `--processes` processes under torchrun (the same launcher users train with); the synthetic
    folder is made first, once."""
    settings = {**WORKLOADS[args.workload], **_parse_overrides(args.overrides)}
    synthetic_folder(args.data_root, args.images, 256 if settings.get("image_size", 224) > 128 else 128)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.processes}",
               str(Path(__file__).resolve()), *argv]
    os.execv(sys.executable, command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
