"""A contrastive loss between the student's global views (SimCLR's InfoNCE, Chen et al. 2020) through a
training-only projection head, which is never exported.

Its negatives are the global batch by default: with several processes each gathers every process's embeddings
(with their gradients), so the loss does not depend on the number of processes, as SimCLR does across devices.
Runs started with per-process negatives (`regulariser_scope` "process") continue so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinopre.base.distributed import all_gather_with_grad
from dinopre.config.settings import PretrainConfig
from dinopre.model.regularisers.regulariser import Regulariser, StudentGlobals

CONTRAST_DIM = 128  # SimCLR's projection width


class ProjectionHead(nn.Module):
    """A training-only MLP (in -> hidden -> out, GELU) that maps backbone features to a contrastive embedding.

    Args:
        in_dim: backbone feature width.
        hidden_dim: hidden width.
        out_dim: embedding width.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(R, in_dim) features -> (R, out_dim) embeddings."""
        return self.mlp(x)


def info_nce(embeddings: torch.Tensor, num_views: int, temperature: float) -> torch.Tensor:
    """Contrastive loss of crop-major (V*B, d) embeddings (SimCLR's NT-Xent, Chen et al. 2020), in fp32.

    Each row must pick out the other views of its own image among all rows of the batch (its own row excluded):
    -log of the softmax weight, at `temperature`, of its positives, averaged over positives and rows. In-batch
    negatives only: `Contrast` gathers the rows of every process first when its scope is global.
    """
    with torch.autocast(embeddings.device.type, enabled=False):
        z = F.normalize(embeddings.float(), dim=-1)
        rows = z.shape[0]
        image = torch.arange(rows, device=z.device) % (rows // num_views)  # crop-major: row r is image r % B
        logits = (z @ z.t()) / temperature
        self_mask = torch.eye(rows, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))
        positives = (image[:, None] == image[None, :]) & ~self_mask
        log_p = F.log_softmax(logits, dim=1)
        return -(log_p.masked_fill(~positives, 0.0).sum(1) / positives.sum(1)).mean()


class Contrast(Regulariser):
    """InfoNCE between the global views' projected CLS features.

    Args:
        weight: the term's weight in the total.
        head: the projection head.
        temperature: the softmax temperature of `info_nce`.
    """

    name = "contrast"
    head: ProjectionHead

    def __init__(self, weight: float, head: ProjectionHead, temperature: float, scope: str = "global") -> None:
        super().__init__(weight, head)
        self.temperature = temperature
        self.scope = scope

    def loss(self, student: StudentGlobals) -> torch.Tensor:
        """`info_nce` of the projected CLS features, each image's other global views its positives."""
        embeddings = self.head(student.cls)
        if self.scope == "global":  # view by view, so the rows stay crop-major over the global batch
            embeddings = torch.cat([all_gather_with_grad(view) for view in embeddings.chunk(student.views)])
        return info_nce(embeddings, student.views, self.temperature)


def build(config: PretrainConfig) -> Contrast | None:
    """The contrastive term at `contrast_weight` with a fresh head, or None when that is 0."""
    m, method = config.model, config.method
    if not method.contrast_weight > 0:
        return None
    head = ProjectionHead(m.vit_embed_dim, m.head_hidden_dim, CONTRAST_DIM)
    return Contrast(method.contrast_weight, head, method.contrast_temperature, method.regulariser_scope or "global")
