"""The translation pipeline's ViT (pre-norm `nn.MultiheadAttention` blocks, LayerNorm eps 1e-5), for tests
that load exports the way the pipeline does."""

from __future__ import annotations

import torch
from torch import nn


class ConsumerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)  # eps 1e-5
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim),
                                 nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ConsumerViT(nn.Module):
    """The translation pipeline's backbone, built from an export's metadata['backbone']."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, **_: float) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (image_size // patch_size) ** 2, embed_dim))
        self.blocks = nn.ModuleList(ConsumerBlock(embed_dim, num_heads, int(embed_dim * mlp_ratio))
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]


