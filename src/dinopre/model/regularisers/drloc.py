"""Drloc (Liu et al., "Efficient Training of Visual Transformers with Small Datasets", NeurIPS 2021): a
training-only head, never exported, predicts how far apart two of the student's patch tokens of a global view lie
on the patch grid."""

from __future__ import annotations

import torch
from torch import nn

from dinopre.config.settings import PretrainConfig
from dinopre.model.regularisers.regulariser import Regulariser, StudentGlobals

DRLOC_PAIRS = 64  # token pairs per view (Liu et al. 2021 sample a few dozen): as many as the 8 x 8 grid of a 64 px crop


class LocalisationHead(nn.Module):
    """A training-only MLP that reads two patch tokens and predicts how far apart they lie on the patch grid.

    The pair's concatenated tokens (2 x in_dim) -> hidden -> hidden -> (drow, dcol), ReLU, as in the paper. Solving
    it needs tokens that know where they are relative to each other, the spatial structure a ViT otherwise lacks
    early on small data. Never exported.

    Args:
        in_dim: backbone token width.
        hidden_dim: width of the two hidden layers (512 in the paper).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 512) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2 * in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.ReLU(), nn.Linear(hidden_dim, 2))

    def forward(self, tokens: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """(B, N, D) tokens and (B, P, 2) index pairs -> (B, P, 2) predicted offsets of the first from the second."""
        index = pairs.flatten(1).unsqueeze(-1).expand(-1, -1, tokens.shape[-1])  # (B, 2P, D)
        picked = tokens.gather(1, index).unflatten(1, pairs.shape[1:])  # (B, P, 2, D)
        return self.mlp(picked.flatten(-2))


def sample_token_pairs(batch: int, num_tokens: int, pairs: int, device: torch.device) -> torch.Tensor:
    """(batch, pairs, 2) indices of token pairs, drawn uniformly with replacement from the global generator (whose
    state the checkpoints carry, so a resumed run draws the same pairs)."""
    return torch.randint(num_tokens, (batch, pairs, 2), device=device)


def relative_offsets(pairs: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(..., 2) token-index pairs on a (rows, cols) grid -> (..., 2) offsets (drow / rows, dcol / cols) of the first
    token from the second, each in (-1, 1): Drloc's targets (Liu et al., NeurIPS 2021, eq. 2)."""
    rows, cols = grid
    first, second = pairs.unbind(-1)
    drow = torch.div(first, cols, rounding_mode="floor") - torch.div(second, cols, rounding_mode="floor")
    dcol = first % cols - second % cols
    return torch.stack([drow / rows, dcol / cols], dim=-1).float()


def localisation_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Drloc's loss: the L1 distance between predicted and true (..., 2) offsets, averaged over pairs, in fp32."""
    with torch.autocast(predicted.device.type, enabled=False):
        return (predicted.float() - target.float()).abs().sum(-1).mean()


class Drloc(Regulariser):
    """Drloc on the student's patch tokens of the global views (masked ones for iBOT)."""

    name = "drloc"
    needs_patch_tokens = True
    head: LocalisationHead

    def loss(self, student: StudentGlobals) -> torch.Tensor:
        """`localisation_loss` of DRLOC_PAIRS random token pairs per view, drawn now from the global generator."""
        tokens = student.patch_tokens
        if tokens is None:
            raise ValueError("Drloc reads the student's patch tokens, and none were computed.")
        pairs = sample_token_pairs(tokens.shape[0], tokens.shape[1], DRLOC_PAIRS, tokens.device)
        return localisation_loss(self.head(tokens, pairs), relative_offsets(pairs, student.grid))


def build(config: PretrainConfig) -> Drloc | None:
    """Drloc at `drloc_weight` with a fresh head, or None when that is 0."""
    weight = config.method.drloc_weight
    return Drloc(weight, LocalisationHead(config.model.vit_embed_dim)) if weight > 0 else None
