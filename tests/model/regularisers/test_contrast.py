"""Tests of the contrastive loss (dinopre.model.regularisers.contrast) against SimCLR's NT-Xent."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F


def reference_nt_xent(z: torch.Tensor, num_views: int, temperature: float) -> float:
    """SimCLR's NT-Xent written out row by row in float64: each row against every other row of the batch."""
    z = F.normalize(z.double(), dim=-1)
    rows, images = z.shape[0], z.shape[0] // num_views
    total, count = 0.0, 0
    for i in range(rows):
        others = [j for j in range(rows) if j != i]
        denominator = sum(math.exp(float(z[i] @ z[j]) / temperature) for j in others)
        for j in others:
            if j % images == i % images:  # another view of the same image
                total += -math.log(math.exp(float(z[i] @ z[j]) / temperature) / denominator)
                count += 1
    return total / count


@pytest.mark.parametrize("num_views", [2, 3])
def test_info_nce_equals_nt_xent(num_views: int) -> None:
    from dinopre.model.regularisers.contrast import info_nce

    z = torch.randn(num_views * 5, 8, generator=torch.Generator().manual_seed(7))
    assert info_nce(z, num_views, 0.2).item() == pytest.approx(reference_nt_xent(z, num_views, 0.2), rel=1e-5)


def test_info_nce_rewards_views_that_agree() -> None:
    from dinopre.model.regularisers.contrast import info_nce

    images = torch.randn(6, 16, generator=torch.Generator().manual_seed(8))
    agreeing = info_nce(torch.cat([images, images + 0.01]), 2, 0.2)
    random = info_nce(torch.randn(12, 16, generator=torch.Generator().manual_seed(9)), 2, 0.2)
    assert agreeing.item() < 0.5 < 2.0 < random.item()
