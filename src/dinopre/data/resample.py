"""Crop-and-resize of many boxes at once with Pillow's antialiased bicubic arithmetic, as two matrix products.

Pillow resizes separably: each output pixel j along an axis is a normalised weighted sum of the source pixels
around `centre = box_start + (j + 0.5) * scale`, with the bicubic kernel (a = -0.5) stretched by
`max(scale, 1)` when shrinking, which is what makes its downscaling antialiased (Pillow `Resample.c`
`precompute_coeffs`). Writing those weights as a dense (out x in) matrix per view turns a batch of crops of
different boxes and different source sizes into batched matrix products, which run well on a GPU and on a CPU.
Sources of different sizes share one zero-padded tensor: a view's weights are zero beyond its own image.

Like Pillow's classic two-pass code, it resamples along x first and keeps the intermediate image in 8 bits (clipped
and rounded). The result equals `Image.resize((size, size), Image.Resampling.BICUBIC, box=box)` within two levels
of 255 on photo-like content, most pixels exactly (tests/data/test_resample.py): Pillow rounds its fixed-point weights
and, in recent versions, sometimes resizes rows first, which matters where a clipped overshoot differs (on pure
noise, up to ~15 levels at a few pixels).
"""

from __future__ import annotations

import torch

BICUBIC_A = -0.5  # Pillow's bicubic constant (torch's bicubic interpolation uses -0.75)
BICUBIC_SUPPORT = 2.0


def bicubic(x: torch.Tensor) -> torch.Tensor:
    """Pillow's bicubic kernel (Keys, a = -0.5): 1 at 0, 0 at the integers, 0 beyond |x| = 2."""
    x = x.abs()
    a = BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resample_weights(start: torch.Tensor, end: torch.Tensor, extent: torch.Tensor, out_size: int,
                     in_size: int) -> torch.Tensor:
    """Per-row resampling matrices along one axis, Pillow's `precompute_coeffs` for every row at once.

    Args:
        start: (R,) box start in source pixels (left or top).
        end: (R,) box end in source pixels (right or bottom).
        extent: (R,) the source image's size along the axis; pixels at and beyond it are padding.
        out_size: output pixels along the axis.
        in_size: the (padded) source length along the axis.

    Returns:
        (R, out_size, in_size) weights; each row of each matrix sums to 1 over the image's own pixels.
    """
    scale = ((end - start) / out_size).unsqueeze(-1)  # (R, 1)
    stretch = scale.clamp(min=1.0)  # shrinking widens the kernel: the antialiasing
    support = BICUBIC_SUPPORT * stretch
    centres = start.unsqueeze(-1) + (torch.arange(out_size, device=start.device, dtype=start.dtype) + 0.5) * scale
    first = torch.floor(centres - support + 0.5).clamp(min=0.0)  # (R, out), Pillow's "round the value"
    last = torch.minimum(torch.floor(centres + support + 0.5), extent.unsqueeze(-1))
    pixels = torch.arange(in_size, device=start.device, dtype=start.dtype)  # (in,)
    offsets = (pixels - centres.unsqueeze(-1) + 0.5) / stretch.unsqueeze(-1)  # (R, out, in)
    inside = (pixels >= first.unsqueeze(-1)) & (pixels < last.unsqueeze(-1))
    weights = torch.where(inside, bicubic(offsets), torch.zeros_like(offsets))
    total = weights.sum(-1, keepdim=True)
    return weights / torch.where(total != 0, total, torch.ones_like(total))


def resize_boxes(images: torch.Tensor, boxes: torch.Tensor, extents: torch.Tensor, flips: torch.Tensor,
                 size: int) -> torch.Tensor:
    """Crop every view's box out of its image, resize it to (size, size) and mirror the flipped ones.

    Args:
        images: (B, 3, H, W) float sources in [0, 1], zero-padded to a common size.
        boxes: (n, B, 4) boxes (left, top, right, bottom) in source pixels, view-major.
        extents: (n, B, 2) each view's image width and height (its unpadded size).
        flips: (n, B) bool: mirror left-right after resizing.
        size: output side.

    Returns:
        (n * B, 3, size, size) views in [0, 1], quantised to 1/255 as Pillow's 8-bit output is, view-major (row
        v * B + b is view v of image b).
    """
    n, batch = boxes.shape[:2]
    _, _, height, width = images.shape
    by_image = boxes.transpose(0, 1).reshape(-1, 4)  # (B * n, 4), image-major
    sizes = extents.transpose(0, 1).reshape(-1, 2)
    across = resample_weights(by_image[:, 0], by_image[:, 2], sizes[:, 0], size, width)  # (B * n, size, W)
    mirrored = flips.transpose(0, 1).reshape(-1, 1, 1)
    across = torch.where(mirrored, across.flip(-2), across)
    down = resample_weights(by_image[:, 1], by_image[:, 3], sizes[:, 1], size, height)  # (B * n, size, H)
    # Columns first, as Pillow does, all n views of an image in one product: (B, 3 * H, W) @ (B, W, n * size).
    columns = torch.bmm(images.reshape(batch, 3 * height, width),
                        across.view(batch, n * size, width).transpose(1, 2))
    # Pillow keeps the intermediate image in 8 bits: clip the bicubic overshoot and round, as it does.
    columns = _to_8_bit(columns).view(batch, 3, height, n, size).permute(0, 3, 2, 1, 4)  # (B, n, H, 3, size)
    # Then rows, one product per view: (B * n, size, H) @ (B * n, H, 3 * size).
    out = torch.bmm(down, columns.reshape(batch * n, height, 3 * size))
    out = out.view(batch, n, size, 3, size).permute(1, 0, 3, 2, 4).reshape(n * batch, 3, size, size)
    return _to_8_bit(out)


def _to_8_bit(values: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 1] and round to the nearest of the 256 levels, in place."""
    return values.clamp_(0.0, 1.0).mul_(255.0).round_().div_(255.0)
