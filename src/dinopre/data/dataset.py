"""Training data: image folder scanning, decoding, the seeded multi-crop dataset, the resumable sampler, the loader.

Determinism (a run is a function of config, seed and data, so a resumed run repeats an uninterrupted one): the
data order of epoch e is a permutation drawn from a generator seeded by (seed, e), and every random draw of sample i
in epoch e comes from a generator seeded by (seed, e, i). The sampler yields (epoch, index) keys, so workers need no
epoch state: one loader with persistent workers serves the whole run (the official DINO code builds a loader without
persistent workers, so they are respawned at every epoch start; on a small dataset that costs seconds per epoch).
"""

from __future__ import annotations

import functools
import gc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
from PIL import Image

from dinopre.base.errors import DataError
from dinopre.base.signals import ignore_stop_signals
from dinopre.data.augment import MultiCropAugmentation
from dinopre.data.batch_augment import BatchAugmentation, bound_padding, encode_views, pad_sources, plan_rows, to_source
from dinopre.data.images import BACKGROUND, BadImageError, load_rgb
from dinopre.data.masking import MaskIndex, MaskSampler
from dinopre.data.scan import SUPPORTED_EXTENSIONS, scan_image_files

__all__ = ["SUPPORTED_EXTENSIONS", "scan_image_files"]  # re-exported for tools/pretrain_utils.py and old code

_ORDER_STREAM = 1  # separates the data-order generator from per-sample generators that share (seed, epoch)
# A bad file's slot is filled by the next file that decodes; after this many failures in a row the sample becomes
# a blank image and the engine stops the run, because the data is broken, not a few files.
MAX_FALLBACKS = 100
EXHAUSTED = -1  # the index of the record that marks a sample whose fallbacks all failed
_FALLBACK_STREAM = 2


class ImageSource(Protocol):
    """Where images come from: a folder of files or the built-in synthetic set."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image:
        """The image at `index` as 8-bit RGB; raises BadImageError for a file that cannot be used."""
        ...

    def describe(self, index: int) -> str:
        """Where image `index` comes from (a file path), for reports."""
        ...


@dataclass(frozen=True)
class FolderSource:
    """Images decoded from files."""

    files: tuple[Path, ...]

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> Image.Image:
        return load_rgb(self.files[index])

    def describe(self, index: int) -> str:
        # Printable even when the name is not valid UTF-8 (the bytes become U+FFFD).
        return os.fsencode(self.files[index]).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class SyntheticSource:
    """The `--demo` images: deterministic synthetic face-like or hand-like crops generated on demand."""

    kind: str
    count: int
    size: int = 64

    def __len__(self) -> int:
        return self.count

    def load(self, index: int) -> Image.Image:
        return _cached_synthetic_image(self.kind, index, self.size)

    def describe(self, index: int) -> str:
        return f"synthetic {self.kind} #{index}"


@functools.lru_cache(maxsize=8192)
def _cached_synthetic_image(kind: str, index: int, size: int) -> Image.Image:
    # Drawing a crop costs more than augmenting it; each worker keeps the few MB of demo images it has drawn.
    from dinopre.data.demo import synthetic_image

    return synthetic_image(kind, index, size)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of every random draw of sample `index` in `epoch`."""
    return np.random.default_rng([seed, epoch, index])


