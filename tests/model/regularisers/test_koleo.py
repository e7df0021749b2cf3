"""Tests of KoLeo (dinopre.model.regularisers.koleo) against DINOv2's `KoLeoLoss`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F


def reference_koleo(features: torch.Tensor, eps: float = 1e-8) -> float:
    """dinov2 loss/koleo_loss.py `KoLeoLoss` written out with loops, in float64."""
    x = F.normalize(features.double(), dim=-1, eps=eps)
    total = 0.0
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        j = max(others, key=lambda j: float(x[i] @ x[j]))
        total += -math.log(float(torch.linalg.vector_norm(x[i] - x[j] + eps)) + eps)
    return total / len(x)


def test_koleo_equals_the_formula_and_stays_finite_on_duplicates() -> None:
    from dinopre.model.regularisers.koleo import koleo_loss

    features = torch.randn(12, 8, generator=torch.Generator().manual_seed(6))
    assert koleo_loss(features).item() == pytest.approx(reference_koleo(features), rel=1e-4)
    duplicates = torch.cat([features[:3], features[:3]])
    assert math.isfinite(koleo_loss(duplicates).item())  # near-identical video frames (dinov2#143)
    spread = koleo_loss(torch.eye(8) * 3)
    squeezed = koleo_loss(torch.eye(8) * 3 + 10)  # the same points crowded into one direction
    assert spread.item() < squeezed.item()  # KoLeo prefers features spread apart
    features.requires_grad_(True)
    koleo_loss(features).backward()
    assert torch.isfinite(features.grad).all()
