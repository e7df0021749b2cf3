"""Tests of the DINO projection head (dinopre.model.heads): shapes, cosine logits, the frozen prototype norms, names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinopre.model.heads import DINOHead

IN_DIM, K, HIDDEN, BOTTLENECK = 32, 64, 64, 16


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_head(norm_last_layer: bool = True, seed: int = 0, **kwargs: int) -> DINOHead:
    """A 32 -> 64 -> 64 -> 16 -> K=64 DINO head."""
    torch.manual_seed(seed)
    return DINOHead(IN_DIM, K, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK, norm_last_layer=norm_last_layer, **kwargs)


def features(rows: int, scale: float = 1.0, seed: int = 1) -> torch.Tensor:
    """Random backbone features (rows, IN_DIM)."""
    return scale * torch.randn(rows, IN_DIM, generator=torch.Generator().manual_seed(seed))


def effective_prototypes(head: DINOHead) -> torch.Tensor:
    """The prototype matrix the last layer applies: g * v / ||v|| row-wise, (K, bottleneck)."""
    layer = head.last_layer
    return layer.weight_g * layer.weight_v / layer.weight_v.norm(dim=1, keepdim=True)


def test_output_shape() -> None:
    """(R, in_dim) features -> (R, K) logits."""
    head = tiny_head()
    assert head(features(7)).shape == (7, K)
    assert head(features(1)).shape == (1, K)


def test_mlp_layout() -> None:
    """num_layers Linear layers in -> hidden -> ... -> bottleneck with GELU between them (dino DINOHead)."""
    head = tiny_head(num_layers=3)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(IN_DIM, HIDDEN), (HIDDEN, HIDDEN),
                                                                    (HIDDEN, BOTTLENECK)]
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert head.last_layer.weight_v.shape == (K, BOTTLENECK) and head.last_layer.weight_g.shape == (K, 1)


def test_normed_last_layer_gives_unit_prototypes_and_cosine_logits() -> None:
    """norm_last_layer: each prototype has norm 1 and each logit is the cosine of the bottleneck and a prototype."""
    head = tiny_head(norm_last_layer=True)
    with torch.no_grad():
        head.last_layer.weight_v.mul_(torch.linspace(0.1, 50.0, K).unsqueeze(1))  # very different raw row norms
    prototypes = effective_prototypes(head)
    torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(K))
    x = features(9, scale=100.0)
    logits = head(x)
    assert logits.abs().max() <= 1.0 + 1e-6
    bottleneck = F.normalize(head.mlp(x), dim=-1)
    expected = F.cosine_similarity(bottleneck.unsqueeze(1), head.last_layer.weight_v.unsqueeze(0), dim=-1)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)


def test_logits_depend_on_bottleneck_direction_only() -> None:
    """The bottleneck is L2-normalised before the prototypes: logits = last_layer(z / ||z||), whatever ||z||."""
    head = tiny_head()
    x = features(4)
    with torch.no_grad():
        z = head.mlp(x)
        direct = head.last_layer(F.normalize(z, dim=-1))
        scaled = head.last_layer(F.normalize(13.0 * z, dim=-1))
        logits = head(x)
    torch.testing.assert_close(direct, scaled)
    torch.testing.assert_close(logits, direct)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_weight_g_frozen_only_with_norm_last_layer(norm_last_layer: bool) -> None:
    """weight_g starts at 1 and is frozen (requires_grad False) exactly when norm_last_layer is set."""
    head = tiny_head(norm_last_layer)
    assert head.last_layer.weight_g.requires_grad is (not norm_last_layer)
    assert head.last_layer.weight_v.requires_grad
    assert torch.equal(head.last_layer.weight_g, torch.ones(K, 1))


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_every_trainable_parameter_gets_a_gradient(norm_last_layer: bool) -> None:
    """Backward reaches every trainable parameter with finite, nonzero gradients; frozen weight_g gets none."""
    head = tiny_head(norm_last_layer)
    logits = head(features(6))
    target = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (logits * target).sum().backward()
    for name, p in head.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert (head.last_layer.weight_g.grad is None) is norm_last_layer


def test_unnormed_last_layer_scales_logits_by_g() -> None:
    """Without norm_last_layer, g is a learnable per-prototype scale: logits = g * cosine."""
    head = tiny_head(norm_last_layer=False)
    x = features(5)
    with torch.no_grad():
        cosine = head(x)
        head.last_layer.weight_g.copy_(torch.linspace(0.5, 4.0, K).unsqueeze(1))
        scaled = head(x)
    torch.testing.assert_close(scaled, cosine * torch.linspace(0.5, 4.0, K))


def test_parameter_names_follow_official_dino() -> None:
    """Checkpoints keep dino's names: last_layer.weight_g and last_layer.weight_v, no parametrizations."""
    head = tiny_head()
    names = [name for name, _ in head.named_parameters()]
    assert "last_layer.weight_g" in names and "last_layer.weight_v" in names
    assert not any("parametrizations" in name or "original" in name for name in head.state_dict())
    assert "last_layer.bias" not in names  # the prototype layer has no bias
