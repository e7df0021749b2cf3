"""The data pipeline of a run: from a configuration to batches of views on the training device.

Images come from a folder scan (cached, with progress) or the built-in demo set; one DataLoader serves the whole
run; the views are rendered on the device in whole batches (`dinopre.data.batch_augment`, the default) or, with
`--augment-on workers`, image by image in its workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dinopre.base.errors import DataError
from dinopre.base.events import Reporter, ScanProgress
from dinopre.config.settings import PretrainConfig
from dinopre.data.augment import ColorJitterSettings, MultiCropAugmentation
from dinopre.data.batch_augment import BatchAugmentation, source_cap
from dinopre.data.blank import BLANK_FILES
from dinopre.data.dataset import (
    CropBatch,
    EpochBatchSampler,
    ImageSource,
    MultiCropDataset,
    RawBatch,
    SyntheticSource,
    build_loader,
)
from dinopre.data.fingerprint import digests
from dinopre.data.masking import MaskSampler
from dinopre.data.scan import ScanResult, scan_roots
from dinopre.data.sources import BlankFiles, IndexSource, JoinedSource, split_blank


def build_augmentation(config: PretrainConfig) -> MultiCropAugmentation:
    """The multi-crop augmentation of a configuration."""
    d = config.data
    return MultiCropAugmentation(
        global_size=config.model.image_size,
        local_size=d.local_crop_size,
        num_local_crops=d.num_local_crops,
        global_scale=d.global_crop_scale,
        local_scale=d.local_crop_scale,
        flip_prob=d.flip_prob,
        jitter=ColorJitterSettings(d.brightness, d.contrast, d.saturation, d.hue, d.jitter_prob),
        grayscale_prob=d.grayscale_prob,
        blur_sigma=d.blur_sigma,
    )


def build_mask_sampler(config: PretrainConfig) -> MaskSampler | None:
    """iBOT's mask generator for the global views; None for DINO."""
    m = config.method
    if m.algorithm != "ibot":
        return None
    return MaskSampler(config.model.image_size // config.model.patch_size, m.mask_probability,
                       m.patch_mask_ratio, m.mask_shape)


def augments_on_device(config: PretrainConfig) -> bool:
    """Whether the views are rendered on the training device (`--augment-on device`, the default, on a CPU too:
    see config.AUGMENT_PLACES) rather than in the workers."""
    return config.data.augment_on == "device"


def build_data_loader(config: PretrainConfig, source: ImageSource, device: torch.device, sampler: EpochBatchSampler,
                      num_workers: int) -> tuple[torch.utils.data.DataLoader, BatchAugmentation | None]:
    """The run's one loader (workers are never respawned) and, when the views are rendered on the device, the
    renderer its `RawBatch`es need (None when the workers render them)."""
    dataset, render = build_dataset(config, source)
    return build_loader(dataset, sampler, num_workers, pin_memory=device.type == "cuda"), render


def build_dataset(config: PretrainConfig, source: ImageSource) -> tuple[MultiCropDataset, BatchAugmentation | None]:
    """The run's multi-crop dataset and, when the views are rendered on the device, its renderer (else None)."""
    augmentation = build_augmentation(config)
    render = BatchAugmentation(augmentation) if augments_on_device(config) else None
    dataset = MultiCropDataset(source, augmentation, config.run.seed, build_mask_sampler(config),
                               source_cap(config.model.image_size) if render is not None else None)
    return dataset, render


def device_batches(batches: Iterable[CropBatch | RawBatch], device: torch.device,
                   render: BatchAugmentation | None) -> Iterator[CropBatch]:
    """The loader's batches on `device` (copied without blocking from pinned memory), views rendered."""
    for batch in batches:
        moved = batch.to(device)
        yield moved.render(render) if isinstance(moved, RawBatch) and render is not None else moved


# How long the workers get to finish on their own when a run ends normally, before they are killed.
WORKER_GRACE_SECONDS = 5.0


@contextlib.contextmanager
def worker_processes(loader: torch.utils.data.DataLoader) -> Iterator[Iterator[CropBatch | RawBatch]]:
    """Iterate a loader and make sure its worker processes are gone when the block is left, however it is left.

    The one rule of the workers' lifetime: they end with the block. On a normal exit they are asked to stop (and
    killed if they have not after `WORKER_GRACE_SECONDS`); when the block raises, they are killed at once. Workers
    ignore SIGINT and SIGTERM (the trainer stops them after saving), so PyTorch's own clean-up, which relies on
    SIGTERM, would otherwise wait forever at exit for a worker that is stuck, e.g. reading a FIFO.
    """
    iterator = iter(loader)
    try:
        yield iterator
    except BaseException:
        _kill_workers(iterator)
        raise
    finally:
        _stop_workers(iterator)


