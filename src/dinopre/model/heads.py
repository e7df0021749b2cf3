"""DINO projection head (Caron et al. 2021, dino vision_transformer.py `DINOHead`).

MLP (in -> hidden -> hidden -> bottleneck, GELU) -> L2 normalisation -> weight-normalised prototype layer with K
outputs and no bias. With `norm_last_layer` the prototype norms g are frozen at 1, so each logit is a cosine
similarity in [-1, 1]: the safe default (dino README; ibot#19 NaNs went away with it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose rows are g * v / ||v|| (Salimans & Kingma 2016).

    Written out instead of `torch.nn.utils.weight_norm` (deprecated) or its parametrization (which renames the
    parameters) so that checkpoints keep the official DINO names `weight_g` and `weight_v`.
    """

    def __init__(self, in_features: int, out_features: int, freeze_norm: bool) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not freeze_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * F.normalize(self.weight_v, dim=1)  # (K, bottleneck)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """Projection head mapping backbone features to K prototype logits.

    Args:
        in_dim: backbone feature width.
        out_dim: number of prototypes K.
        hidden_dim: MLP hidden width.
        bottleneck_dim: width before the L2 normalisation.
        norm_last_layer: freeze the prototype norms at 1.
        num_layers: Linear layers in the MLP (3 in DINO).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        num_layers: int = 3,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_dim), nn.GELU()]
            width = hidden_dim
        layers.append(nn.Linear(width, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(R, in_dim) features -> (R, K) fp32 logits."""
        x = self.mlp(x)
        # The prototype logits feed softmaxes at temperature 0.04: in bf16 their rounding (~3e-3) becomes 0.08
        # nats, so the normalisation and the last layer stay in fp32 like the rest of the loss maths.
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.normalize(x.float(), dim=-1, p=2)  # (R, bottleneck)
            return self.last_layer(x)
