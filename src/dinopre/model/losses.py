"""Self-distillation losses. All maths in fp32, temperatures are arguments, centers are saved state.

DINO (Caron et al. 2021, dino main_dino.py `DINOLoss`): for teacher global view q and student view v != q,
    loss = mean over pairs and batch of  - sum_k softmax((t_q - c) / tau_t)[k] * log_softmax(s_v / tau_s)[k]
and afterwards the center c <- m c + (1 - m) mean(teacher logits) (so each step uses the previous center).

iBOT masked-patch loss (Zhou et al. 2022, ibot main_ibot.py `iBOTLoss`, patch part): for each global view, the
teacher's patch distributions on the unmasked view are the targets of the student's patch predictions on the
masked version of the same view, at masked positions only; per image the cross-entropy is averaged over its masked
patches, then averaged over all global images (unmasked images count as 0). The patch center is updated from the
mean over all of the teacher's patch tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinopre.base.distributed import all_reduce_max, all_reduce_mean, all_reduce_sum, world_size
from dinopre.config.settings import CENTERINGS
from dinopre.data.masking import MaskIndex

SINKHORN_ITERATIONS = 3  # DINOv2's n_iterations


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temperature: float, iterations: int = SINKHORN_ITERATIONS) -> torch.Tensor:
    """Teacher targets with equal prototype shares (DINOv2 `SinkhornKnoppTeacher`), in fp32.

    Q = exp(logits / T) as (K, B), scaled to sum 1; then `iterations` times: each row (prototype) to sum 1/K, each
    column (image) to sum 1/B; finally the columns to sum 1. Sums run over all processes. The global max is
    subtracted before exp (it cancels in the first normalisation) so that large logits cannot overflow; divisors
    are kept above the smallest normal float, so a prototype (or image) whose every entry underflowed stays 0
    instead of becoming NaN.

    Args:
        logits: (B, K) teacher logits of this process.
        temperature: teacher temperature.
        iterations: normalisation rounds.

    Returns:
        (B, K) target distributions (each row sums to 1).
    """
    scaled = logits.float() / temperature
    q = torch.exp(scaled - all_reduce_max(scaled.max())).t()  # (K, B)
    num_prototypes, total = q.shape[0], q.shape[1] * world_size()
    tiny = torch.finfo(q.dtype).tiny
    q /= all_reduce_sum(q.sum()).clamp_min(tiny)
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(tiny)
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)
        q /= total
    return (q * total).t()


class _CenteredLoss(nn.Module):
    """What the DINO and iBOT losses share: a student temperature and the teacher's centering.

    Args:
        out_dim: number of prototypes K.
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA momentum of the center (0.9).
        centering: `ema` (DINO: subtract a running mean of the teacher logits, then softmax) or `sinkhorn`
            (DINOv2's Sinkhorn-Knopp; the center is kept but not used or moved).
    """

    def __init__(self, out_dim: int, *, student_temp: float = 0.1, center_momentum: float = 0.9,
                 centering: str = "ema") -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ValueError(f"centering must be one of {CENTERINGS}, got {centering!r}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.centering = centering
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_targets(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(R, K) teacher distributions: centered softmax or Sinkhorn-Knopp, fp32, without gradient."""
        if self.centering == "sinkhorn":
            return sinkhorn_knopp(teacher_logits, teacher_temp)
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1).detach()

    @torch.no_grad()
    def _move_center(self, batch_center: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * this step's (1, K) mean, averaged over all processes."""
        batch_center = all_reduce_mean(batch_center)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


class DINOLoss(_CenteredLoss):
    """Cross-view CLS loss with centering and sharpening of the teacher (see `_CenteredLoss` for the arguments)."""

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
        teacher_p = self.teacher_targets(teacher_logits, teacher_temp).unflatten(0, (num_global, -1))  # (G, B, K)
        # Sum over every (q, v) pair = <sum_q t_q, sum_v s_v> - sum_q <t_q, s_q>: one pass over (B, K) per view
        # instead of one per pair (18 for 2 + 8 crops); equal to dino's double loop (tests/model/test_losses.py).
        all_pairs = (teacher_p.sum(0) * student_logp.sum(0)).sum(-1)  # (B,)
        same_view = (teacher_p * student_logp[:num_global]).sum(-1).sum(0)  # (B,)
        num_pairs = num_global * num_student_views - num_global
        loss = -(all_pairs - same_view).mean() / num_pairs
        if update_center and self.centering == "ema":
            self.update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """Move the center towards the mean of this step's teacher logits."""
        self._move_center(teacher_logits.float().mean(dim=0, keepdim=True))  # (1, K)


class IBOTPatchLoss(_CenteredLoss):
    """Masked-patch self-distillation loss with its own center (`out_dim` = prototypes of the patch head)."""

    def forward(
        self,
        student_masked_logits: torch.Tensor,
        teacher_patch_logits: torch.Tensor,
        masks: torch.Tensor | MaskIndex,
        *,
        teacher_temp: float,
        update_center: bool = True,
    ) -> torch.Tensor:
        """Cross-entropy between teacher and student patch distributions at the masked positions.

        Args:
            student_masked_logits: (M, K) student logits of the masked tokens, in `masks[masks]` order.
            teacher_patch_logits: (G*B, N, K) teacher logits of every patch of the unmasked global views.
            masks: (G*B, N) bool, True where the student's patch was masked (M = masks.sum()), or the batch's
                `MaskIndex` of them, which the training step passes so that nothing waits for the host.
            teacher_temp: teacher patch temperature of this step.
            update_center: update the patch center afterwards.

        Returns:
            Scalar fp32 loss.
        """
        index = masks if isinstance(masks, MaskIndex) else MaskIndex.from_masks(masks)
        teacher_masked = teacher_patch_logits.flatten(0, 1).index_select(0, index.flat).float()  # (M, K)
        teacher_p = self.teacher_targets(teacher_masked, teacher_temp)
        student_logp = F.log_softmax(student_masked_logits.float() / self.student_temp, dim=-1)  # (M, K)
        token_loss = -(teacher_p * student_logp).sum(-1)  # (M,)
        # Per-image mean over its masked tokens, then mean over all G*B images: the weights fold both in.
        loss = (token_loss * index.weights).sum()
        if update_center and self.centering == "ema":
            self.update_center(teacher_patch_logits)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_patch_logits: torch.Tensor) -> None:
        """Move the center towards the mean over all of this step's teacher patch tokens (masked or not)."""
        self._move_center(teacher_patch_logits.float().flatten(0, 1).mean(dim=0, keepdim=True))  # (1, K)


@torch.no_grad()
def teacher_diagnostics(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse signals of a batch's (R, K) teacher targets, computed without host synchronisation: a uniform
    teacher (entropy near ln K, the loss stuck at ln K of facebookresearch/dino#246) or a one-hot one.

    Returns:
        `teacher_entropy`: mean entropy of the teacher's target distributions (ln K = uniform collapse);
        `prototypes_used`: how many distinct prototypes win the argmax over the teacher rows (1 = one-hot collapse).
    """
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean()
    winners = torch.zeros(p.shape[-1], device=p.device).index_fill_(0, p.argmax(-1), 1.0)
    return {"teacher_entropy": entropy, "prototypes_used": winners.sum()}
