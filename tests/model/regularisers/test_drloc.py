"""Tests of Drloc (dinopre.model.regularisers.drloc): its targets, loss, token pairs and head."""

from __future__ import annotations

import pytest
import torch

from dinopre.model.regularisers.drloc import LocalisationHead, localisation_loss, relative_offsets, sample_token_pairs

IN_DIM = 32


def test_relative_offsets_are_drloc_targets_on_a_row_major_grid() -> None:
    """Token t of a (rows, cols) grid sits at (t // cols, t % cols); the target is the first token's position minus
    the second's, divided by the grid's side (Liu et al. 2021, eq. 2)."""
    grid = (3, 4)  # tokens 0..11; token 11 is (2, 3), token 4 is (1, 0)
    pairs = torch.tensor([[[11, 0], [0, 11], [4, 4], [4, 3]]])
    expected = torch.tensor([[[2 / 3, 3 / 4], [-2 / 3, -3 / 4], [0.0, 0.0], [1 / 3, -3 / 4]]])
    torch.testing.assert_close(relative_offsets(pairs, grid), expected)


def test_localisation_loss_is_the_mean_l1_distance_per_pair() -> None:
    predicted = torch.tensor([[[0.5, -0.5], [0.0, 0.25]]])
    target = torch.tensor([[[0.0, 0.0], [0.0, -0.25]]])
    assert localisation_loss(predicted, target).item() == pytest.approx((1.0 + 0.5) / 2)
    assert localisation_loss(target, target).item() == 0.0


def test_token_pairs_come_from_the_global_generator() -> None:
    """A resumed run restores the global generator, so it must draw the same pairs again."""
    torch.manual_seed(3)
    first = sample_token_pairs(4, 16, 8, torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(sample_token_pairs(4, 16, 8, torch.device("cpu")), first)
    assert first.shape == (4, 8, 2) and first.min() >= 0 and first.max() < 16


def test_the_localisation_head_reads_the_two_tokens_of_each_pair_in_order() -> None:
    torch.manual_seed(0)
    head = LocalisationHead(IN_DIM, hidden_dim=16)
    tokens = torch.randn(2, 9, IN_DIM)
    pairs = torch.tensor([[[0, 8], [3, 3]], [[5, 1], [1, 5]]])
    expected = torch.stack([torch.stack([head.mlp(torch.cat([tokens[b, i], tokens[b, j]])) for i, j in pairs[b]])
                            for b in range(2)])
    torch.testing.assert_close(head(tokens, pairs), expected)
    assert not torch.allclose(head(tokens, pairs.flip(-1)), expected)  # (i, j) and (j, i) are different questions
