"""The data pipeline of a run: from a configuration to batches of views on the training device.

Images come from a folder scan (cached, with progress) or the built-in demo set; one DataLoader serves the whole
run; the views are rendered on the device in whole batches (`dinopre.batch_augment`, the default) or, with
`--augment-on workers`, image by image in its workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dinopre.augment import ColorJitterSettings, MultiCropAugmentation
from dinopre.batch_augment import BatchAugmentation, source_cap
from dinopre.config import PretrainConfig
from dinopre.data import (
    CropBatch,
    EpochBatchSampler,
    FolderSource,
    ImageSource,
    MultiCropDataset,
    RawBatch,
    SyntheticSource,
    build_loader,
)
from dinopre.errors import DataError
from dinopre.events import Reporter, ScanProgress
from dinopre.masking import MaskSampler
from dinopre.scan import scan_roots


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
    augmentation = build_augmentation(config)
    render = BatchAugmentation(augmentation) if augments_on_device(config) else None
    dataset = MultiCropDataset(source, augmentation, config.run.seed, build_mask_sampler(config),
                               source_cap(config.model.image_size) if render is not None else None)
    return build_loader(dataset, sampler, num_workers, pin_memory=device.type == "cuda"), render


def device_batches(loader: torch.utils.data.DataLoader, device: torch.device,
                   render: BatchAugmentation | None) -> Iterator[CropBatch]:
    """The loader's batches on `device` (copied without blocking from pinned memory), views rendered."""
    for batch in loader:
        moved = batch.to(device)
        yield moved.render(render) if isinstance(moved, RawBatch) and render is not None else moved


@dataclass(frozen=True)
class DataSource:
    """The images of a run and what the scan found out about them."""

    source: ImageSource
    description: str
    fingerprint: str  # of the file list: a resume refuses a changed folder
    warnings: tuple[str, ...] = ()


def build_source(config: PretrainConfig, reporter: Reporter | None = None) -> DataSource:
    """The images of a run: the demo's synthetic crops, or a scan of the training folders (with progress)."""
    if config.data.demo and not config.data.train_dir:
        source = SyntheticSource(config.preset, config.data.demo_images)
        return DataSource(source, f"{len(source)} built-in synthetic {config.preset} crops (--demo)",
                          f"synthetic:{config.preset}:{len(source)}")

    def progress(found: int) -> None:
        if reporter is not None:
            reporter.emit(ScanProgress(found, done=False))

    scan = scan_roots(config.data.train_dir, progress)
    if reporter is not None:
        reporter.emit(ScanProgress(len(scan.files), done=True))
    if scan.unreadable_dirs and config.data.strict_data:
        folder, reason = scan.unreadable_dirs[0]
        raise DataError(f"Folder '{folder}' cannot be read ({reason}); fix its permissions or drop --strict-data.")
    warnings = tuple(f"Folder '{folder}' could not be read ({reason}); its images are left out."
                     for folder, reason in scan.unreadable_dirs)
    fingerprint = hashlib.sha256("\n".join(map(str, scan.files)).encode()).hexdigest()
    cached = " (file index from cache)" if scan.cached_roots == len(config.data.train_dir) else ""
    description = f"{len(scan.files)} images under {', '.join(config.data.train_dir)}{cached}"
    return DataSource(FolderSource(tuple(scan.files)), description, fingerprint, warnings)
