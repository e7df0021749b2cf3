"""The student/teacher pair of DINO and iBOT: multi-crop forward, losses as a dict, teacher EMA. No optimizer, no I/O.

Multi-crop forward (dino utils.py `MultiCropWrapper`): crops arrive crop-major and grouped by resolution, so the
student backbone runs once on the global crops and once on the local crops. The teacher sees the global crops
only, and for iBOT always unmasked; the student's global crops carry the masks (iBOT main_ibot.py).

iBOT patch head: `shared_head` uses the CLS head for patch tokens too (the iBOT ViT-S recipe), so one head call
serves both; otherwise a separate head with `patch_out_dim` prototypes (DINOv2's `ibot.separate_head`). The
student's patch head runs on the masked tokens only, the only ones the loss reads; the teacher's runs on every
patch token, because the patch center is the mean over all of them (iBOT `iBOTLoss.update_center`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dinopre.config.settings import PretrainConfig
from dinopre.data.augment import grayscale_normalized, standardized_luma
from dinopre.data.dataset import CropBatch
from dinopre.model.heads import DINOHead, LocalisationHead, ProjectionHead
from dinopre.model.losses import (
    DINOLoss,
    IBOTPatchLoss,
    info_nce,
    koleo_loss,
    localisation_loss,
    relative_offsets,
    sample_token_pairs,
    teacher_diagnostics,
)
from dinopre.model.vit import VisionTransformer


class StudentTeacher(nn.Module):
    """Student and EMA teacher (backbone + heads) with the losses and their centers.

    Args:
        backbone: the student backbone (with stochastic depth; with a mask token for iBOT); the teacher copies it.
        head: the student CLS head; the teacher gets a copy.
        loss: the DINO (CLS) loss, holding its center.
        patch_loss: the iBOT patch loss; None for DINO.
        patch_head: a separate patch head, or None to share `head` (iBOT only).
        loss_weights: (CLS, patch) weights of the iBOT total.
        koleo_weight: weight of the KoLeo regulariser on the student's global-view CLS features (0: off).
        teacher_view: how the teacher sees its views: `rgb` (as rendered, DINO), `gray` (luma: its targets cannot
            depend on colour, so the student learns features that do not either) or `pattern` (luma standardised
            per view: nor on brightness and contrast).
        contrast_head: a training-only projection head for a contrastive loss between the student's global views
            (SimCLR's InfoNCE), or None; it is never exported.
        contrast_weight: weight of that loss in the total.
        contrast_temperature: its softmax temperature.
        drloc_head: a training-only head that predicts the grid offset between two of the student's patch tokens
            of a global view (Drloc), or None; it is never exported.
        drloc_weight: weight of that loss in the total.
        zero_mean_patches: keep the patch filters at zero mean per colour channel (`constrain` after each step),
            so a patch token does not change when a constant is added to a channel of the patch.
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        head: DINOHead,
        loss: DINOLoss,
        *,
        patch_loss: IBOTPatchLoss | None = None,
        patch_head: DINOHead | None = None,
        loss_weights: tuple[float, float] = (1.0, 1.0),
        koleo_weight: float = 0.0,
        teacher_view: str = "rgb",
        contrast_head: ProjectionHead | None = None,
        contrast_weight: float = 0.0,
        contrast_temperature: float = 0.2,
        drloc_head: LocalisationHead | None = None,
        drloc_weight: float = 0.0,
        zero_mean_patches: bool = False,
    ) -> None:
        super().__init__()
        self.zero_mean_patches = zero_mean_patches
        if zero_mean_patches:
            _center_filters(backbone.patch_embed.proj.weight)
        modules = {"backbone": backbone, "head": head}
        if patch_head is not None:
            modules["patch_head"] = patch_head
        if contrast_head is not None:
            modules["contrast_head"] = contrast_head
        if drloc_head is not None:
            modules["drloc_head"] = drloc_head
        self.student = nn.ModuleDict(modules)
        self.teacher = copy.deepcopy(self.student)
        for block in self.teacher["backbone"].blocks:
            block.drop_path_rate = 0.0  # dino builds the teacher without stochastic depth
        self.teacher.requires_grad_(False)
        self.dino_loss = loss
        self.patch_loss = patch_loss
        self.loss_weights = loss_weights
        self.koleo_weight = koleo_weight
        self.teacher_view = teacher_view
        self.contrast_weight, self.contrast_temperature = contrast_weight, contrast_temperature
        self.drloc_weight = drloc_weight

    @property
    def is_ibot(self) -> bool:
        return self.patch_loss is not None

    @property
    def loss_names(self) -> tuple[str, ...]:
        """The total and its parts, as keys of `forward`'s result."""
        names = ("loss", "cls", "patch") if self.is_ibot else ("loss", "dino")
        names += ("koleo",) if self.koleo_weight > 0 else ()
        names += ("contrast",) if "contrast_head" in self.student else ()
        return names + ("drloc",) if "drloc_head" in self.student else names

    def train(self, mode: bool = True) -> StudentTeacher:
        super().train(mode)
        self.teacher.eval()  # the teacher is never in training mode
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student parameters the optimizer updates."""
        return [p for p in self.student.parameters() if p.requires_grad]

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Student prototype-layer parameters of every head (frozen during the first epoch(s))."""
        heads = [self.student["head"]] + ([self.student["patch_head"]] if "patch_head" in self.student else [])
        return [p for head in heads for p in head.last_layer.parameters() if p.requires_grad]

    def loss_state(self) -> dict[str, torch.Tensor]:
        """The loss centers, for checkpoints."""
        state = {"center": self.dino_loss.center.detach().clone()}
        if self.patch_loss is not None:
            state["patch_center"] = self.patch_loss.center.detach().clone()
        return state

    @torch.no_grad()
    def load_loss_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put the loss centers of `loss_state` back in place (a checkpoint's, whose widths were checked)."""
        self.dino_loss.center.copy_(state["center"])
        if self.patch_loss is not None:
            self.patch_loss.center.copy_(state["patch_center"])

    def forward(
        self,
        batch: CropBatch,
        teacher_temp: float,
        teacher_patch_temp: float | None = None,
        diagnostics: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Compute the losses of one batch.

        Args:
            batch: global crops (G*B, 3, H, W), local crops (L*B, 3, h, w), crop-major; iBOT masks (G*B, N).
            teacher_temp: teacher temperature of the CLS loss for this step.
            teacher_patch_temp: teacher temperature of the iBOT patch loss for this step.
            diagnostics: also return collapse signals (teacher entropy, prototypes in use).

        Returns:
            `loss` (what to backpropagate) and its detached parts (`dino`, or `cls` and `patch` for iBOT).
        """
        if self.is_ibot:
            return self._forward_ibot(batch, teacher_temp, teacher_patch_temp, diagnostics)
        with torch.no_grad():
            teacher_logits = self.teacher["head"](self.teacher["backbone"](self._teacher_views(batch)))  # (G*B, K)
        global_cls, patch_tokens = self._student_globals(batch)
        student_logits = self.student["head"](self._student_cls(global_cls, batch))  # (V*B, K)
        out = self._diagnostics(teacher_logits, teacher_temp) if diagnostics else {}
        loss = self._cls_loss(student_logits, teacher_logits, batch, teacher_temp)
        return self._with_regularisers({"loss": loss, "dino": loss.detach(), **out}, global_cls, batch, patch_tokens)

    def _student_globals(self, batch: CropBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The student's (G*B, D) CLS features of the global views, and their (G*B, N, D) patch tokens when a loss
        reads them (Drloc)."""
        if "drloc_head" not in self.student:
            return self.student["backbone"](batch.global_crops), None
        features = self.student["backbone"].forward_features(batch.global_crops)
        return features.cls, features.patch_tokens

    def _teacher_views(self, batch: CropBatch) -> torch.Tensor:
        """The global views as the teacher sees them (`teacher_view`)."""
        if self.teacher_view == "gray":
            return grayscale_normalized(batch.global_crops)
        if self.teacher_view == "pattern":
            return standardized_luma(batch.global_crops)
        return batch.global_crops

    def _with_regularisers(self, losses: dict[str, torch.Tensor], global_cls: torch.Tensor, batch: CropBatch,
                           patch_tokens: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Add the student's regularisers of its global views to the total, per process: KoLeo on each view's CLS
        features (DINOv2), the contrastive loss between views and the relative localisation of patch tokens
        (each through its training-only head)."""
        views = global_cls.shape[0] // batch.batch_size
        if self.koleo_weight > 0:
            koleo = sum(koleo_loss(view) for view in global_cls.chunk(views))
            losses = {**losses, "loss": losses["loss"] + self.koleo_weight * koleo, "koleo": koleo.detach()}
        if "contrast_head" in self.student:
            contrast = info_nce(self.student["contrast_head"](global_cls), views, self.contrast_temperature)
            losses = {**losses, "loss": losses["loss"] + self.contrast_weight * contrast, "contrast": contrast.detach()}
        if "drloc_head" in self.student and patch_tokens is not None:
            drloc = self._localisation(patch_tokens, batch)
            losses = {**losses, "loss": losses["loss"] + self.drloc_weight * drloc, "drloc": drloc.detach()}
        return losses

    def _localisation(self, patch_tokens: torch.Tensor, batch: CropBatch) -> torch.Tensor:
        """Drloc's loss on (G*B, N, D) patch tokens: DRLOC_PAIRS random pairs per view, offsets on the patch grid."""
        patch = self.student["backbone"].patch_embed.patch_size
        grid = (batch.global_crops.shape[-2] // patch, batch.global_crops.shape[-1] // patch)
        pairs = sample_token_pairs(patch_tokens.shape[0], patch_tokens.shape[1], DRLOC_PAIRS, patch_tokens.device)
        return localisation_loss(self.student["drloc_head"](patch_tokens, pairs), relative_offsets(pairs, grid))

    def _student_cls(self, global_cls: torch.Tensor, batch: CropBatch) -> torch.Tensor:
        """Student CLS features of every view: globals (already computed) then locals, one call per resolution."""
        if batch.local_crops is None:
            return global_cls
        return torch.cat([global_cls, self.student["backbone"](batch.local_crops)])  # (V*B, D)

    def _cls_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, batch: CropBatch,
                  teacher_temp: float) -> torch.Tensor:
        num_views = student_logits.shape[0] // batch.batch_size
        return self.dino_loss(student_logits, teacher_logits, num_student_views=num_views, teacher_temp=teacher_temp)

    def _diagnostics(self, teacher_logits: torch.Tensor, teacher_temp: float) -> dict[str, torch.Tensor]:
        # Before the loss updates the center, i.e. with the center this step uses.
        return teacher_diagnostics(self.dino_loss.teacher_targets(teacher_logits, teacher_temp))

    def _forward_ibot(self, batch: CropBatch, teacher_temp: float, teacher_patch_temp: float | None,
                      diagnostics: bool) -> dict[str, torch.Tensor]:
        if batch.masks is None or batch.mask_index is None or teacher_patch_temp is None:
            raise ValueError("iBOT needs the batch's masks and a teacher patch temperature.")
        with torch.no_grad():
            teacher = self.teacher["backbone"].forward_features(self._teacher_views(batch))  # unmasked views
            teacher_logits, teacher_patch_logits = self._heads(self.teacher, teacher.cls, teacher.patch_tokens)
        student = self.student["backbone"].forward_features(batch.global_crops, masks=batch.masks)
        student_cls = self._student_cls(student.cls, batch)  # (V*B, D)
        # (M, D): only these reach the loss; gathered by index, so the host never waits for the mask count
        masked_tokens = student.patch_tokens.flatten(0, 1).index_select(0, batch.mask_index.flat)
        student_logits, student_masked_logits = self._heads(self.student, student_cls, masked_tokens)
        out = self._diagnostics(teacher_logits, teacher_temp) if diagnostics else {}
        cls_loss = self._cls_loss(student_logits, teacher_logits, batch, teacher_temp)
        patch_loss = self.patch_loss(student_masked_logits, teacher_patch_logits, batch.mask_index,
                                     teacher_temp=teacher_patch_temp)
        loss = self.loss_weights[0] * cls_loss + self.loss_weights[1] * patch_loss
        return self._with_regularisers({"loss": loss, "cls": cls_loss.detach(), "patch": patch_loss.detach(), **out},
                                       student.cls, batch, student.patch_tokens)

    @staticmethod
    def _heads(model: nn.ModuleDict, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS logits (R, K) and patch logits (patches' leading shape, K'); one call when the head is shared."""
        if "patch_head" in model:
            return model["head"](cls), model["patch_head"](patches)
        flat = patches.flatten(0, -2)  # (P, D)
        logits = model["head"](torch.cat([cls, flat]))  # (R + P, K)
        return logits[: cls.shape[0]], logits[cls.shape[0] :].unflatten(0, patches.shape[:-1])

    @torch.no_grad()
    def constrain(self) -> None:
        """Restore the student's constraints after an optimizer step (projected gradient descent).

        With `zero_mean_patches`, the patch filters go back to zero mean per channel; the teacher, an average of
        such students, stays zero-mean too.
        """
        if self.zero_mean_patches:
            _center_filters(self.student["backbone"].patch_embed.proj.weight)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- m * teacher + (1 - m) * student, over parameters, in fp32 (dino main_dino.py)."""
        teacher_params = list(self.teacher.parameters())
        student_params = list(self.student.parameters())
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


CONTRAST_DIM = 128  # SimCLR's projection width
DRLOC_PAIRS = 64  # token pairs per view (Liu et al. 2021 sample a few dozen): as many as the 8 x 8 grid of a 64 px crop


@torch.no_grad()
def _center_filters(weight: torch.Tensor) -> None:
    # (D, C, p, p) -> zero mean over each filter's p x p taps, per input channel. Why: at small budgets a ViT's CLS
    # features sort images by colour (a random init's nearest neighbours match in colour, measured with
    # benchmarks/learn.py); the mean colour of a patch is exactly what such filters cannot see, while edges,
    # texture and shape pass unchanged. The first conv of fast CIFAR trainers is fixed in the same spirit
    # (patch whitening).
    weight.sub_(weight.mean(dim=(2, 3), keepdim=True))


def build_method(config: PretrainConfig) -> StudentTeacher:
    """Build the student/teacher pair of a configuration (weights drawn from the global torch generator)."""
    m, method = config.model, config.method
    ibot = method.algorithm == "ibot"
    backbone = VisionTransformer(
        image_size=m.image_size,
        patch_size=m.patch_size,
        embed_dim=m.vit_embed_dim,
        depth=m.vit_depth,
        num_heads=m.vit_num_heads,
        mlp_ratio=m.vit_mlp_ratio,
        drop_path_rate=m.drop_path_rate,
        use_mask_token=ibot,
    )

    def head(out_dim: int) -> DINOHead:
        return DINOHead(m.vit_embed_dim, out_dim, hidden_dim=m.head_hidden_dim, bottleneck_dim=m.head_bottleneck_dim,
                        norm_last_layer=m.norm_last_layer)

    loss = DINOLoss(m.out_dim, student_temp=method.student_temp, center_momentum=method.center_momentum,
                    centering=method.centering)
    extras = {"koleo_weight": method.koleo_weight, "teacher_view": method.teacher_view,
              "contrast_weight": method.contrast_weight, "contrast_temperature": method.contrast_temperature,
              "contrast_head": ProjectionHead(m.vit_embed_dim, m.head_hidden_dim, CONTRAST_DIM)
              if method.contrast_weight > 0 else None, "drloc_weight": method.drloc_weight,
              "drloc_head": LocalisationHead(m.vit_embed_dim) if method.drloc_weight > 0 else None,
              "zero_mean_patches": m.zero_mean_patches}
    if not ibot:
        return StudentTeacher(backbone, head(m.out_dim), loss, **extras)
    return StudentTeacher(
        backbone,
        head(m.out_dim),
        loss,
        patch_loss=IBOTPatchLoss(config.resolved_patch_out_dim, student_temp=method.student_temp,
                                 center_momentum=method.center_momentum, centering=method.centering),
        patch_head=None if m.shared_head else head(config.resolved_patch_out_dim),
        loss_weights=(method.cls_loss_weight, method.patch_loss_weight),
        **extras,
    )
