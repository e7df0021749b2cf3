"""The input side alone, on generated 224 px JPEG crops: start-up, memory per file, worker memory, shards (issue 23).

    python benchmarks/data.py bound                                   # the blank check's size bound, measured
    python benchmarks/data.py make /tmp/dd --files 1000 100000 1000000 --shards 100000
    python benchmarks/data.py startup /tmp/dd/files-1000000           # preview: first scan, then cached index
    python benchmarks/data.py workers /tmp/dd/files-1000000           # data-worker USS over 300 steps
    python benchmarks/data.py throughput /tmp/dd/files-100000 /tmp/dd/shards-100000
    python benchmarks/data.py startup /tmp/dd/files-1000000 --src /path/to/other/checkout/src   # another version

What it measures:
- `startup`: `dinopre preview hands --train-dir DIR` run twice in a fresh process, first with an empty index cache
  (the first scan; with `--cache`, whatever that cache holds) and then from the cached index: wall time, CPU time
  and peak RSS (`ru_maxrss` of the child).
- `workers`: the private memory (USS: Private_Clean + Private_Dirty of /proc/PID/smaps_rollup) of each of 2 data
  workers after its first and after its last batch of `--steps` steps at batch 64, drawing from the run's data
  order (`EpochBatchSampler`) through the run's dataset (`pipeline.build_dataset`: decode, the draws, the uint8
  image sent to the device), with a loader built as the run builds it. Each worker reads its own USS when it has
  collated a batch and sends it with the batch.
- `throughput`: images per CPU-second of decode plus host-side work (the dataset's `__getitem__` and collation
  into batches of 64) in one process with one thread, from a folder and from shards holding the same images,
  page cache warm (a first pass reads everything), best of `--repeats` alternating passes.
- `bound`: the sizes of 224 px JPEGs of flat colours (every quality and chroma subsampling) and of crops of a real
  photograph (matplotlib's sample of Grace Hopper: colour, grayscale and blurred), which set
  `dinopre.data.blank.SCAN_SIZE_BOUND`.

`make` writes 1,000 distinct crops of a real photograph (`{video}_f{index:06d}.jpg`, as the pipeline's extractor
names them) and fills each folder of N files with hard links to them, so 10^6 files cost a directory, not 15 GB;
shards are real tars (a tar cannot hold hard links) of 5,000 members each. `--src` runs the measured commands
with another checkout's `src` on PYTHONPATH, to measure a version before a change beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
SRC = HERE.parent.parent / "src"
SAMPLE = "grace_hopper.jpg"  # ships with matplotlib (mpl-data/sample_data)
UNIQUE = 1000
PER_SHARD = 5000


# ============ generated data ============


def photo() -> Any:
    """The sample photograph as an RGB PIL image."""
    import matplotlib
    from PIL import Image

    return Image.open(Path(matplotlib.get_data_path()) / "sample_data" / SAMPLE).convert("RGB")


def crops(count: int, seed: int = 0, kind: str = "rgb") -> list[Any]:
    """`count` 224 px crops of the photograph: random squares, resized; grayscale or blurred on demand."""
    import numpy as np
    from PIL import Image, ImageFilter, ImageOps

    image, rng, out = photo(), np.random.default_rng(seed), []
    width, height = image.size
    for _ in range(count):
        side = int(rng.integers(40, min(width, height)))
        x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
        crop = image.crop((x, y, x + side, y + side)).resize((224, 224), Image.Resampling.BICUBIC)
        if kind.startswith("gray"):
            crop = ImageOps.grayscale(crop).convert("RGB")
        if kind.endswith("blur4") or kind.endswith("blur8"):
            crop = crop.filter(ImageFilter.GaussianBlur(int(kind[-1])))
        out.append(crop)
    return out


def jpeg(image: Any, quality: int = 90, subsampling: int = 2) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, subsampling=subsampling)
    return buffer.getvalue()


def name(i: int) -> str:
    """The extractor's naming: {video}_f{frame:06d}.jpg, 1,000 frames per video."""
    return f"vid{i // 1000:05d}_f{i % 1000:06d}.jpg"


