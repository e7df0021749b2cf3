"""The student/teacher pair of DINO and iBOT: multi-crop forward, losses as a dict, teacher EMA. No optimizer, no I/O.

Multi-crop forward (dino utils.py `MultiCropWrapper`): crops arrive crop-major and grouped by resolution, so the
student backbone runs once on the global crops and once on the local crops. The teacher sees the global crops
only, and for iBOT always unmasked; the student's global crops carry the masks (iBOT main_ibot.py).

iBOT patch head: `shared_head` uses the CLS head for patch tokens too (the iBOT ViT-S recipe), so one head call
serves both; otherwise a separate head with `patch_out_dim` prototypes (DINOv2's `ibot.separate_head`). The
student's patch head runs on the masked tokens only, the only ones the loss reads; the teacher's runs on every
patch token, because the patch center is the mean over all of them (iBOT `iBOTLoss.update_center`).

Regularisers (KoLeo, contrastive, Drloc: `model.regularisers`) add their weighted terms on the student's global
views; the pair loops over them and holds their training-only heads in the student's ModuleDict.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from dinopre.config.settings import PretrainConfig
from dinopre.data.augment import grayscale_normalized, standardized_luma
from dinopre.data.dataset import CropBatch
from dinopre.model.heads import DINOHead
from dinopre.model.losses import DINOLoss, IBOTPatchLoss, teacher_diagnostics
from dinopre.model.regularisers.registry import build_regularisers
from dinopre.model.regularisers.regulariser import Regulariser, StudentGlobals
from dinopre.model.vit import VisionTransformer, row_keys


class StudentTeacher(nn.Module):
    """Student and EMA teacher (backbone + heads) with the losses and their centers.

    Args:
        backbone: the student backbone (with stochastic depth; with a mask token for iBOT); the teacher copies it.
        head: the student CLS head; the teacher gets a copy.
        loss: the DINO (CLS) loss, holding its center.
        patch_loss: the iBOT patch loss; None for DINO.
        patch_head: a separate patch head, or None to share `head` (iBOT only).
        loss_weights: (CLS, patch) weights of the iBOT total.
        teacher_view: how the teacher sees its views: `rgb` (as rendered, DINO), `gray` (luma: its targets cannot
            depend on colour, so the student learns features that do not either) or `pattern` (luma standardised
            per view: nor on brightness and contrast).
        regularisers: extra terms on the student's global views, added to the total in this order; their heads
            join the student's ModuleDict (under `head_key`, listed after the DINO heads) and are never exported.
        zero_mean_patches: keep the patch filters at zero mean per colour channel (`constrain` after each step),
            so a patch token does not change when a constant is added to a channel of the patch.
        drop_path_scope: `sample`: the student's drop path draws from each sample's own key (`batch.drop_keys`),
            so a step does not depend on the number of processes; `process`: from the process's generator.
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
        teacher_view: str = "rgb",
        regularisers: Sequence[Regulariser] = (),
        zero_mean_patches: bool = False,
        drop_path_scope: str = "sample",
    ) -> None:
        super().__init__()
        self.zero_mean_patches = zero_mean_patches
        self.keyed_drop_path = drop_path_scope == "sample" and any(b.drop_path_rate > 0 for b in backbone.blocks)
        if zero_mean_patches:
            _center_filters(backbone.patch_embed.proj.weight)
        modules = {"backbone": backbone, "head": head}
        if patch_head is not None:
            modules["patch_head"] = patch_head
        modules.update({r.head_key: r.head for r in regularisers if r.head is not None})
        self.student = nn.ModuleDict(modules)
        self.teacher = copy.deepcopy(self.student)
        for block in self.teacher["backbone"].blocks:
            block.drop_path_rate = 0.0  # dino builds the teacher without stochastic depth
        self.teacher.requires_grad_(False)
        self.dino_loss = loss
        self.patch_loss = patch_loss
        self.loss_weights = loss_weights
        self.teacher_view = teacher_view
        self.regularisers = tuple(regularisers)  # a plain tuple: their heads are registered in `student` only
        self._needs_patch_tokens = any(r.needs_patch_tokens for r in self.regularisers)

    @property
    def is_ibot(self) -> bool:
        return self.patch_loss is not None

    @property
    def loss_names(self) -> tuple[str, ...]:
        """The total and its parts, as keys of `forward`'s result."""
        names = ("loss", "cls", "patch") if self.is_ibot else ("loss", "dino")
        return names + tuple(r.name for r in self.regularisers)

    def train(self, mode: bool = True) -> StudentTeacher:
        super().train(mode)
        self.teacher.eval()  # the teacher is never in training mode
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student parameters the optimizer updates."""
        return [p for p in self.student.parameters() if p.requires_grad]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Student backbone parameters the optimizer updates (frozen during an --init-from head warm-up)."""
        return [p for p in self.student["backbone"].parameters() if p.requires_grad]

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
        student = self._student_globals(batch)
        student_logits = self.student["head"](self._student_cls(student.cls, batch))  # (V*B, K)
        out = self._diagnostics(teacher_logits, teacher_temp) if diagnostics else {}
        loss = self._cls_loss(student_logits, teacher_logits, batch, teacher_temp)
        return self._with_regularisers({"loss": loss, "dino": loss.detach(), **out}, student)

    def _student_globals(self, batch: CropBatch) -> StudentGlobals:
        """The student's (G*B, D) CLS features of the global views, and their (G*B, N, D) patch tokens only when a
        regulariser reads them (the CLS-only path is cheaper)."""
        keys = self._drop_keys(batch, batch.global_crops)
        if not self._needs_patch_tokens:
            return self._globals(self.student["backbone"](batch.global_crops, **keys), None, batch)
        features = self.student["backbone"].forward_features(batch.global_crops, **keys)
        return self._globals(features.cls, features.patch_tokens, batch)

    def _drop_keys(self, batch: CropBatch, crops: torch.Tensor, first_view: int = 0) -> dict[str, torch.Tensor]:
        """`drop_keys` for the backbone's call on `crops` (views `first_view` on of the batch): the per-row keys,
        or nothing, to draw from the process's generator (scope `process`, no drop path, a batch without keys),
        which leaves the call as it always was."""
        if not self.keyed_drop_path or batch.drop_keys is None:
            return {}
        return {"drop_keys": row_keys(batch.drop_keys, crops.shape[0] // batch.batch_size, first_view)}

    def _globals(self, cls: torch.Tensor, patch_tokens: torch.Tensor | None, batch: CropBatch) -> StudentGlobals:
        return StudentGlobals(cls, patch_tokens, batch, self.student["backbone"].patch_embed.patch_size)

    def _teacher_views(self, batch: CropBatch) -> torch.Tensor:
        """The global views as the teacher sees them (`teacher_view`)."""
        if self.teacher_view == "gray":
            return grayscale_normalized(batch.global_crops)
        if self.teacher_view == "pattern":
            return standardized_luma(batch.global_crops)
        return batch.global_crops

    def _with_regularisers(self, losses: dict[str, torch.Tensor], student: StudentGlobals) -> dict[str, torch.Tensor]:
        """Add each regulariser's weighted term to the total, in their order (a term that draws random numbers,
        Drloc's pairs, draws them here; KoLeo and the contrastive loss see every process's images), and its
        detached value under its name."""
        for regulariser in self.regularisers:
            term = regulariser.loss(student)
            losses = {**losses, "loss": losses["loss"] + regulariser.weight * term, regulariser.name: term.detach()}
        return losses

    def _student_cls(self, global_cls: torch.Tensor, batch: CropBatch) -> torch.Tensor:
        """Student CLS features of every view: globals (already computed) then locals, one call per resolution."""
        if batch.local_crops is None:
            return global_cls
        keys = self._drop_keys(batch, batch.local_crops, global_cls.shape[0] // batch.batch_size)
        return torch.cat([global_cls, self.student["backbone"](batch.local_crops, **keys)])  # (V*B, D)

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
        student = self.student["backbone"].forward_features(batch.global_crops, masks=batch.masks,
                                                            **self._drop_keys(batch, batch.global_crops))
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
                                       self._globals(student.cls, student.patch_tokens, batch))

    @staticmethod
    def _heads(model: nn.ModuleDict, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS logits (R, K) and patch logits (patches' leading shape, K'); one call when the head is shared."""
        if "patch_head" in model:
            return model["head"](cls), model["patch_head"](patches)
        flat = patches.flatten(0, -2)  # (P, D)
        logits = model["head"](torch.cat([cls, flat]))  # (R + P, K)
        return logits[: cls.shape[0]], logits[cls.shape[0] :].unflatten(0, patches.shape[:-1])

    @torch.no_grad()
    def start_from(self, backbone: dict[str, torch.Tensor], head: dict[str, torch.Tensor]) -> None:
        """Load trained weights into the student and the teacher (continued pretraining, `--init-from`).

        Args:
            backbone: backbone tensors; a name it lacks (iBOT's mask token) keeps its initial value.
            head: the DINO head's tensors, or empty to keep the fresh heads.

        Raises:
            RuntimeError, KeyError: a name or shape that does not fit.
        """
        for model in (self.student, self.teacher):
            model["backbone"].load_state_dict({**model["backbone"].state_dict(), **backbone})
            if head:
                model["head"].load_state_dict(head)
        # The constraint holds from the first step, in both. Filters that already satisfy it (a source trained under
        # it) are left bit for bit as they are: re-centring would only move them by rounding.
        if self.zero_mean_patches and not zero_mean_filters(self.student["backbone"].patch_embed.proj.weight):
            _center_filters(self.student["backbone"].patch_embed.proj.weight)
            _center_filters(self.teacher["backbone"].patch_embed.proj.weight)

    @torch.no_grad()
    def constrain(self) -> None:
        """Restore the student's constraints after an optimizer step (projected gradient descent).

        With `zero_mean_patches`, the patch filters go back to zero mean per channel; the teacher, an average of
        such students, stays zero-mean too.
        """
        if self.zero_mean_patches:
            _center_filters(self.student["backbone"].patch_embed.proj.weight)

    @torch.no_grad()
    def update_teacher(self, momentum: float, *, backbone: bool = True) -> None:
        """teacher <- m * teacher + (1 - m) * student, over parameters, in fp32 (dino main_dino.py).

        Args:
            momentum: m.
            backbone: include the backbones. During a head warm-up the student's backbone does not move, and
                leaving it out keeps the teacher's bit for bit the source's (m t + (1 - m) t rounds).
        """
        keep = (lambda name: True) if backbone else (lambda name: not name.startswith("backbone."))
        teacher_params = [p for name, p in self.teacher.named_parameters() if keep(name)]
        student_params = [p for name, p in self.student.named_parameters() if keep(name)]
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


@torch.no_grad()
def _center_filters(weight: torch.Tensor) -> None:
    # (D, C, p, p) -> zero mean over each filter's p x p taps, per input channel. Why: at small budgets a ViT's CLS
    # features sort images by colour (a random init's nearest neighbours match in colour, measured with
    # benchmarks/learn.py); the mean colour of a patch is exactly what such filters cannot see, while edges,
    # texture and shape pass unchanged. The first conv of fast CIFAR trainers is fixed in the same spirit
    # (patch whitening).
    weight.sub_(weight.mean(dim=(2, 3), keepdim=True))


def zero_mean_filters(weight: torch.Tensor) -> bool:
    """Whether patch filters (D, C, p, p) already have zero mean over each filter's taps, per input channel, to
    rounding (what `zero_mean_patches` keeps them at: any dinopre `auto` run's are)."""
    weight = weight.detach().double()
    return bool(weight.mean(dim=(2, 3)).abs().max() <= 1e-5 * weight.abs().mean().clamp_min(1e-30))


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
    # The regularisers' heads draw their weights before the DINO heads: the order every run so far was built in.
    extras = {"teacher_view": method.teacher_view, "regularisers": build_regularisers(config),
              "zero_mean_patches": m.zero_mean_patches, "drop_path_scope": m.drop_path_scope or "sample"}
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
