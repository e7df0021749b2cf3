"""Self-distillation losses. All maths in fp32, temperatures are arguments, centers are saved state.

DINO (Caron et al. 2021, dino main_dino.py `DINOLoss`): for teacher global view q and student view v != q,
    loss = mean over pairs and batch of  - sum_k softmax((t_q - c) / tau_t)[k] * log_softmax(s_v / tau_s)[k]
and afterwards the center c <- m c + (1 - m) mean(teacher logits) (so each step uses the previous center).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinopre.runtime import all_reduce_mean


class DINOLoss(nn.Module):
    """Cross-view CLS loss with centering and sharpening of the teacher.

    Args:
        out_dim: number of prototypes K.
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA momentum of the center (0.9).
    """

    def __init__(self, out_dim: int, *, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        *,
        num_student_views: int,
        teacher_temp: float,
        update_center: bool = True,
    ) -> torch.Tensor:
        """Loss over all (teacher global q, student view v != q) pairs, then the center update.

        Args:
            student_logits: (V*B, K) crop-major student logits: V views (the 2 globals first), B images each.
            teacher_logits: (G*B, K) crop-major teacher logits of the G global views.
            num_student_views: V.
            teacher_temp: teacher temperature for this step.
            update_center: update the center after computing the loss.

        Returns:
            Scalar fp32 loss.
        """
        num_global = teacher_logits.shape[0] * num_student_views // student_logits.shape[0]
        student_logp = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        student_logp = student_logp.unflatten(0, (num_student_views, -1))  # (V, B, K)
        teacher_p = F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1).detach()
        teacher_p = teacher_p.unflatten(0, (num_global, -1))  # (G, B, K)
        # Sum over every (q, v) pair = <sum_q t_q, sum_v s_v> - sum_q <t_q, s_q>: one pass over (B, K) per view
        # instead of one per pair (18 for 2 + 8 crops); equal to dino's double loop (tests/test_losses.py).
        all_pairs = (teacher_p.sum(0) * student_logp.sum(0)).sum(-1)  # (B,)
        same_view = (teacher_p * student_logp[:num_global]).sum(-1).sum(0)  # (B,)
        num_pairs = num_global * num_student_views - num_global
        loss = -(all_pairs - same_view).mean() / num_pairs
        if update_center:
            self.update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean of this step's teacher logits (over all processes)."""
        batch_center = all_reduce_mean(teacher_logits.float().mean(dim=0, keepdim=True))  # (1, K)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


@torch.no_grad()
def teacher_diagnostics(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> dict[str, torch.Tensor]:
    """Collapse signals (dino_ibot.md section 5, problem 1), computed without host synchronisation.

    Returns:
        `teacher_entropy`: mean entropy of the centered, sharpened teacher distribution (ln K = uniform collapse);
        `prototypes_used`: how many distinct prototypes win the argmax over the teacher rows (1 = one-hot collapse).
    """
    p = F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
    winners = torch.zeros(p.shape[-1], device=p.device).index_fill_(0, p.argmax(-1), 1.0)
    return {"teacher_entropy": entropy, "prototypes_used": winners.sum()}