def make(root: Path, files: list[int], shards: list[int]) -> None:
    """Folders `files-N` of N hard links to UNIQUE distinct crops, and shard sets `shards-N` of N members."""
    unique = root / "unique"
    if not unique.exists():
        unique.mkdir(parents=True)
        for i, crop in enumerate(crops(UNIQUE)):
            (unique / name(i)).write_bytes(jpeg(crop))
    sources = sorted(unique.iterdir())
    contents = [path.read_bytes() for path in sources]
    for count in files:
        folder = root / f"files-{count}"
        if folder.exists():
            continue
        folder.mkdir()
        for i in range(count):
            os.link(sources[i % UNIQUE], folder / name(i))
        print(f"made {folder}", flush=True)  # noqa: T201 - a benchmark script's output is its result
    for count in shards:
        folder = root / f"shards-{count}"
        if folder.exists():
            continue
        folder.mkdir()
        for first in range(0, count, PER_SHARD):
            with tarfile.open(folder / f"crops-{first // PER_SHARD:06d}.tar", "w") as archive:
                for i in range(first, min(count, first + PER_SHARD)):
                    data = contents[i % UNIQUE]  # written as data: `add` would store later links as tar links
                    info = tarfile.TarInfo(name(i))
                    info.size, info.mtime = len(data), int(sources[i % UNIQUE].stat().st_mtime)
                    archive.addfile(info, io.BytesIO(data))
        print(f"made {folder}", flush=True)  # noqa: T201 - a benchmark script's output is its result


# ============ measures (run in a child process with the chosen src) ============


def startup(folder: str, src: Path, cache: Path) -> dict[str, float]:
    """Wall time and peak RSS of one `dinopre preview hands --train-dir FOLDER` in a fresh process."""
    out = Path(tempfile.mkdtemp(prefix="preview-")) / "views.png"
    command = [sys.executable, "-m", "dinopre", "preview", "hands", "--train-dir", folder, "--output", str(out),
               "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(src), "DINOPRE_CACHE_DIR": str(cache), "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if status:
        raise SystemExit(f"preview failed: {child.stderr.read().decode()[-2000:]}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def _uss() -> float:
    """This process's private memory in MiB."""
    fields = {}
    with open("/proc/self/smaps_rollup", encoding="ascii") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":"):
                fields[parts[0][:-1]] = int(parts[1])
    return (fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)) / 1024


def _worker_collate(samples: list) -> tuple:
    from dinopre.data.dataset import collate_crops

    return collate_crops(samples), os.getpid(), _uss()


