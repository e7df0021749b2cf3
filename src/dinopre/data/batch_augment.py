"""Multi-crop augmentation of a whole batch on the training device (`--augment-on device`, the default).

Decoding and augmenting every view in the data workers costs far more CPU time than a GPU step (DINO's 10 views
per image at ~1,750 images/s are 17,500 bicubic resizes and colour jitters a second). So, on this path:

- the workers decode each image, make every random draw exactly as the per-image path does
  (`MultiCropAugmentation.draw` on the sample's (seed, epoch, index) generator, then the iBOT masks), encode the
  draws as one row of numbers per view (`encode_views`) and send the image itself as uint8;
- the device crops and resizes all views of a resolution at once with Pillow's antialiased bicubic arithmetic
  (`dinopre.data.resample`), mirrors the flipped ones, and applies colour jitter (in each view's own random order),
  grayscale, blur and solarization to the whole batch with per-view parameters.

Same generators, same draws, same resampling: a view equals its per-image twin within a level or two of 255,
most pixels exactly (tests/data/test_batch_augment.py). Images whose short side exceeds `source_cap` (4x the global
view's side) are shrunk first in the worker, to a size where every view still shrinks its box (`source_cap`);
their views then differ from the per-image ones by the extra resampling step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinopre.data.augment import (
    MultiCropAugmentation,
    ViewParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    grayscale,
    normalize,
    solarize,
)
from dinopre.data.resample import resize_boxes

# Columns of one encoded view (float32): the crop box in the pixels of the image the worker sends and that image's
# width and height, then the pixel-op draws. Without jitter the order is the identity and the factors are
# neutral (1, 1, 1, 0).
BOX = slice(0, 4)
SIZE = slice(4, 6)
FLIP = 6
JITTER = 7
ORDER = slice(8, 12)
FACTORS = slice(12, 16)
GRAY = 16
SIGMA = 17  # 0 = no blur
SOLARIZE = 18
NUM_COLUMNS = 19
_NEUTRAL_JITTER = ((0, 1, 2, 3), (1.0, 1.0, 1.0, 0.0))


def source_cap(global_size: int) -> int:
    """The short side beyond which an image is shrunk before it is sent: 4x the global view's (896 px for 224).

    Crop boxes keep an aspect ratio of 3/4 to 4/3, so their size follows the image's short side: at this size the
    smallest global box (40 % of a square image's area) still spans about 490 px and the smallest local box (5 %)
    about 170 px, both more than their views (224 and 96 px), so every view is still a shrink of its box.
    """
    return 4 * global_size


def source_scale(width: int, height: int, cap: int) -> float:
    """How much `to_source` shrinks a width x height image (1.0 = not at all).

    The short side is brought down to `cap`; the area is also kept under (2 cap)^2 pixels, which bounds the
    padded batch tensor and only affects panoramas longer than about 4:1 with a short side above cap / 2.
    """
    return min(1.0, cap / min(width, height), 2 * cap / math.sqrt(width * height))


def to_source(image: Image.Image, cap: int) -> torch.Tensor:
    """The image as a (3, H, W) uint8 tensor, shrunk (Pillow's antialiased bicubic) as `source_scale` says."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    factor = source_scale(width, height, cap)
    if factor < 1.0:
        image = image.resize((max(1, round(width * factor)), max(1, round(height * factor))),
                             Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def encode_views(views: list[ViewParams], source_size: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """The draws of one image's views as a (V, NUM_COLUMNS) float32 table (see the column constants).

    Args:
        views: what `MultiCropAugmentation.draw` returned for the decoded image.
        source_size: (width, height) of the decoded image, the pixels the boxes were drawn in.
        image_size: (width, height) of the image sent to the device (`to_source`); boxes are scaled to it.
    """
    scale_x, scale_y = image_size[0] / source_size[0], image_size[1] / source_size[1]
    table = np.zeros((len(views), NUM_COLUMNS), dtype=np.float32)
    for row, view in zip(table, views, strict=True):
        left, top, right, bottom = view.box
        row[BOX] = (left * scale_x, top * scale_y, right * scale_x, bottom * scale_y)
        row[SIZE] = image_size
        row[FLIP] = view.flip
        jittered = view.jitter_order is not None and view.jitter_factors is not None
        row[JITTER] = jittered
        row[ORDER], row[FACTORS] = (view.jitter_order, view.jitter_factors) if jittered else _NEUTRAL_JITTER
        row[GRAY] = view.grayscale
        row[SIGMA] = view.blur_sigma or 0.0
        row[SOLARIZE] = view.solarize
    return table


def bound_padding(sources: list[torch.Tensor], views: list[torch.Tensor]) -> tuple[list[torch.Tensor],
                                                                                  list[torch.Tensor]]:
    """Keep the padded batch within 4 times its largest image by shrinking the images that make it larger.

    Each image is capped on its own (`source_scale`), but a tall and a wide one together would pad to the square of
    their long sides (a 1 x 65,000 and a 65,000 x 1 image to 65,000^2 pixels). The images whose long side exceeds
    the side of that budget are shrunk (Pillow's antialiased bicubic) and their view boxes scaled with them, so
    they give the same views from fewer pixels.

    Args:
        sources: (3, H_i, W_i) uint8 images of a batch.
        views: their (V, NUM_COLUMNS) encoded draws, boxes in the images' pixels.

    Returns:
        The images and draws to pad and render.
    """
    budget = 4 * max(s.shape[1] * s.shape[2] for s in sources)
    if max(s.shape[1] for s in sources) * max(s.shape[2] for s in sources) <= budget:
        return sources, views
    side = math.isqrt(budget)
    out_sources, out_views = [], []
    for source, table in zip(sources, views, strict=True):
        height, width = source.shape[1], source.shape[2]
        if max(height, width) > side:
            factor = side / max(height, width)
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            image = Image.fromarray(source.permute(1, 2, 0).numpy()).resize(size, Image.Resampling.BICUBIC)
            source = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
            table = table.clone()
            scale = torch.tensor([size[0] / width, size[1] / height] * 2, dtype=table.dtype)
            table[:, BOX] *= scale
            table[:, SIZE] = torch.tensor(size, dtype=table.dtype)
        out_sources.append(source)
        out_views.append(table)
    return out_sources, out_views


def pad_sources(sources: list[torch.Tensor]) -> torch.Tensor:
    """Stack (3, H_i, W_i) uint8 images into one (B, 3, max H, max W) tensor, zero-padded at the bottom right."""
    height = max(s.shape[1] for s in sources)
    width = max(s.shape[2] for s in sources)
    out = torch.zeros(len(sources), 3, height, width, dtype=torch.uint8)
    for slot, source in zip(out, sources, strict=True):
        slot[:, : source.shape[1], : source.shape[2]] = source
    return out


def _per_view(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def op_rows(table: torch.Tensor) -> list[torch.Tensor]:
    """The rows each costly op touches, for one resolution's (R, NUM_COLUMNS) draws: 16 index tensors for
    (position p, jitter op k) in the order p * 4 + k, then the rows that are blurred.

    Built on the host (`plan_rows` in the data step), their lengths are known without asking the device, so the
    ops run on exactly these rows (`index_select` / `index_copy_`) and nothing synchronises: a view pays for the
    jitter ops it draws and for its blur, not for all 16 ops and the widest blur of the batch.
    """
    jittered = table[:, JITTER] > 0.5
    order = table[:, ORDER]
    rows = [(jittered & (order[:, p] == k)).nonzero().flatten() for p in range(4) for k in range(4)]
    return rows + [(table[:, SIGMA] > 0).nonzero().flatten()]


OPS_PER_GROUP = 17  # len(op_rows(...))


def plan_rows(views: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """`op_rows` of the global and then the local views of a (B, V, NUM_COLUMNS) batch, concatenated.

    Returns:
        The row indices (crop-major rows within each resolution) in one int64 tensor, and the length of each of
        the 2 * OPS_PER_GROUP segments (a tuple of Python ints, so splitting never asks the device).
    """
    by_view = views.transpose(0, 1)  # (V, B, C), crop-major like the rendered views
    groups = [by_view[:2].reshape(-1, NUM_COLUMNS), by_view[2:].reshape(-1, NUM_COLUMNS)]
    segments = [rows for table in groups for rows in op_rows(table)]
    return torch.cat(segments), tuple(len(rows) for rows in segments)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _on_rows(img: torch.Tensor, rows: torch.Tensor, op, *args: torch.Tensor) -> None:
    """img[rows] = op(img[rows], *(a[rows] for a in args)), in place; skipped for no rows (a host-side length)."""
    if rows.shape[0] == 0:
        return
    picked = [a.index_select(0, rows) for a in args]
    img.index_copy_(0, rows, op(img.index_select(0, rows), *picked))


def batch_color_jitter(img: torch.Tensor, table: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
    """ColorJitter with each view's own order and factors, in place on (R, 3, H, W) views.

    Args:
        img: views in [0, 1], modified in place.
        table: (R, NUM_COLUMNS) draws.
        rows: the first 16 index tensors of `op_rows(table)`.
    """
    factors = table[:, FACTORS]
    for position in range(4):
        for op_index, op in enumerate(_JITTER_OPS):
            _on_rows(img, rows[position * 4 + op_index], op, _per_view(factors[:, op_index]))
    return img


def gaussian_taps(sigma: torch.Tensor, max_radius: int, limit: int) -> torch.Tensor:
    """Per-view normalised Gaussian taps (R, 2 * max_radius + 1), each cut at the view's own radius.

    A view's radius is ceil(3 sigma), at least 1 and at most `limit` (= side - 1, as reflect padding must stay
    inside the image): the taps of `augment.gaussian_blur`, zero-padded to the widest view's length. Views with
    sigma 0 get the identity (a single 1).
    """
    offsets = torch.arange(-max_radius, max_radius + 1, device=sigma.device, dtype=sigma.dtype)  # (T,)
    blurred = sigma > 0
    # Clamped: sigma**2 of a sigma below ~1e-23 underflows float32 to 0; at 1e-3 every tap but the centre is 0.
    safe = torch.where(blurred, sigma, 1.0).clamp_min(1e-3).unsqueeze(-1)  # (R, 1)
    radius = torch.ceil(3.0 * safe).clamp(1, limit)
    taps = torch.exp(-(offsets**2) / (2.0 * safe**2)) * (offsets.abs() <= radius)
    taps = taps / taps.sum(-1, keepdim=True)
    identity = (offsets == 0).to(sigma.dtype).expand_as(taps)
    return torch.where(blurred.unsqueeze(-1), taps, identity)


def _filter_axis(img: torch.Tensor, taps: torch.Tensor, radius: int, axis: int) -> torch.Tensor:
    # Shifted multiply-adds over a reflect-padded copy, each tap a per-view (R, 1, 1, 1) factor.
    length = img.shape[axis]
    padded = F.pad(img, (radius, radius, 0, 0) if axis == -1 else (0, 0, radius, radius), mode="reflect")
    out = padded.narrow(axis, 0, length) * _per_view(taps[:, 0])
    for tap in range(1, taps.shape[1]):
        out.addcmul_(padded.narrow(axis, tap, length), _per_view(taps[:, tap]))
    return out


def batch_gaussian_blur(img: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (R, 3, H, W) views with per-view sigma (R,) in pixels, 0 = not blurred.

    Equal to `augment.gaussian_blur` view by view: reflect padding only mirrors pixels by index, so padding all
    views to the widest radius changes nothing for the narrower ones, whose outer taps are 0.
    """
    limit = min(img.shape[-2:]) - 1
    max_radius = min(max(1, math.ceil(3.0 * max_sigma)), limit)
    if max_radius < 1:
        return img
    taps = gaussian_taps(sigma, max_radius, limit)
    return _filter_axis(_filter_axis(img, taps, max_radius, -1), taps, max_radius, -2)


def batch_pixel_ops(img: torch.Tensor, table: torch.Tensor, max_sigma: float,
                    rows: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Jitter, grayscale, blur and solarization of (R, 3, H, W) views in [0, 1], as `augment.apply_pixel_ops`.

    Args:
        img: the views; modified in place.
        table: (R, NUM_COLUMNS) draws.
        max_sigma: the largest blur sigma the augmentation can draw.
        rows: `op_rows(table)` on `img`'s device; computed here when None (which synchronises on a GPU).
    """
    if rows is None:
        rows = [r.to(img.device) for r in op_rows(table.cpu())]
    img = batch_color_jitter(img, table, rows)
    img = torch.where(_per_view(table[:, GRAY] > 0.5), grayscale(img), img)
    _on_rows(img, rows[16], lambda views, sigma: batch_gaussian_blur(views, sigma, max_sigma), table[:, SIGMA])
    return torch.where(_per_view(table[:, SOLARIZE] > 0.5), solarize(img), img)


class BatchAugmentation:
    """Renders the views of a batch on its device from the images and the encoded draws the workers sent.

    Args:
        augmentation: the per-image augmentation whose draws the workers encoded (sizes, blur range, mean, std).
    """

    def __init__(self, augmentation: MultiCropAugmentation) -> None:
        self.augmentation = augmentation

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, views: torch.Tensor,
                 plan: tuple[torch.Tensor, tuple[int, ...]] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All views of a batch, crop-major as `data.collate_crops` stacks them.

        Args:
            images: (B, 3, H, W) uint8 images, zero-padded to a common size (`pad_sources`).
            views: (B, V, NUM_COLUMNS) encoded draws, globals first.
            plan: `plan_rows(views)` with its indices on the images' device; the data step builds it on the host.
                Computed here when None, which synchronises on a GPU.

        Returns:
            (2 * B, 3, H, H) normalised global views and (L * B, 3, h, h) local views (None without locals).
        """
        aug = self.augmentation
        if plan is None:
            indices, sizes = plan_rows(views.cpu())
            plan = indices.to(images.device), sizes
        segments = list(torch.split(plan[0], list(plan[1])))
        source = images.float().div_(255.0)
        by_view = views.transpose(0, 1)  # (V, B, C)
        global_views = self._render(source, by_view[:2], aug.global_size, segments[:OPS_PER_GROUP])
        local_views = None
        if aug.num_local_crops:
            local_views = self._render(source, by_view[2:], aug.local_size, segments[OPS_PER_GROUP:])
        return global_views, local_views

    def _render(self, source: torch.Tensor, views: torch.Tensor, size: int, rows: list[torch.Tensor]) -> torch.Tensor:
        crops = resize_boxes(source, views[..., BOX], views[..., SIZE], views[..., FLIP] > 0.5, size)
        crops = batch_pixel_ops(crops, views.reshape(-1, NUM_COLUMNS), self.augmentation.blur_sigma[1], rows)
        return normalize(crops, self.augmentation.mean, self.augmentation.std)
