"""Tests of the batched crop-and-resize (dinopre.data.resample) against Pillow's `Image.resize(box=...)` itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinopre.data.resample import bicubic, resample_weights, resize_boxes


def smooth_image(width: int, height: int, seed: int) -> Image.Image:
    """Photo-like content: noise blurred by an up-scale, so no bicubic overshoot is clipped (see resample.py)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (height // 4 + 2, width // 4 + 2, 3), dtype=np.uint8))
    return coarse.resize((width, height), Image.Resampling.BICUBIC)


def as_float(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0


def test_the_kernel_is_pillows_bicubic() -> None:
    x = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, -0.5, 3.0])
    expected = torch.tensor([1.0, 0.5625, 0.0, -0.0625, 0.0, 0.5625, 0.0])  # Keys' cubic with a = -0.5
    torch.testing.assert_close(bicubic(x), expected)


def test_weights_sum_to_one_and_stay_inside_the_image() -> None:
    weights = resample_weights(torch.tensor([0.0, 30.0]), torch.tensor([40.0, 50.0]), torch.tensor([40.0, 50.0]),
                               out_size=8, in_size=64)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 8))
    assert weights[0, :, 40:].eq(0).all() and weights[1, :, 50:].eq(0).all()  # zero over the padding


@pytest.mark.parametrize("size", [7, 24, 64])
def test_batched_boxes_are_pillows_resizes(size: int) -> None:
    """Sources of different sizes in one padded batch, boxes that shrink and enlarge, flipped and not:
    every view is Pillow's resize of its box within two levels of 255 (Pillow 13 sometimes resizes rows before
    columns, and its fixed-point weights round differently), nearly every pixel exactly."""
    sizes = [(60, 40), (33, 70), (80, 80)]
    images = [smooth_image(w, h, seed) for seed, (w, h) in enumerate(sizes)]
    batch = torch.zeros(3, 3, 80, 80)
    for slot, image in zip(batch, images, strict=True):
        slot[:, : image.size[1], : image.size[0]] = as_float(image)
    rng = np.random.default_rng(size)
    boxes, flips = [], []
    for view in range(3):
        row = []
        for width, height in sizes:
            left, top = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
            row.append((left, top, int(rng.integers(left + 2, width + 1)), int(rng.integers(top + 2, height + 1))))
        boxes.append(row)
        flips.append([view == 1] * 3)
    extents = torch.tensor([sizes] * 3, dtype=torch.float32)
    out = resize_boxes(batch, torch.tensor(boxes, dtype=torch.float32), extents, torch.tensor(flips), size)
    assert out.shape == (9, 3, size, size)
    for view in range(3):
        for index, image in enumerate(images):
            expected = image.resize((size, size), Image.Resampling.BICUBIC, box=boxes[view][index])
            if flips[view][index]:
                expected = expected.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            difference = (out[view * 3 + index] - as_float(expected)).abs()
            assert difference.max() <= 2.01 / 255 and difference.mean() < 0.3 / 255, (view, index)


def test_outputs_are_8_bit_levels_in_range() -> None:
    image = as_float(smooth_image(20, 20, 3)).unsqueeze(0)
    out = resize_boxes(image, torch.tensor([[[2.0, 2.0, 18.0, 18.0]]]), torch.tensor([[[20.0, 20.0]]]),
                       torch.tensor([[False]]), 40)
    levels = out * 255
    assert torch.equal(levels, levels.round()) and out.min() >= 0 and out.max() <= 1
