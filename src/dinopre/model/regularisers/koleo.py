"""KoLeo (Sablayrolles et al. 2019, as in DINOv2): spreads the student's global-view CLS features apart by pushing
each image away from its nearest neighbour in the batch. No head.

Over the global batch by default: with several processes each gathers every process's features (with their
gradients, `distributed.all_gather_with_grad`), so the nearest neighbours, hence the run, do not depend on the
number of processes. DINOv2 computes it per process; runs started so (`regulariser_scope` "process") continue so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dinopre.base.distributed import all_gather_with_grad
from dinopre.config.settings import PretrainConfig
from dinopre.model.regularisers.regulariser import Regulariser, StudentGlobals


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser of one view's (B, D) features: -mean_i log ||x_i - x_nn(i)|| on L2-normalised x, fp32.

    The nearest neighbour excludes the image itself (DINOv2 sets the diagonal of the similarities to -1). Needs at
    least 2 rows; eps keeps an exact duplicate at -log(eps) instead of infinity (dinov2#143).
    """
    with torch.autocast(features.device.type, enabled=False):
        x = F.normalize(features.float(), dim=-1, eps=eps)
        similarity = x @ x.t()
        similarity.fill_diagonal_(-1.0)
        nearest = similarity.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
        return -torch.log(distances + eps).mean()


class KoLeo(Regulariser):
    """KoLeo on each global view's CLS features separately (DINOv2), summed over the views.

    Args:
        weight: the term's weight in the total.
        scope: `global` (every process's images) or `process` (this process's only).
    """

    name = "koleo"

    def __init__(self, weight: float, scope: str = "global") -> None:
        super().__init__(weight)
        self.scope = scope

    def loss(self, student: StudentGlobals) -> torch.Tensor:
        """The sum over the global views of `koleo_loss`."""
        views = student.cls.chunk(student.views)
        if self.scope == "global":
            views = tuple(all_gather_with_grad(view) for view in views)
        # Python's sum (0 + view 1 + view 2): the same additions, hence the same bits, as every run so far made.
        return sum(koleo_loss(view) for view in views)  # type: ignore[return-value]


def build(config: PretrainConfig) -> KoLeo | None:
    """KoLeo at `koleo_weight`, or None when that is 0."""
    weight = config.method.koleo_weight
    return KoLeo(weight, config.method.regulariser_scope or "global") if weight > 0 else None