def epoch_permutation(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The data order of an epoch."""
    return np.random.default_rng([seed, epoch, num_samples, _ORDER_STREAM]).permutation(num_samples)


@dataclass
class CropBatch:
    """One batch of multi-crop views, crop-major: rows [view0 x B, view1 x B, ...].

    Attributes:
        global_crops: (G*B, 3, H, W) normalised global views.
        local_crops: (L*B, 3, h, w) normalised local views, or None without local crops.
        indices: (B,) dataset indices of the images.
        masks: (G*B, N) bool iBOT patch masks of the global views (True = masked), or None for DINO.
        mask_index: the masks as index tensors (built with the batch, on the host), or None for DINO.
        bad: (dataset index, reason) of the files that failed and were replaced.
        drop_keys: (B,) int64 keys of the samples' drop-path draws (`KeyedSample`), or None.
    """

    global_crops: torch.Tensor
    local_crops: torch.Tensor | None
    indices: torch.Tensor
    masks: torch.Tensor | None = None
    bad: list[tuple[int, str]] = field(default_factory=list)
    mask_index: MaskIndex | None = None
    drop_keys: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.masks is not None and self.mask_index is None:
            self.mask_index = MaskIndex.from_masks(self.masks)

    @property
    def batch_size(self) -> int:
        return self.indices.shape[0]

    def _map(self, fn) -> CropBatch:
        fields = (self.global_crops, self.local_crops, self.indices, self.masks)
        tensors = (None if t is None else fn(t) for t in fields)
        index = None if self.mask_index is None else self.mask_index.map(fn)
        keys = None if self.drop_keys is None else fn(self.drop_keys)
        return CropBatch(*tensors, bad=self.bad, mask_index=index, drop_keys=keys)

    def pin_memory(self) -> CropBatch:
        """Called by the DataLoader's pinning thread when pin_memory is on."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device) -> CropBatch:
        """Copy to a device without blocking the host."""
        return self._map(lambda t: t.to(device, non_blocking=True))


# (global views, local views) or (uint8 image, encoded draws), then index, masks, bad files.
Sample = tuple[list[torch.Tensor] | torch.Tensor, list[torch.Tensor] | torch.Tensor, int, list[np.ndarray] | None,
               list[tuple[int, str]]]
DROP_KEYS = 2**31  # drop-path keys are drawn below this (`model.vit.keyed_uniform` hashes 31 bits)


class KeyedSample(tuple):
    """A `Sample` that also carries its drop-path key, the last draw of its own generator, as an attribute: drop
    path then depends on the sample, like its views, not on the process or the batch it lands in. An attribute, not
    a sixth part, so that code unpacking a sample's five parts keeps working.
    """

    drop_key: int


def _keyed(parts: Sample, rng: np.random.Generator) -> KeyedSample:
    sample = KeyedSample(parts)
    sample.drop_key = int(rng.integers(DROP_KEYS))  # after every other draw: those stay as they were
    return sample


class MultiCropDataset(torch.utils.data.Dataset):
    """Images -> (global views, local views, index, global-view masks, bad files met), keyed by (epoch, index).

    With `source_cap`, the views are not rendered here: a sample is (the image as uint8, shrunk to at most
    source_cap pixels on its longest side; the encoded draws of its views; index, masks, bad files), for
    `BatchAugmentation` on the training device. The draws are the same either way.

    A file that cannot be decoded is replaced by the next one that can (in dataset order, so the run stays a pure
    function of its data) and reported back with the batch; the engine lists it and, with --strict-data, stops.

    Args:
        source: where images come from.
        augmentation: the multi-crop augmentation.
        seed: the run's seed.
        mask_sampler: iBOT mask generator for the global views; None for DINO (no draws are made).
        source_cap: leave the rendering to the device and send images (at most this long) instead of views.
    """

    def __init__(self, source: ImageSource, augmentation: MultiCropAugmentation, seed: int,
                 mask_sampler: MaskSampler | None = None, source_cap: int | None = None) -> None:
        self.source, self.augmentation, self.seed, self.mask_sampler = source, augmentation, seed, mask_sampler
        self.source_cap = source_cap

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> KeyedSample:
        epoch, index = key
        image, bad = self._load(index)
        rng = sample_rng(self.seed, epoch, index)  # the slot's draws, whichever file fills it
        if self.source_cap is None:
            first, second = self.augmentation(image, rng)  # global views, local views
        else:  # the same draws in the same order, rendered later on the device
            first = to_source(image, self.source_cap)
            sent = (first.shape[2], first.shape[1])
            second = torch.from_numpy(encode_views(self.augmentation.draw(rng, *image.size), image.size, sent))
        masks = [self.mask_sampler(rng) for _ in range(2)] if self.mask_sampler is not None else None
        return _keyed((first, second, index, masks, bad), rng)

    def _load(self, index: int) -> tuple[Image.Image, list[tuple[int, str]]]:
        bad: list[tuple[int, str]] = []
        for candidate in self._candidates(index):
            try:
                return self.source.load(candidate), bad
            except BadImageError as exc:
                bad.append((candidate, str(exc)))
        bad.append((EXHAUSTED, f"none of {len(bad)} files tried could be decoded"))
        return Image.new("RGB", (64, 64), BACKGROUND), bad

    def _candidates(self, index: int) -> Iterator[int]:
        """The file itself, its next 7 neighbours, then files drawn across the whole set (seeded by the index),
        so a sub-folder full of broken files cannot exhaust the fallbacks of a mostly good dataset."""
        count = len(self.source)
        tries = min(MAX_FALLBACKS, count)
        neighbours = [(index + k) % count for k in range(min(8, tries))]
        yield from neighbours
        if tries > len(neighbours):
            draws = np.random.default_rng([self.seed, index, _FALLBACK_STREAM]).integers(0, count, tries - 8)
            yield from (int(i) for i in draws)


@dataclass
class RawBatch:
    """One batch before its views are rendered on the device (`MultiCropDataset` with a source cap).

    Attributes:
        images: (B, 3, H, W) uint8 images, zero-padded to the largest of the batch.
        views: (B, V, NUM_COLUMNS) float32 encoded view draws (`batch_augment.encode_views`).
        indices, masks, bad, mask_index, drop_keys: as in `CropBatch`.
        plan: the rows each costly op touches (`batch_augment.plan_rows`), built with the batch on the host.
    """

    images: torch.Tensor
    views: torch.Tensor
    indices: torch.Tensor
    masks: torch.Tensor | None = None
    bad: list[tuple[int, str]] = field(default_factory=list)
    mask_index: MaskIndex | None = None
    plan: tuple[torch.Tensor, tuple[int, ...]] | None = None
    drop_keys: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.masks is not None and self.mask_index is None:
            self.mask_index = MaskIndex.from_masks(self.masks)
        if self.plan is None:
            self.plan = plan_rows(self.views)

    @property
    def batch_size(self) -> int:
        return self.indices.shape[0]

    def _map(self, fn) -> RawBatch:
        masks = None if self.masks is None else fn(self.masks)
        index = None if self.mask_index is None else self.mask_index.map(fn)
        plan = (fn(self.plan[0]), self.plan[1])
        keys = None if self.drop_keys is None else fn(self.drop_keys)
        return RawBatch(fn(self.images), fn(self.views), fn(self.indices), masks, self.bad, index, plan, keys)

    def pin_memory(self) -> RawBatch:
        """Called by the DataLoader's pinning thread when pin_memory is on."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device) -> RawBatch:
        """Copy to a device without blocking the host."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def render(self, augment: BatchAugmentation) -> CropBatch:
        """The batch with its views rendered (on the images' device)."""
        global_crops, local_crops = augment(self.images, self.views, self.plan)
        return CropBatch(global_crops, local_crops, self.indices, self.masks, self.bad, self.mask_index,
                         self.drop_keys)


def collate_crops(samples: list[Sample]) -> CropBatch | RawBatch:
    """Stack samples crop-major so each resolution is one contiguous block of rows (or stack unrendered samples)."""
    if isinstance(samples[0][0], torch.Tensor):
        return _collate_raw(samples)
    num_global, num_local = len(samples[0][0]), len(samples[0][1])
    global_crops = torch.stack([s[0][v] for v in range(num_global) for s in samples])  # (G*B, 3, H, W)
    local_crops = torch.stack([s[1][v] for v in range(num_local) for s in samples]) if num_local else None
    bad = [record for s in samples for record in s[4]]
    return CropBatch(global_crops, local_crops, torch.tensor([s[2] for s in samples]), _collate_masks(samples), bad,
                     drop_keys=_collate_keys(samples))


def _collate_raw(samples: list[Sample]) -> RawBatch:
    sources, tables = bound_padding([s[0] for s in samples], [s[1] for s in samples])
    images = pad_sources(sources)  # (B, 3, H, W) uint8
    views = torch.stack(tables)  # (B, V, C)
    bad = [record for s in samples for record in s[4]]
    return RawBatch(images, views, torch.tensor([s[2] for s in samples]), _collate_masks(samples), bad,
                    drop_keys=_collate_keys(samples))


def _collate_keys(samples: list[Sample]) -> torch.Tensor | None:
    """(B,) int64 drop-path keys of the samples, or None when one has none (a plain tuple)."""
    keys = [getattr(s, "drop_key", None) for s in samples]
    return None if None in keys else torch.tensor(keys, dtype=torch.int64)


def _collate_masks(samples: list[Sample]) -> torch.Tensor | None:
    """(G*B, N) masks, crop-major like the global views, or None for DINO."""
    if samples[0][3] is None:
        return None
    num_global = len(samples[0][3])
    return torch.from_numpy(np.stack([s[3][v] for v in range(num_global) for s in samples]))


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (epoch, index) keys for epochs [start_epoch, end_epoch), starting at step `start_step`.

    Each epoch visits a fresh permutation and drops the last incomplete batch (as dino's loader), so every
    epoch has `num_samples // batch_size` steps. Resuming mid-epoch skips consumed batches without loading them.

    With several processes, `batch_size` is the global batch: the permutation is the same on all of them and
    process `rank` takes the `rank`-th of `world_size` equal slices of each global batch. Since every draw of a
    sample is keyed by (seed, epoch, index), a step sees the same images and views whatever the number of
    processes, and a run can continue on another number of them.
    """

    def __init__(
        self, num_samples: int, batch_size: int, seed: int, start_epoch: int, end_epoch: int, start_step: int = 0,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"the global batch {batch_size} does not divide by {world_size} processes")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.start_epoch, self.end_epoch, self.start_step = start_epoch, end_epoch, start_step
        self.steps_per_epoch = num_samples // batch_size
        share = batch_size // world_size
        self.slice = slice(rank * share, (rank + 1) * share)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for epoch in range(self.start_epoch, self.end_epoch):
            order = epoch_permutation(self.seed, epoch, self.num_samples)
            first = self.start_step if epoch == self.start_epoch else 0
            for step in range(first, self.steps_per_epoch):
                chunk = order[step * self.batch_size : (step + 1) * self.batch_size][self.slice]
                yield [(epoch, int(i)) for i in chunk]

    def __len__(self) -> int:
        return (self.end_epoch - self.start_epoch) * self.steps_per_epoch - self.start_step


def check_dataset_size(num_samples: int, batch_size: int) -> int:
    """Steps per epoch; refuses a dataset smaller than one batch.

    Raises:
        DataError: fewer images than `batch_size`.
    """
    if num_samples < batch_size:
        raise DataError(
            f"The dataset has {num_samples} images, fewer than --batch-size {batch_size}; "
            f"lower --batch-size to at most {num_samples} or add images."
        )
    return num_samples // batch_size


def start_worker(worker_id: int) -> None:
    """A data worker's first act: leave SIGINT/SIGTERM to the trainer (`ignore_stop_signals`), and keep from
    writing into the memory it shares with the trainer.

    A forked worker shares the trainer's pages until it writes to one. Two things write to them: glibc, which after
    the first large buffer is freed raises its mmap threshold (up to 32 MiB), so that every later batch is carved out
    of the heap the worker inherited, whose free holes are the trainer's pages; and the garbage collector, which
    writes to every object it walks. Measured over 60-150 batches of 64 images (`benchmarks/data.py workers`): a
    worker's private memory grew from 30 to 290-340 MiB, a copy of the trainer's heap (the copy-on-write growth of
    PyTorch issue #13246); 30 to 72 MiB with the threshold pinned but the collector free; 30 to 35 MiB with both.
    Pinned at 1 MiB, a decoded crop still comes from the heap (at 128 KiB every image would be a fresh mapping,
    about 10 % more CPU per image); `gc.freeze` moves the inherited objects out of the collector's reach without
    touching them.
    """
    ignore_stop_signals(worker_id)
    _pin_mmap_threshold()
    gc.freeze()


def _pin_mmap_threshold(size: int = 1 << 20) -> None:
    """glibc's M_MMAP_THRESHOLD, fixed (which also stops its dynamic raising); a no-op without glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows)
        return
    mallopt(ctypes.c_int(-3), ctypes.c_int(size))  # -3: M_MMAP_THRESHOLD


def build_loader(
    dataset: MultiCropDataset, sampler: EpochBatchSampler, num_workers: int, pin_memory: bool
) -> torch.utils.data.DataLoader:
    """One DataLoader for the whole run: workers stay alive across epochs and prefetch ahead."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_crops,
        pin_memory=pin_memory,
        # The loader draws its workers' base seed when an iterator starts; from its own generator, not the global
        # one, so starting the loader again on resume leaves the drop-path draws of the run unchanged.
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=start_worker,
        persistent_workers=False,  # one iterator spans every epoch, so workers live for the whole run anyway
        prefetch_factor=4 if num_workers > 0 else None,
    )
