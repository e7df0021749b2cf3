"""The student/teacher pair of DINO: multi-crop forward, losses as a dict, teacher EMA. No optimizer, no I/O.

Multi-crop forward (dino utils.py `MultiCropWrapper`): crops arrive crop-major and grouped by resolution, so the
student backbone runs once on the global crops and once on the local crops, and the head runs once on all rows.
The teacher sees the global crops only.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dinopre.config import PretrainConfig
from dinopre.data import CropBatch
from dinopre.heads import DINOHead
from dinopre.losses import DINOLoss, teacher_diagnostics
from dinopre.vit import VisionTransformer


class StudentTeacher(nn.Module):
    """Student and EMA teacher, each a backbone + DINO head, with the DINO loss and its center.

    Args:
        backbone: the student backbone (with stochastic depth); the teacher is a copy without it.
        head: the student head; the teacher gets a copy.
        loss: the DINO loss module (holds the center).
    """

    def __init__(self, backbone: VisionTransformer, head: DINOHead, loss: DINOLoss) -> None:
        super().__init__()
        self.student = nn.ModuleDict({"backbone": backbone, "head": head})
        self.teacher = copy.deepcopy(self.student)
        for block in self.teacher["backbone"].blocks:
            block.drop_path_rate = 0.0  # dino builds the teacher without stochastic depth
        self.teacher.requires_grad_(False)
        self.dino_loss = loss

    def train(self, mode: bool = True) -> StudentTeacher:
        super().train(mode)
        self.teacher.eval()  # the teacher is never in training mode
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student parameters the optimizer updates."""
        return [p for p in self.student.parameters() if p.requires_grad]

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Student prototype-layer parameters (frozen during the first epoch(s))."""
        return [p for p in self.student["head"].last_layer.parameters() if p.requires_grad]

    def forward(self, batch: CropBatch, teacher_temp: float, diagnostics: bool = False) -> dict[str, torch.Tensor]:
        """Compute the losses of one batch.

        Args:
            batch: global crops (G*B, 3, H, W) and local crops (L*B, 3, h, w), crop-major.
            teacher_temp: teacher temperature of this step.
            diagnostics: also return collapse signals (teacher entropy, prototype usage).

        Returns:
            `loss` (what to backpropagate) and its parts, all scalars; fp32 loss maths.
        """
        with torch.no_grad():
            teacher_logits = self.teacher["head"](self.teacher["backbone"](batch.global_crops))  # (G*B, K)
        features = [self.student["backbone"](batch.global_crops)]  # one call per resolution
        if batch.local_crops is not None:
            features.append(self.student["backbone"](batch.local_crops))
        student_logits = self.student["head"](torch.cat(features))  # (V*B, K)
        num_views = student_logits.shape[0] // batch.batch_size
        out: dict[str, torch.Tensor] = {}
        if diagnostics:  # before the loss updates the center, i.e. with the center this step used
            out.update(teacher_diagnostics(teacher_logits, self.dino_loss.center, teacher_temp))
        loss = self.dino_loss(student_logits, teacher_logits, num_student_views=num_views, teacher_temp=teacher_temp)
        return {"loss": loss, "dino": loss.detach(), **out}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- m * teacher + (1 - m) * student, over parameters, in fp32 (dino main_dino.py)."""
        teacher_params = list(self.teacher.parameters())
        student_params = list(self.student.parameters())
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


def build_method(config: PretrainConfig) -> StudentTeacher:
    """Build the student/teacher pair of a configuration (weights drawn from the global torch generator)."""
    m = config.model
    backbone = VisionTransformer(
        image_size=m.image_size,
        patch_size=m.patch_size,
        embed_dim=m.vit_embed_dim,
        depth=m.vit_depth,
        num_heads=m.vit_num_heads,
        mlp_ratio=m.vit_mlp_ratio,
        drop_path_rate=m.drop_path_rate,
    )
    head = DINOHead(
        m.vit_embed_dim,
        m.out_dim,
        hidden_dim=m.head_hidden_dim,
        bottleneck_dim=m.head_bottleneck_dim,
        norm_last_layer=m.norm_last_layer,
    )
    loss = DINOLoss(m.out_dim, student_temp=config.method.student_temp, center_momentum=config.method.center_momentum)
    return StudentTeacher(backbone, head, loss)