def workers(folder: str, steps: int, batch: int, num_workers: int) -> dict[str, Any]:
    """USS of each data worker after its first and its last batch (run inside the measured version): the run's
    dataset, sampler, loader and worker lifetime, with a collate function that also reports the worker's USS."""
    import torch

    from dinopre.config.loading import build_config
    from dinopre.data.dataset import EpochBatchSampler, build_loader
    from dinopre.data.pipeline import build_dataset, build_source, worker_processes

    torch.set_num_threads(1)
    config = build_config("hands", cli_settings={"train_dir": [folder], "batch_size": batch})
    data = build_source(config)
    dataset, _ = build_dataset(config, data.source)
    epochs = -(-steps // (len(data.source) // batch))  # the whole of 10^6 files, or as many epochs as it takes
    sampler = EpochBatchSampler(len(data.source), batch, config.run.seed, 0, epochs)
    loader = build_loader(dataset, sampler, num_workers, pin_memory=False)
    loader.collate_fn = _worker_collate  # the measuring hook; everything else as the run builds it
    seen: dict[int, list[float]] = {}
    started = time.perf_counter()
    with worker_processes(loader) as batches:
        for step in range(steps):
            _, pid, uss = next(batches)
            seen.setdefault(pid, []).append(uss)
    return {"images": len(data.source), "steps": steps, "seconds": time.perf_counter() - started,
            "main_rss_mib": _rss(), "workers": [{"pid": pid, "first_mib": values[0], "last_mib": values[-1],
                                                 "batches": len(values), "every_10": values[::10]}
                                                for pid, values in sorted(seen.items())]}


def _rss() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def throughput(folder: str, shards: str, images: int, repeats: int) -> dict[str, Any]:
    """Images per CPU-second from a folder and from shards of the same images."""
    import torch

    from dinopre.config.loading import build_config
    from dinopre.data.dataset import collate_crops
    from dinopre.data.pipeline import build_dataset, build_source

    torch.set_num_threads(1)
    datasets = {}
    for kind, root in (("folders", folder), ("shards", shards)):
        config = build_config("hands", cli_settings={"train_dir": [root]})
        datasets[kind] = build_dataset(config, build_source(config).source)[0]

    def one_pass(dataset: Any) -> float:
        started = time.process_time()
        for first in range(0, images, 64):
            collate_crops([dataset[(0, i)] for i in range(first, min(images, first + 64))])
        return images / (time.process_time() - started)

    for dataset in datasets.values():  # warm the page cache
        one_pass(dataset)
    rates: dict[str, list[float]] = {kind: [] for kind in datasets}
    for _ in range(repeats):
        for kind, dataset in datasets.items():
            rates[kind].append(one_pass(dataset))
    best = {kind: max(values) for kind, values in rates.items()}
    return {"images": images, "per_cpu_second": rates, "best": best, "ratio": best["shards"] / best["folders"]}


# ============ the blank bound ============


def bound() -> dict[str, Any]:
    """Sizes of flat 224 px JPEGs and of real-looking crops (min, 1st percentile, median)."""
    import numpy as np
    from PIL import Image

    flat = {}
    for mode, colours in (("RGB", [(0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 30, 60)]),
                          ("L", [0, 128, 255])):
        sizes = [len(jpeg(Image.new(mode, (224, 224), colour), quality, subsampling))
                 for colour in colours for quality in (50, 75, 90, 95, 100) for subsampling in (0, 2)]
        flat[mode] = (min(sizes), max(sizes))
    buffer = io.BytesIO()
    Image.new("RGB", (224, 224)).save(buffer, "PNG")
    flat["PNG"] = (len(buffer.getvalue()),) * 2
    real = {}
    for kind in ("rgb", "gray", "gray_blur4", "rgb_blur8"):
        images = crops(200, seed=1, kind=kind)
        for quality in (75, 95):
            sizes = np.array([len(jpeg(image, quality)) for image in images])
            real[f"{kind} q{quality}"] = (int(sizes.min()), float(np.percentile(sizes, 1)), float(np.median(sizes)))
    return {"flat_min_max": flat, "real_min_p1_median": real}


# ============ driver ============


def _child(args: list[str], src: Path, cache: Path) -> Any:
    """Run this script's measure in a process with `src` first on the path and `cache` as the index cache; its
    JSON result."""
    env = {**os.environ, "DINOPRE_CACHE_DIR": str(cache), "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run([sys.executable, str(HERE), *args], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["bound", "make", "startup", "workers", "throughput", "_workers",
                                         "_throughput"])
    parser.add_argument("paths", nargs="*")
    parser.add_argument("--files", type=int, nargs="*", default=[])
    parser.add_argument("--shards", type=int, nargs="*", default=[])
    parser.add_argument("--src", type=Path, default=SRC, help="the `src` folder of the dinopre to measure")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--cache", type=Path, help="the index cache to use (default: a new, empty one)")
    args = parser.parse_args()
    if args.what == "make":
        make(Path(args.paths[0]), args.files, args.shards)
        return
    if args.what == "_workers":
        print(json.dumps(workers(args.paths[0], args.steps, args.batch, args.workers)))  # noqa: T201
        return
    if args.what == "_throughput":
        print(json.dumps(throughput(args.paths[0], args.paths[1], args.images, args.repeats)))  # noqa: T201
        return
    result: dict[str, Any] = {"what": args.what, "src": str(args.src), "paths": args.paths}
    cache = args.cache or Path(tempfile.mkdtemp(prefix="dinopre-bench-cache-"))
    if args.what == "bound":
        result.update(bound())
    elif args.what == "startup":
        result["first"] = startup(args.paths[0], args.src, cache)
        result["cached"] = startup(args.paths[0], args.src, cache)
    elif args.what == "workers":
        result.update(_child(["_workers", args.paths[0], "--steps", str(args.steps), "--batch", str(args.batch),
                              "--workers", str(args.workers)], args.src, cache))
    else:
        result.update(_child(["_throughput", *args.paths[:2], "--images", str(args.images), "--repeats",
                              str(args.repeats)], args.src, cache))
    print(json.dumps(result, indent=2))  # noqa: T201 - a benchmark script's output is its result
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