def _workers(iterator: object) -> list:
    return list(getattr(iterator, "_workers", []))


def _kill_workers(iterator: object) -> None:
    _unwatch_workers(iterator)
    for worker in _workers(iterator):
        if worker.is_alive():
            worker.kill()
    for worker in _workers(iterator):
        worker.join(timeout=WORKER_GRACE_SECONDS)


def _unwatch_workers(iterator: object) -> None:
    # PyTorch's SIGCHLD handler raises "DataLoader worker ... is killed by signal" for any registered worker that
    # dies; a worker we kill on purpose must leave that registry first, as the loader's own _shutdown_workers does.
    if getattr(iterator, "_worker_pids_set", False):
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(iterator))
        iterator._worker_pids_set = False  # type: ignore[attr-defined]


def _stop_workers(iterator: object) -> None:
    deadline = time.monotonic() + WORKER_GRACE_SECONDS
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()  # asks them to stop; waits for each a limited time
    for worker in _workers(iterator):
        worker.join(timeout=max(0.0, deadline - time.monotonic()))
    _kill_workers(iterator)


@dataclass(frozen=True)
class DataFingerprint:
    """What a resume checks of the training images: which files (by their path under their --train-dir, so a
    folder given as a relative or an absolute path, or moved, is the same data), their sizes and modification
    times."""

    count: int
    names: str
    sizes: str
    mtimes: str
    legacy: str = ""  # the hash checkpoints of dinopre 0.1 hold: the paths as given
    roots: tuple[str, ...] = ()  # the --train-dir folders as absolute paths

    def to_state(self) -> dict[str, Any]:
        return {"version": 2, "count": self.count, "names": self.names, "sizes": self.sizes, "mtimes": self.mtimes,
                "roots": list(self.roots)}

    def change(self, saved: dict[str, Any]) -> tuple[str | None, str | None]:
        """(why a resume must be refused, what to warn about) comparing with a checkpoint's fingerprint."""
        if saved.get("version") != 2:  # a checkpoint of dinopre 0.1
            return (None, None) if saved.get("fingerprint") == self.legacy else (_changed_files(None, self.count), None)
        if saved.get("names") != self.names or saved.get("count") != self.count:
            return _changed_files(saved.get("count"), self.count), None
        if saved.get("sizes") != self.sizes:
            return (f"The same {self.count} files are there but some have another size since the checkpoint: they were "
                    "rewritten, and the resumed run would train on other images than it started with; restore them "
                    "or start a new run.", None)
        if saved.get("mtimes") != self.mtimes:
            return None, ("Some training images have other modification times than when the run started (same names "
                          "and sizes); if their contents changed, the run continues on the new contents.")
        return None, None


def _changed_files(before: int | None, now: int) -> str:
    counts = f" ({before} files then, {now} now)" if before is not None and before != now else ""
    return (f"The training images changed since the checkpoint: files were added, removed or renamed{counts}, so the "
            "data order would differ; restore the folder or start a new run.")


def fingerprint(roots: tuple[str, ...], scan: ScanResult) -> DataFingerprint:
    """The fingerprint of the files a run trains on (paths relative to the root each was found under)."""
    parts = [(root.index, root.shard_names if root.kind == "shards" else None) for root in scan.roots]
    names, sizes, mtimes, legacy = digests(parts, roots)
    return DataFingerprint(scan.count, names, sizes, mtimes, legacy, absolute_roots(roots))


