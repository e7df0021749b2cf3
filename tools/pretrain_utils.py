"""Data loader and multi-crop transform builders of the original tool, kept for backwards compatibility.

Old code imported these helpers from `tools/pretrain_utils.py` (the DataLoader and the DINO/iBOT multi-crop
transforms, without torchvision). They are now thin wrappers over the package modules, which new code should use
directly:

- `dinopre.data.augment.MultiCropAugmentation`: the multi-crop transform (PIL + torch only);
- `dinopre.data.dataset`: folder scanning (`scan_image_files`, `SUPPORTED_EXTENSIONS`), `MultiCropDataset`,
  `EpochBatchSampler`, `build_loader` and the crop-major `CropBatch`.

Usage from old code (tools/ is not a package)::

    sys.path.insert(0, "tools")
    from pretrain_utils import build_dataloader
    for batch in build_dataloader(["data/rois/face"], batch_size=64):
        batch.global_crops  # (2*B, 3, 112, 112), crop-major
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

# Old code imports this file from a plain checkout (tools/ on its sys.path): _checkout falls back to the package
# next to tools/.
import _checkout  # noqa: F401  (first: puts the checkout's src/ on sys.path when dinopre is not installed)
import numpy as np
import torch

from dinopre.data.augment import MultiCropAugmentation
from dinopre.data.dataset import (
    SUPPORTED_EXTENSIONS,
    CropBatch,
    EpochBatchSampler,
    FolderSource,
    MultiCropDataset,
    build_loader,
    check_dataset_size,
    scan_image_files,
)
from dinopre.data.masking import MaskSampler

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "CropBatch",
    "build_dataloader",
    "build_dataset",
    "build_multicrop_transform",
]


def build_multicrop_transform(
    image_size: int = 112,
    local_crop_size: int = 48,
    num_local_crops: int = 6,
    global_crop_scale: tuple[float, float] = (0.4, 1.0),
    local_crop_scale: tuple[float, float] = (0.05, 0.4),
    *,
    flip_prob: float = 0.5,
    blur_sigma: tuple[float, float] = (0.05, 1.0),
) -> MultiCropAugmentation:
    """The DINO multi-crop transform: 2 global views and `num_local_crops` local views per image.

    Kept for backwards compatibility; it builds `dinopre.data.augment.MultiCropAugmentation`, which new code should use.
    The defaults are the `face` preset's (`dinopre train face`); pass `flip_prob=0.0` and scales `(0.5, 1.0)` /
    `(0.1, 0.5)` for the `hands` preset.

    Args:
        image_size: side of the global views in pixels.
        local_crop_size: side of the local views in pixels.
        num_local_crops: local views per image (may be 0).
        global_crop_scale: share of the image area a global view covers, (MIN, MAX).
        local_crop_scale: share of the image area a local view covers, (MIN, MAX).
        flip_prob: probability of a horizontal flip per view.
        blur_sigma: range of the Gaussian blur sigma in pixels (the presets' value for 112 px views).

    Returns:
        A callable `(PIL image, numpy Generator) -> (global views, local views)` of normalised tensors.

    Raises:
        ValueError: a size below 1, a negative number of local crops, or a scale outside (0, 1].
    """
    return MultiCropAugmentation(
        global_size=image_size,
        local_size=local_crop_size,
        num_local_crops=num_local_crops,
        global_scale=tuple(global_crop_scale),
        local_scale=tuple(local_crop_scale),
        flip_prob=flip_prob,
        blur_sigma=tuple(blur_sigma),
    )


def _as_roots(train_dirs: str | Path | Sequence[str | Path]) -> list[str]:
    """One folder or several, as the list of strings `scan_image_files` takes."""
    if isinstance(train_dirs, (str, Path)):
        return [str(train_dirs)]
    return [str(d) for d in train_dirs]


def build_dataset(
    train_dirs: str | Path | Sequence[str | Path],
    transform: MultiCropAugmentation,
    seed: int = 0,
    *,
    mask_sampler: MaskSampler | None = None,
) -> MultiCropDataset:
    """The multi-crop dataset over every supported image under `train_dirs`, recursively.

    Kept for backwards compatibility; it builds `dinopre.data.dataset.MultiCropDataset` over
    `FolderSource(scan_image_files(train_dirs))`. Items are keyed by `(epoch, index)`: the augmentation of image
    `index` in `epoch` is a pure function of `(seed, epoch, index)`.

    Args:
        train_dirs: one folder or several.
        transform: the multi-crop transform, e.g. from `build_multicrop_transform`.
        seed: the seed of the augmentation draws.
        mask_sampler: iBOT patch-mask generator for the global views (`dinopre.data.masking.MaskSampler`); None for
            DINO.

    Returns:
        The dataset; `dataset[(epoch, index)]` gives (global views, local views, index, masks or None).

    Raises:
        dinopre.base.errors.DataError: a folder is missing or holds no supported image.
    """
    files = scan_image_files(_as_roots(train_dirs))
    return MultiCropDataset(FolderSource(tuple(files)), transform, seed, mask_sampler)


class _InOrderBatchSampler(EpochBatchSampler):
    """`EpochBatchSampler` that visits the images in file order every epoch (the old `shuffle=False`)."""

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = np.arange(self.num_samples)
        for epoch in range(self.start_epoch, self.end_epoch):
            first = self.start_step if epoch == self.start_epoch else 0
            for step in range(first, self.steps_per_epoch):
                chunk = order[step * self.batch_size : (step + 1) * self.batch_size]
                yield [(epoch, int(i)) for i in chunk]


def build_dataloader(
    train_dirs: str | Path | Sequence[str | Path],
    batch_size: int,
    num_workers: int = 0,
    transform: MultiCropAugmentation | None = None,
    seed: int = 0,
    epochs: int = 1,
    shuffle: bool = True,
    pin_memory: bool = False,
    *,
    mask_sampler: MaskSampler | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader of crop-major `CropBatch`es over `epochs` passes of the images under `train_dirs`.

    Kept for backwards compatibility; it combines `dinopre.data.dataset`'s `EpochBatchSampler` and `build_loader`,
    as `dinopre train` does. One iterator spans all `epochs` (each a fresh seeded permutation when `shuffle`);
    every epoch drops its last incomplete batch, so it has `len(images) // batch_size` steps.

    Args:
        train_dirs: one folder or several.
        batch_size: images per batch.
        num_workers: data-loading processes (0: load in the calling process).
        transform: the multi-crop transform (default: `build_multicrop_transform()`, the face preset's).
        seed: the seed of the data order and augmentation draws.
        epochs: passes over the data the loader yields.
        shuffle: a seeded permutation per epoch; False visits the images in sorted file order.
        pin_memory: pin batches in page-locked memory for faster copies to a GPU.
        mask_sampler: iBOT patch-mask generator; the batches then carry `masks`.

    Returns:
        A `torch.utils.data.DataLoader` yielding `dinopre.data.dataset.CropBatch`: `global_crops` (2*B, 3, H, W),
        `local_crops` (L*B, 3, h, w) or None, `indices` (B,), `masks` (2*B, N) or None.

    Raises:
        dinopre.base.errors.DataError: a folder is missing, holds no supported image, or fewer images than one batch.
    """
    dataset = build_dataset(train_dirs, transform or build_multicrop_transform(), seed, mask_sampler=mask_sampler)
    check_dataset_size(len(dataset), batch_size)  # one clear sentence instead of an empty loader
    sampler_type = EpochBatchSampler if shuffle else _InOrderBatchSampler
    sampler = sampler_type(len(dataset), batch_size, seed, start_epoch=0, end_epoch=epochs)
    return build_loader(dataset, sampler, num_workers, pin_memory)
