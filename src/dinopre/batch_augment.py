"""Multi-crop augmentation of a whole batch on the training device (`--augment-on device`, the default on CUDA).

Decoding and augmenting every view in the data workers costs far more CPU time than a GPU step (DINO's 10 views
per image at ~1,750 images/s are 17,500 bicubic resizes and colour jitters a second). So, on this path:

- the workers decode each image, make every random draw exactly as the per-image path does
  (`MultiCropAugmentation.draw` on the sample's (seed, epoch, index) generator, then the iBOT masks), encode the
  draws as one row of numbers per view (`encode_views`), and resize the image to a square working size as uint8;
- the device crops all views of a resolution in one `grid_sample` call and applies flip, colour jitter (in each
  view's own random order), grayscale, blur and solarization to the whole batch with per-view parameters.

Same generators, same draws, so both paths sample the same distribution of views; from the same draws the views
differ only by resampling (tests/test_batch_augment.py compares them view by view and in statistics). Differences:
the crop reads the working-size copy (about 8/7 of the global view's side, so global views keep full detail;
a small local box of a large source image is upsampled from fewer pixels than on the per-image path), and the
bicubic resampling is not antialiased (PIL's is when it shrinks; the largest shrink here is about 1.7x).

Why a working size: a fixed (S, S) uint8 image per sample makes batches of one shape that pin and copy as one
block, 4x smaller than float views. Resizing anisotropically is harmless because boxes are stored as fractions
of the source's width and height, so a box still covers the same region of the source.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinopre.augment import (
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

# Columns of one encoded view (float32): the crop box as fractions of the source's width and height, then the
# pixel-op draws. Without jitter the order is the identity and the factors are neutral (1, 1, 1, 0).
BOX = slice(0, 4)
FLIP = 4
JITTER = 5
ORDER = slice(6, 10)
FACTORS = slice(10, 14)
GRAY = 14
SIGMA = 15  # 0 = no blur
SOLARIZE = 16
NUM_COLUMNS = 17
_NEUTRAL_JITTER = ((0, 1, 2, 3), (1.0, 1.0, 1.0, 0.0))


def working_size(global_size: int) -> int:
    """The side of the uint8 copy workers send: 8/7 of the global view (224 -> 256, 112 -> 128), rounded up.

    A global view covers 40-100 % of the image area, so its box is 0.63-1.0 of the working side: 162-256 px
    for a 224 px view, a shrink of at most 8/7 and an enlargement of at most 1.4x.
    """
    return -(-global_size * 8 // 7)


def encode_views(views: list[ViewParams], width: int, height: int) -> np.ndarray:
    """The draws of one image's views as a (V, NUM_COLUMNS) float32 table (see the column constants).

    Args:
        views: what `MultiCropAugmentation.draw` returned for this image.
        width: source image width in pixels (the boxes are in its pixels).
        height: source image height in pixels.
    """
    table = np.zeros((len(views), NUM_COLUMNS), dtype=np.float32)
    for row, view in zip(table, views, strict=True):
        left, top, right, bottom = view.box
        row[BOX] = (left / width, top / height, right / width, bottom / height)
        row[FLIP] = view.flip
        jittered = view.jitter_order is not None and view.jitter_factors is not None
        row[JITTER] = jittered
        row[ORDER], row[FACTORS] = (view.jitter_order, view.jitter_factors) if jittered else _NEUTRAL_JITTER
        row[GRAY] = view.grayscale
        row[SIGMA] = view.blur_sigma or 0.0
        row[SOLARIZE] = view.solarize
    return table


def to_working_size(image: Image.Image, size: int) -> torch.Tensor:
    """The image resized to (size, size) with PIL's antialiased bicubic filter, as a (3, size, size) uint8 tensor."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    resized = image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """Crop every view's box out of its image and resize it to (size, size), bicubic, in one `grid_sample`.

    Output pixel j of a view samples the source at box_left + (j + 0.5) / size * box_width (in fractions of the
    source), the pixel-centre convention of PIL's `resize(box=...)`; a flipped view reads column size - 1 - j.

    Args:
        images: (B, 3, S, S) float sources in [0, 1].
        boxes: (n, B, 4) boxes (left, top, right, bottom) as fractions of the source, view-major.
        flips: (n, B) bool.
        size: output side.

    Returns:
        (n * B, 3, size, size) views in [0, 1], view-major (row v * B + b is view v of image b).
    """
    n, batch = boxes.shape[:2]
    centres = (torch.arange(size, device=images.device, dtype=images.dtype) + 0.5) / size  # (size,)
    left, top, right, bottom = boxes.unbind(-1)  # (n, B) each
    across = torch.where(flips.unsqueeze(-1), 1.0 - centres, centres)  # (n, B, size)
    x = (left.unsqueeze(-1) + across * (right - left).unsqueeze(-1)) * 2.0 - 1.0  # grid_sample's [-1, 1]
    y = (top.unsqueeze(-1) + centres * (bottom - top).unsqueeze(-1)) * 2.0 - 1.0
    grid = torch.stack(torch.broadcast_tensors(x.unsqueeze(-2), y.unsqueeze(-1)), dim=-1)  # (n, B, size, size, 2)
    # The n views of an image are stacked along the grid's height, so each source is read in place, not copied n
    # times: (B, n * size, size, 2) -> (B, 3, n * size, size).
    grid = grid.transpose(0, 1).reshape(batch, n * size, size, 2)
    # "border" repeats edge pixels for the bicubic taps that fall outside, as PIL clamps at the image edge.
    out = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    out = out.view(batch, 3, n, size, size).permute(2, 0, 1, 3, 4).reshape(n * batch, 3, size, size)
    return out.clamp_(0.0, 1.0)  # bicubic overshoots; PIL clips to the 8-bit range too


def _per_view(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def batch_color_jitter(img: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """ColorJitter with each view's own order and factors, on (R, 3, H, W) views and (R, NUM_COLUMNS) draws.

    At each of the 4 positions of the order, each op runs on the whole batch with a neutral factor for the views
    that do not apply it there: brightness, contrast and saturation at factor 1 return their input exactly, so no
    selection is needed; the hue shift is selected per view, as a shift of 0 is the identity only up to rounding.
    """
    jittered = table[:, JITTER] > 0.5
    order, factors = table[:, ORDER], table[:, FACTORS]
    linear_ops = (adjust_brightness, adjust_contrast, adjust_saturation)
    for position in range(4):
        chosen = order[:, position]
        for op_index, op in enumerate(linear_ops):
            here = jittered & (chosen == op_index)
            img = op(img, _per_view(torch.where(here, factors[:, op_index], 1.0)))
        here = _per_view(jittered & (chosen == 3))
        img = torch.where(here, adjust_hue(img, _per_view(factors[:, 3])), img)
    return img


def gaussian_taps(sigma: torch.Tensor, max_radius: int, limit: int) -> torch.Tensor:
    """Per-view normalised Gaussian taps (R, 2 * max_radius + 1), each cut at the view's own radius.

    A view's radius is ceil(3 sigma), at least 1 and at most `limit` (= side - 1, as reflect padding must stay
    inside the image): the taps of `augment.gaussian_blur`, zero-padded to the widest view's length. Views with
    sigma 0 get the identity (a single 1).
    """
    offsets = torch.arange(-max_radius, max_radius + 1, device=sigma.device, dtype=sigma.dtype)  # (T,)
    blurred = sigma > 0
    safe = torch.where(blurred, sigma, 1.0).unsqueeze(-1)  # (R, 1)
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


def batch_pixel_ops(img: torch.Tensor, table: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Jitter, grayscale, blur and solarization of (R, 3, H, W) views in [0, 1], as `augment.apply_pixel_ops`."""
    img = batch_color_jitter(img, table)
    img = torch.where(_per_view(table[:, GRAY] > 0.5), grayscale(img), img)
    img = batch_gaussian_blur(img, table[:, SIGMA], max_sigma)
    return torch.where(_per_view(table[:, SOLARIZE] > 0.5), solarize(img), img)


