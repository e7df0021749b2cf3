"""iBOT patch masks, drawn in the data step for the global crops (iBOT loader.py `ImageFolderMask`).

Per global view: with probability `probability` the view is masked, with a share of its patches drawn uniformly
in `ratio_range`; otherwise it is left unmasked. This is the iBOT ViT-S recipe `--pred_ratio 0 0.3
--pred_ratio_var 0 0.2` (half the views unmasked, the rest at U(0.1, 0.5)), written as the two numbers it means.

`block` masks are BEiT/iBOT's: rectangles of at least (min(H, W) // 3)^2 patches with aspect ratio in
(0.3, 1/0.3) are added until the target count is reached or 10 attempts in a row add nothing, so the count can
fall a little short of the target. On a face crop's 7x7 grid the minimum block is 2x2. `rand` masks pick exactly
round-down(ratio x H x W) patches uniformly. All draws come from the sample's own generator (seed, epoch, index).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

MASK_SHAPES = ("block", "rand")
_ASPECT = (0.3, 1 / 0.3)
_ATTEMPTS = 10


def _add_block(rng: np.random.Generator, mask: np.ndarray, budget: float) -> int:
    """Try up to 10 times to add one rectangle that masks between 1 and `budget` new patches.

    Returns:
        The number of newly masked patches (0 if every attempt failed).
    """
    height, width = mask.shape
    low = (min(height, width) // 3) ** 2
    for _ in range(_ATTEMPTS):
        # Python's random.uniform(low, budget) as iBOT uses it: also defined when budget < low.
        area = low + (budget - low) * rng.random()
        aspect = math.exp(rng.uniform(math.log(_ASPECT[0]), math.log(_ASPECT[1])))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if 0 < h < height and 0 < w < width:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            window = mask[top : top + h, left : left + w]
            new = h * w - int(window.sum())
            if 0 < new <= budget:
                window[...] = True
                return new
    return 0


def block_mask(rng: np.random.Generator, height: int, width: int, ratio: float) -> np.ndarray:
    """A union of rectangles covering about `ratio` of an (height x width) grid.

    Returns:
        (height, width) bool array, True = masked.
    """
    mask = np.zeros((height, width), dtype=bool)
    target = ratio * height * width
    count = 0
    while count < target:
        added = _add_block(rng, mask, target - count)
        if added == 0:
            break
        count += added
    return mask


def random_mask(rng: np.random.Generator, height: int, width: int, ratio: float) -> np.ndarray:
    """Exactly int(ratio x height x width) patches masked uniformly at random."""
    total = height * width
    mask = np.zeros(total, dtype=bool)
    mask[rng.choice(total, size=int(ratio * total), replace=False)] = True
    return mask.reshape(height, width)


@dataclass(frozen=True)
class MaskSampler:
    """Draws one global view's patch mask.

    Attributes:
        grid: token grid side of a global view (image_size // patch_size).
        probability: share of views that are masked at all.
        ratio_range: (min, max) share of patches masked in a masked view.
        shape: `block` or `rand`.
    """

    grid: int
    probability: float = 0.5
    ratio_range: tuple[float, float] = (0.1, 0.5)
    shape: str = "block"

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """(grid * grid,) bool mask in row-major patch order, the order of the backbone's tokens."""
        if rng.random() >= self.probability:
            return np.zeros(self.grid * self.grid, dtype=bool)
        ratio = rng.uniform(*self.ratio_range)
        draw = block_mask if self.shape == "block" else random_mask
        return draw(rng, self.grid, self.grid, ratio).reshape(-1)


@dataclass(frozen=True)
class MaskIndex:
    """Where the masked patches of a batch are, as fixed index tensors built on the host.

    Boolean indexing (`tokens[masks]`) makes a CUDA device wait for the host to learn how many rows come out, once
    per call. Built in the data step on the CPU, the flat indices carry that count in their shape, so gathering
    with them (`index_select`) never synchronises (DINOv2 collates `mask_indices_list` for the same reason).

    Attributes:
        flat: (M,) int64 positions of the masked patches in the flattened (G*B*N) token order, ascending, i.e. the
            order of `masks[masks]`.
        weights: (M,) float32 weight of each masked patch in the iBOT patch loss: 1 / (masked patches of its image)
            / (G*B images), so images count equally and unmasked images count zero.
    """

    flat: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def from_masks(cls, masks: torch.Tensor) -> MaskIndex:
        """The index of (G*B, N) bool masks. On a CUDA tensor this synchronises once; the data step calls it on CPU."""
        counts = masks.sum(dim=1, keepdim=True).clamp_min(1)  # (G*B, 1)
        flat = masks.reshape(-1).nonzero().squeeze(1)
        weights = (masks.float() / counts / masks.shape[0]).reshape(-1).index_select(0, flat)
        return cls(flat, weights)

    @property
    def count(self) -> int:
        """M, the number of masked patches (known on the host without synchronising)."""
        return self.flat.shape[0]

    def map(self, fn) -> MaskIndex:
        """Apply `fn` to both tensors (pinning, device copies)."""
        return MaskIndex(fn(self.flat), fn(self.weights))