def absolute_roots(roots: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Training folders as absolute paths (links kept), to tell the same folder given two ways."""
    return tuple(os.path.abspath(os.path.expanduser(root)) for root in roots)


@dataclass(frozen=True)
class DataSource:
    """The images of a run and what the scan found out about them."""

    source: ImageSource
    description: str
    digest: Callable[[], DataFingerprint]  # computed when first asked for: `dinopre preview` never needs it
    warnings: tuple[str, ...] = ()
    blank: BlankFiles = BlankFiles()  # the blank crops left out

    @functools.cached_property
    def fingerprint(self) -> DataFingerprint:
        """What a resume checks: a changed folder or shard set is refused."""
        return self.digest()


def build_source(config: PretrainConfig, reporter: Reporter | None = None, *, use_cache: bool = True) -> DataSource:
    """The images of a run: the demo's synthetic crops, or a scan of the training folders (with progress).

    Args:
        config: the run's configuration.
        reporter: receives the scan's progress.
        use_cache: read the cached file index (a resume lists the folders afresh, to see rewritten files).
    """
    if config.data.demo and not config.data.train_dir:
        source = SyntheticSource(config.preset, config.data.demo_images)
        name = f"synthetic:{config.preset}:{len(source)}"
        synthetic = DataFingerprint(len(source), name, "", "", hashlib.sha256(name.encode()).hexdigest())
        return DataSource(source, f"{len(source)} built-in synthetic {config.preset} crops (--demo)",
                          lambda: synthetic)

    def progress(found: int) -> None:
        if reporter is not None:
            reporter.emit(ScanProgress(found, done=False))

    scan = scan_roots(config.data.train_dir, progress, use_cache=use_cache)
    if reporter is not None:
        reporter.emit(ScanProgress(scan.count, done=True))
    if scan.unreadable_dirs and config.data.strict_data:
        folder, reason = scan.unreadable_dirs[0]
        raise DataError(f"Folder '{shown_path(folder)}' cannot be read ({reason}); fix its permissions or drop "
                        "--strict-data.")
    kept, blank = _split(scan, config.data.keep_blank)
    source = _source_of(kept, config.data.keep_blank)
    if not len(source):
        raise DataError(f"Every image under {_listed(config.data.train_dir)} is a blank crop (one flat colour); "
                        "there is nothing to train on (--keep-blank trains on them anyway).")
    return DataSource(source, _description(config, scan, len(source), len(blank)),
                      lambda: fingerprint(config.data.train_dir, kept), _scan_warnings(scan, blank), blank)


def _split(scan: ScanResult, keep_blank: bool) -> tuple[ScanResult, BlankFiles]:
    """The scan with its blank crops left out (unless kept), and those left out."""
    kept, blank = [], []
    for root in scan.roots:
        train, flat = split_blank(root.index, keep_blank)
        kept.append(dataclasses.replace(root, index=train))
        blank.append(flat)
    return dataclasses.replace(scan, roots=kept), BlankFiles(tuple(index for index in blank if len(index)))


def _source_of(scan: ScanResult, keep_blank: bool) -> ImageSource:
    parts = [IndexSource(root.index, shards=root.kind == "shards", keep_blank=keep_blank) for root in scan.roots]
    return parts[0] if len(parts) == 1 else JoinedSource(parts)


def _listed(roots: tuple[str, ...]) -> str:
    return ", ".join(f"'{shown_path(root)}'" for root in roots)


def _scan_warnings(scan: ScanResult, blank: BlankFiles) -> tuple[str, ...]:
    warnings = [f"Folder '{shown_path(folder)}' could not be read ({reason}); its images are left out."
                for folder, reason in scan.unreadable_dirs]
    if scan.skipped_files:
        path, reason = scan.skipped_files[0]
        warnings.append(f"{len(scan.skipped_files)} file(s) named like images are not regular files and are left out "
                        f"(e.g. '{shown_path(path)}': {reason}).")
    if scan.shard_problems:
        where, reason = scan.shard_problems[0]
        warnings.append(f"{len(scan.shard_problems)} tar member(s) or shard(s) cannot be used and are left out, "
                        f"nothing extracted (e.g. '{shown_path(where)}': {reason}).")
    if len(blank):
        example = next(iter(blank))[0]
        warnings.append(f"{len(blank)} blank crop(s) (one flat colour, e.g. '{example}') are left out and listed in "
                        f"{BLANK_FILES}; --keep-blank trains on them.")
    return tuple(warnings)


def _description(config: PretrainConfig, scan: ScanResult, count: int, blank: int) -> str:
    cached = " (file index from cache)" if scan.cached_roots == len(config.data.train_dir) else ""
    linked = f", {scan.linked_dirs} linked folder(s) followed" if scan.linked_dirs else ""
    left_out = f", {blank} blank crop(s) left out" if blank else ""
    shards = sum(len(root.shard_names) for root in scan.roots)
    in_shards = f" in {shards} shard(s)" if shards else ""
    roots = ", ".join(shown_path(root) for root in config.data.train_dir)
    return f"{count} images{in_shards} under {roots}{linked}{left_out}{cached}"


def shown_path(path: str | Path) -> str:
    """A path as it can be printed: bytes that are not valid UTF-8 in its name become U+FFFD."""
    return os.fsencode(path).decode("utf-8", errors="replace")
