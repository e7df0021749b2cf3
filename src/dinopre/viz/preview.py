"""The views training renders, drawn: every global and local view of the first images of the run, iBOT masks shaded.

A user checks crop settings by eye: whether `--local-crop-scale` cuts the fingers off a hand ROI, whether the
colour jitter leaves a face recognisable. The views come from the run's own dataset (`pipeline.build_dataset`):
the same seeded draws, keyed by (seed, epoch, index), and the same device rendering as the training step, for the
first images of the epoch's data order, i.e. the first batch training sees.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dinopre.base.errors import ConfigError
from dinopre.config.settings import PretrainConfig
from dinopre.data.dataset import CropBatch, ImageSource, RawBatch, collate_crops, epoch_permutation
from dinopre.data.pipeline import build_dataset
from dinopre.viz.figures import MAX_PIXELS, Grid, check_grid, check_picture_path, save_picture, save_png

VIEWS = "views.png"  # the grid a run writes into its folder at start
MASK_TINT = np.array([40, 120, 255], dtype=np.float32)  # masked patches: blended towards blue


def first_images(config: PretrainConfig, count: int, epoch: int, num_images: int) -> list[int]:
    """The dataset indices training visits first in `epoch` (its seeded permutation), `count` of them."""
    return [int(i) for i in epoch_permutation(config.run.seed, epoch, num_images)[:count]]


def render_views(config: PretrainConfig, source: ImageSource, indices: list[int], epoch: int = 0,
                 device: torch.device | None = None) -> CropBatch:
    """The views of these images exactly as a training step of `epoch` gets them (normalised, crop-major)."""
    dataset, render = build_dataset(config, source)
    batch = collate_crops([dataset[(epoch, index)] for index in indices])
    batch = batch.to(device or torch.device("cpu"))
    if isinstance(batch, RawBatch):
        assert render is not None
        batch = batch.render(render)
    return batch


def to_pixels(views: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(N, 3, S, S) normalised views -> (N, S, S, 3) uint8 RGB."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (views.detach().float().cpu() * s + m).clamp(0, 1).mul(255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def shade_mask(view: np.ndarray, mask: np.ndarray, patch_size: int) -> np.ndarray:
    """A view with its masked patches (iBOT) tinted, so the part the student must predict is visible."""
    grid = mask.reshape(view.shape[0] // patch_size, view.shape[1] // patch_size)
    cover = np.kron(grid, np.ones((patch_size, patch_size), dtype=bool))[..., None]
    tinted = view.astype(np.float32) * 0.45 + MASK_TINT * 0.55
    return np.where(cover, tinted, view).round().astype(np.uint8)


def views_grid(config: PretrainConfig, batch: CropBatch, names: list[str], cell: int = 96) -> Grid:
    """One row per image: its global views (masks shaded for iBOT), then its local views."""
    from dinopre.data.augment import IMAGENET_MEAN, IMAGENET_STD

    count = batch.batch_size
    globals_ = to_pixels(batch.global_crops, IMAGENET_MEAN, IMAGENET_STD)
    locals_ = to_pixels(batch.local_crops, IMAGENET_MEAN, IMAGENET_STD) if batch.local_crops is not None else None
    num_global = globals_.shape[0] // count
    num_local = locals_.shape[0] // count if locals_ is not None else 0
    size, local_size = config.model.image_size, config.data.local_crop_size
    titles = [f"global {v + 1} ({size} px)" for v in range(num_global)]
    titles += [f"local {v + 1} ({local_size} px)" for v in range(num_local)]
    footer = (f"--global-crop-scale {_pair(config.data.global_crop_scale)}  --local-crop-scale "
              f"{_pair(config.data.local_crop_scale)}  --flip-prob {config.data.flip_prob:g}")
    if batch.masks is not None:
        footer += "  (blue: patches masked for iBOT)"
    grid = Grid(cell, titles, footer=footer)
    for i in range(count):
        pictures = []
        for v in range(num_global):
            view = globals_[v * count + i]
            if batch.masks is not None:
                view = shade_mask(view, batch.masks[v * count + i].cpu().numpy(), config.model.patch_size)
            pictures.append(view)
        pictures += [locals_[v * count + i] for v in range(num_local)] if locals_ is not None else []
        grid.add_row(names[i], pictures)
    return grid


def _pair(values: tuple[float, float]) -> str:
    return f"{values[0]:g} {values[1]:g}"


def write_views(config: PretrainConfig, source: ImageSource, output: Path, *, count: int = 4, epoch: int = 0,
                device: torch.device | None = None, cell: int = 96, any_format: bool = False) -> Path:
    """Render the first `count` images of `epoch` as training would and write the grid to `output` (PNG, or with
    `any_format` the format its suffix names)."""
    indices = first_images(config, min(count, len(source)), epoch, len(source))
    batch = render_views(config, source, indices, epoch, device)
    names = [_short(source.describe(index)) for index in indices]
    picture = views_grid(config, batch, names, cell).render()
    return save_picture(picture, output) if any_format else save_png(picture, output)


def check_preview_size(config: PretrainConfig, count: int, cell: int) -> None:
    """Refuse, before any image is read, a preview too large to draw: its grid (`check_grid`), and the views it
    renders at the model's sizes first.

    Raises:
        ConfigError: one sentence naming the options to lower.
    """
    d = config.data
    check_grid(count, 2 + d.num_local_crops, cell, images_flag="--images")
    rendered = count * (2 * config.model.image_size**2 + d.num_local_crops * d.local_crop_size**2)
    if rendered > MAX_PIXELS:
        raise ConfigError(f"{count} images of {2 + d.num_local_crops} views at --image-size {config.model.image_size} "
                          f"and --local-crop-size {d.local_crop_size} are {rendered:,} pixels to render, over "
                          f"{MAX_PIXELS:,}; lower --images or the sizes.")


def _short(name: str, limit: int = 22) -> str:
    name = Path(name).name if "/" in name else name
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def preview(config: PretrainConfig, output: Path, *, count: int = 4, epoch: int = 0, cell: int = 96,
            force: bool = False, inputs: tuple[Path, ...] = ()) -> Path:
    """`dinopre preview`: find the images as `train` would, resolve the recipe, and draw the first ones' views.

    Raises:
        UserError: no images, an invalid setting, or an output that must not be written.
    """
    from dinopre.config.recipe import resolve
    from dinopre.data.pipeline import build_source
    from dinopre.files.outputs import check_output, check_parent_writable
    from dinopre.train.runtime import resolve_device

    check_picture_path(output)
    check_preview_size(config, count, cell)
    check_output(output, force=force, inputs=inputs, what="--output")
    check_parent_writable(output, "the --output picture")
    data = build_source(config)
    resolved = resolve(config, len(data.source)).config
    return write_views(resolved, data.source, output, count=count, epoch=epoch,
                       device=resolve_device(resolved.run.device), cell=cell, any_format=True)