class BatchAugmentation:
    """Renders the views of a batch on its device from working-size images and encoded draws.

    Args:
        augmentation: the per-image augmentation whose draws the workers encoded (sizes, blur range, mean, std).
    """

    def __init__(self, augmentation: MultiCropAugmentation) -> None:
        self.augmentation = augmentation

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """All views of a batch, crop-major as `data.collate_crops` stacks them.

        Args:
            images: (B, 3, S, S) uint8 working-size images.
            views: (B, V, NUM_COLUMNS) encoded draws, globals first.

        Returns:
            (2 * B, 3, H, H) normalised global views and (L * B, 3, h, h) local views (None without locals).
        """
        aug = self.augmentation
        source = images.float().div_(255.0)
        by_view = views.transpose(0, 1)  # (V, B, C)
        global_views = self._render(source, by_view[:2], aug.global_size)
        local_views = self._render(source, by_view[2:], aug.local_size) if aug.num_local_crops else None
        return global_views, local_views

    def _render(self, source: torch.Tensor, views: torch.Tensor, size: int) -> torch.Tensor:
        crops = resized_crops(source, views[..., BOX], views[..., FLIP] > 0.5, size)
        crops = batch_pixel_ops(crops, views.reshape(-1, NUM_COLUMNS), self.augmentation.blur_sigma[1])
        return normalize(crops, self.augmentation.mean, self.augmentation.std)
