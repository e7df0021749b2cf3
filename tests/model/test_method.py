"""Tests of the student/teacher pair (model.method) and one DINO optimizer step (train.step.train_step)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinopre.config.loading import build_config
from dinopre.config.recipe import resolve
from dinopre.config.settings import PretrainConfig
from dinopre.data.dataset import CropBatch
from dinopre.model.method import StudentTeacher, build_method
from dinopre.model.optim import build_optimizer
from dinopre.train.runtime import setup
from dinopre.train.step import train_step

B, K, D = 3, 64, 32
TEACHER_TEMP = 0.04


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_config(**overrides: Any) -> PretrainConfig:
    """The face demo config shrunk to a 32-wide, 2-block ViT with K = 64 prototypes and 2 local crops."""
    settings: dict[str, Any] = dict(vit_embed_dim=D, vit_depth=2, vit_num_heads=2, out_dim=K, head_hidden_dim=64,
                                    head_bottleneck_dim=16, num_local_crops=2, drop_path_rate=0.0,
                                    recipe="reference")
    settings.update(overrides)
    return resolve(build_config("face", demo=True, cli_settings=settings), num_images=512).config


def tiny_method(seed: int = 0, **overrides: Any) -> StudentTeacher:
    """A freshly built student/teacher pair (weights from a seeded global generator)."""
    torch.manual_seed(seed)
    return build_method(tiny_config(**overrides))


def crop_batch(local: bool = True, seed: int = 1) -> CropBatch:
    """2 global 32 px views and (optionally) 2 local 16 px views of B images, crop-major."""
    generator = torch.Generator().manual_seed(seed)
    global_crops = torch.randn(2 * B, 3, 32, 32, generator=generator)
    local_crops = torch.randn(2 * B, 3, 16, 16, generator=generator) if local else None
    return CropBatch(global_crops=global_crops, local_crops=local_crops, indices=torch.arange(B))


def reference_loss(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, views: int) -> torch.Tensor:
    """dino's DINOLoss double loop (student temp 0.1) in float64."""
    s = (student.double() / 0.1).chunk(views)
    t = F.softmax((teacher.double() - center.double()) / TEACHER_TEMP, dim=-1).chunk(2)
    terms = [(-q * F.log_softmax(s[v], -1)).sum(-1).mean() for iq, q in enumerate(t) for v in range(views) if v != iq]
    return torch.stack(terms).sum() / len(terms)


def record_calls(module: nn.Module, calls: list[tuple[int, ...]]) -> torch.utils.hooks.RemovableHandle:
    """Append the input shape of every forward call of `module` to `calls`."""
    return module.register_forward_hook(lambda _m, args, _out: calls.append(tuple(args[0].shape)))


def perturb(module: nn.Module, seed: int, std: float = 0.05) -> None:
    """Add noise to every parameter so that student and teacher differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=generator))


# ----------------------------------------------------------------------------------- construction


def test_teacher_starts_as_student_copy_frozen() -> None:
    """The teacher holds the student's weights (separate tensors) and nothing in it requires a gradient."""
    method = tiny_method()
    student, teacher = method.student.state_dict(), method.teacher.state_dict()
    assert student.keys() == teacher.keys()
    assert all(torch.equal(student[k], teacher[k]) for k in student)
    assert all(not p.requires_grad for p in method.teacher.parameters())
    student_ids = {p.data_ptr() for p in method.student.parameters()}
    assert not student_ids & {p.data_ptr() for p in method.teacher.parameters()}
    assert method.trainable_parameters() == [p for p in method.student.parameters() if p.requires_grad]
    assert method.last_layer_parameters() == [method.student["head"].last_layer.weight_v]


def test_teacher_has_no_drop_path() -> None:
    """The student keeps its stochastic depth, the teacher's blocks all have rate 0 (dino)."""
    method = tiny_method(drop_path_rate=0.2)
    assert [b.drop_path_rate for b in method.student["backbone"].blocks] == pytest.approx([0.0, 0.2])
    assert [b.drop_path_rate for b in method.teacher["backbone"].blocks] == [0.0, 0.0]


def test_teacher_stays_in_eval_mode() -> None:
    """`.train()` puts the student in training mode but never the teacher; `.eval()` puts both in eval."""
    method = tiny_method().train()
    assert all(m.training for m in method.student.modules())
    assert not any(m.training for m in method.teacher.modules())
    method.eval()
    assert not any(m.training for m in method.modules())
    method.train(True)
    assert not method.teacher.training and method.student.training


# ----------------------------------------------------------------------------------- forward


def test_one_backbone_call_per_resolution_and_one_head_call() -> None:
    """Student backbone: one call on the globals, one on the locals; teacher: one call on globals; heads once."""
    method = tiny_method().train()
    calls: dict[str, list[tuple[int, ...]]] = {name: [] for name in ("sb", "sh", "tb", "th")}
    handles = [
        record_calls(method.student["backbone"], calls["sb"]),
        record_calls(method.student["head"], calls["sh"]),
        record_calls(method.teacher["backbone"], calls["tb"]),
        record_calls(method.teacher["head"], calls["th"]),
    ]
    try:
        method(crop_batch(), TEACHER_TEMP)
    finally:
        for handle in handles:
            handle.remove()
    assert calls["sb"] == [(2 * B, 3, 32, 32), (2 * B, 3, 16, 16)]
    assert calls["tb"] == [(2 * B, 3, 32, 32)]
    assert calls["sh"] == [(4 * B, D)]
    assert calls["th"] == [(2 * B, D)]


def test_loss_equals_reference_on_crop_major_views() -> None:
    """The loss is dino's over (teacher global q, student view v != q) with views ordered globals then locals."""
    method = tiny_method().train()
    perturb(method.student, seed=4)  # a student different from the teacher
    method.dino_loss.center.copy_(torch.linspace(-0.5, 0.5, K))
    old_center = method.dino_loss.center.clone()
    batch = crop_batch()
    with torch.no_grad():
        student = method.student["head"](torch.cat([method.student["backbone"](batch.global_crops),
                                                    method.student["backbone"](batch.local_crops)]))
        teacher = method.teacher["head"](method.teacher["backbone"](batch.global_crops))
        out = method(batch, TEACHER_TEMP)
    assert out["loss"].item() == pytest.approx(reference_loss(student, teacher, old_center, 4).item(), rel=1e-5)
    torch.testing.assert_close(method.dino_loss.center, 0.9 * old_center + 0.1 * teacher.mean(0, keepdim=True))


def test_without_local_crops_two_views() -> None:
    """local_crops=None: the student sees the 2 globals only, 2 pairs, loss equals the reference with V = 2."""
    method = tiny_method().train()
    perturb(method.student, seed=5)
    batch = crop_batch(local=False)
    calls: list[tuple[int, ...]] = []
    handle = record_calls(method.student["backbone"], calls)
    try:
        out = method(batch, TEACHER_TEMP)
    finally:
        handle.remove()
    assert calls == [(2 * B, 3, 32, 32)]
    with torch.no_grad():
        student = method.student["head"](method.student["backbone"](batch.global_crops))
        teacher = method.teacher["head"](method.teacher["backbone"](batch.global_crops))
    expected = reference_loss(student, teacher, torch.zeros(1, K), 2)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.isfinite(out["loss"])


def test_returned_dict_and_diagnostics() -> None:
    """`loss` (with graph) and `dino` (detached, same value); diagnostics add entropy and prototype usage."""
    method = tiny_method().train()
    plain = method(crop_batch(), TEACHER_TEMP)
    assert set(plain) == {"loss", "dino"}
    assert plain["loss"].requires_grad and not plain["dino"].requires_grad
    assert plain["dino"].item() == plain["loss"].item() and plain["loss"].dtype == torch.float32
    full = method(crop_batch(), TEACHER_TEMP, diagnostics=True)
    assert set(full) == {"loss", "dino", "teacher_entropy", "prototypes_used"}
    assert 0.0 <= full["teacher_entropy"].item() <= torch.log(torch.tensor(float(K))).item() + 1e-5
    assert 1 <= full["prototypes_used"].item() <= 2 * B


def test_diagnostics_use_the_center_of_this_step() -> None:
    """Diagnostics are computed with the center the loss used, i.e. before this step's center update."""
    method = tiny_method()
    center = torch.zeros(1, K)
    center[0, :10] = -5.0  # would make prototypes 0-9 win if it were (wrongly) ignored or updated first
    method.dino_loss.center.copy_(center)
    batch = crop_batch()
    with torch.no_grad():
        teacher = method.teacher["head"](method.teacher["backbone"](batch.global_crops))
        out = method(batch, TEACHER_TEMP, diagnostics=True)
    p = F.softmax((teacher.double() - center.double()) / TEACHER_TEMP, dim=-1)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(-1).mean()
    used = len(set(p.argmax(-1).tolist()))
    assert out["teacher_entropy"].item() == pytest.approx(entropy.item(), rel=1e-4, abs=1e-6)
    assert out["prototypes_used"].item() == pytest.approx(used)


def test_backward_reaches_student_only() -> None:
    """After backward every trainable student parameter has a finite gradient; teacher parameters have none."""
    method = tiny_method(drop_path_rate=0.1).train()
    method(crop_batch(), TEACHER_TEMP)["loss"].backward()
    for name, p in method.student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name  # the frozen prototype norms
    assert all(p.grad is None for p in method.teacher.parameters())


# ----------------------------------------------------------------------------------- teacher EMA


@pytest.mark.parametrize("momentum", [0.996, 0.9, 0.5])
def test_update_teacher_is_ema(momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student for every parameter."""
    method = tiny_method()
    perturb(method.student, seed=6)
    perturb(method.teacher, seed=7)
    teacher_before = {n: p.detach().clone() for n, p in method.teacher.named_parameters()}
    student = dict(method.student.named_parameters())
    method.update_teacher(momentum)
    for name, p in method.teacher.named_parameters():
        expected = momentum * teacher_before[name] + (1 - momentum) * student[name].detach()
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7, msg=name)
        assert not p.requires_grad


def test_update_teacher_extremes() -> None:
    """m = 1 leaves the teacher bit-identical; m = 0 copies the student exactly."""
    method = tiny_method()
    perturb(method.student, seed=8)
    before = {n: p.detach().clone() for n, p in method.teacher.named_parameters()}
    method.update_teacher(1.0)
    assert all(torch.equal(p, before[n]) for n, p in method.teacher.named_parameters())
    method.update_teacher(0.0)
    student = dict(method.student.named_parameters())
    assert all(torch.equal(p, student[n]) for n, p in method.teacher.named_parameters())
    assert not any(p.requires_grad for p in method.teacher.parameters())


# ----------------------------------------------------------------------------------- one optimizer step


@pytest.mark.parametrize("freeze_last_layer", [True, False])
def test_train_step_freeze_last_layer_and_teacher_ema(freeze_last_layer: bool) -> None:
    """One step: the prototypes move only when not frozen, the backbone always, the teacher by EMA towards it."""
    runtime = setup("cpu", "fp32", 0)
    torch.set_num_threads(1)  # setup() picks every core; keep these tiny tensors on one
    method = build_method(tiny_config()).train()
    optimizer = build_optimizer(method.student, torch.device("cpu"))
    values = {"lr": 1e-3, "weight_decay": 0.04, "momentum": 0.9, "teacher_temp": TEACHER_TEMP}
    student_before = {n: p.detach().clone() for n, p in method.student.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in method.teacher.named_parameters()}
    out = train_step(method, optimizer, crop_batch(), values, runtime=runtime, clip_grad_norm=3.0,
                     freeze_last_layer=freeze_last_layer, diagnostics=True)
    assert set(out) == {"loss", "dino", "teacher_entropy", "prototypes_used"}
    assert all(not v.requires_grad for v in out.values()) and torch.isfinite(out["loss"])
    student = {n: p.detach() for n, p in method.student.named_parameters()}
    weight_v = "head.last_layer.weight_v"
    assert torch.equal(student[weight_v], student_before[weight_v]) is freeze_last_layer
    for name in ("backbone.patch_embed.proj.weight", "backbone.blocks.1.attn.qkv.weight", "head.mlp.0.weight"):
        assert not torch.equal(student[name], student_before[name]), name
    assert torch.equal(student["head.last_layer.weight_g"], student_before["head.last_layer.weight_g"])
    for name, p in method.teacher.named_parameters():
        expected = 0.9 * teacher_before[name] + 0.1 * student[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7, msg=name)
    # Moved towards the student: the remaining gap is m times the gap to the old teacher.
    name = "backbone.patch_embed.proj.weight"
    gap_after = (method.teacher.state_dict()[name] - student[name]).norm()
    gap_before = (teacher_before[name] - student[name]).norm()
    assert gap_after.item() == pytest.approx(0.9 * gap_before.item(), rel=1e-4)


# ----------------------------------------------------------------------------------- iBOT

N_PATCHES = (32 // 8) ** 2  # the demo's 4x4 grid
PATCH_TEMP = 0.07
SEPARATE: dict[str, Any] = dict(shared_head=False, patch_out_dim=48)


def ibot_method(seed: int = 0, **overrides: Any) -> StudentTeacher:
    """The tiny pair with `algorithm="ibot"` (shared head unless SEPARATE is passed)."""
    return tiny_method(seed, algorithm="ibot", **overrides)


def ibot_batch(seed: int = 1, empty_rows: tuple[int, ...] = (1, 4)) -> CropBatch:
    """`crop_batch` with (2*B, N) masks, ~40 % masked per row, the listed rows entirely unmasked."""
    batch = crop_batch(seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    masks = torch.rand(2 * B, N_PATCHES, generator=generator) < 0.4
    masks[:, 5] = True
    masks[list(empty_rows)] = False
    return CropBatch(batch.global_crops, batch.local_crops, batch.indices, masks)


def record_forward_features(monkeypatch: pytest.MonkeyPatch, backbone: nn.Module,
                            calls: list[tuple[tuple[int, ...], torch.Tensor | None]]) -> None:
    """Append (input shape, masks argument) of every `forward_features` call of `backbone` to `calls`."""
    original = backbone.forward_features

    def wrapper(x: torch.Tensor, masks: torch.Tensor | None = None) -> Any:
        calls.append((tuple(x.shape), None if masks is None else masks.clone()))
        return original(x, masks)

    monkeypatch.setattr(backbone, "forward_features", wrapper)


def forward_keeping_centers(method: StudentTeacher, batch: CropBatch) -> dict[str, torch.Tensor]:
    """One forward, then the loss centers put back, so that repeated forwards see the same centers."""
    centers = (method.dino_loss.center.clone(), method.patch_loss.center.clone())
    out = method(batch, TEACHER_TEMP, PATCH_TEMP)
    method.dino_loss.center.copy_(centers[0])
    method.patch_loss.center.copy_(centers[1])
    return out


def reference_patch_loss(student_patch: torch.Tensor, teacher_patch: torch.Tensor, masks: torch.Tensor,
                         center: torch.Tensor) -> torch.Tensor:
    """ibot `iBOTLoss` patch term on FULL (G*B, N, K') student logits: per-image masked mean, mean over images."""
    t = F.softmax((teacher_patch.double() - center.double()) / PATCH_TEMP, dim=-1)
    ce = -(t * F.log_softmax(student_patch.double() / 0.1, dim=-1)).sum(-1)  # (G*B, N)
    m = masks.double()
    per_image = (ce * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    return torch.stack([view.mean() for view in per_image.chunk(2)]).mean()


def test_ibot_student_backbone_gets_masks_teacher_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """The student's global call carries the batch masks, its local call none; the teacher sees unmasked globals."""
    method = ibot_method().train()
    batch = ibot_batch()
    student_calls: list[tuple[tuple[int, ...], torch.Tensor | None]] = []
    teacher_calls: list[tuple[tuple[int, ...], torch.Tensor | None]] = []
    record_forward_features(monkeypatch, method.student["backbone"], student_calls)
    record_forward_features(monkeypatch, method.teacher["backbone"], teacher_calls)
    method(batch, TEACHER_TEMP, PATCH_TEMP)
    assert [shape for shape, _ in student_calls] == [(2 * B, 3, 32, 32), (2 * B, 3, 16, 16)]
    assert student_calls[0][1] is not None and torch.equal(student_calls[0][1], batch.masks)
    assert student_calls[1][1] is None
    assert len(teacher_calls) == 1 and teacher_calls[0] == ((2 * B, 3, 32, 32), None)


def test_ibot_mask_token_replaces_exactly_the_masked_positions() -> None:
    """Student tokens: unmasked positions (and CLS) as without masks, masked ones = mask_token + pos_embed."""
    backbone = ibot_method().student["backbone"]
    with torch.no_grad():
        backbone.mask_token.copy_(torch.randn(1, D, generator=torch.Generator().manual_seed(0)))
        batch = ibot_batch()
        masked = backbone.prepare_tokens(batch.global_crops, batch.masks)  # (G*B, 1 + N, D)
        plain = backbone.prepare_tokens(batch.global_crops)
    keep = torch.cat([torch.ones(2 * B, 1, dtype=torch.bool), ~batch.masks], dim=1)  # CLS is never masked
    assert torch.equal(masked[keep], plain[keep])
    positions = backbone.pos_embed[0, 1:].detach().expand(2 * B, -1, -1)  # (G*B, N, D)
    expected = backbone.mask_token.detach() + positions[batch.masks]
    torch.testing.assert_close(masked[:, 1:][batch.masks], expected, rtol=0, atol=1e-6)
    assert (masked[:, 1:][batch.masks] - plain[:, 1:][batch.masks]).abs().amax() > 1e-2


@pytest.mark.parametrize("cls_weight", [1.0, 2.0])
def test_ibot_returns_weighted_total_of_cls_and_patch(cls_weight: float) -> None:
    """`loss` (with graph) = cls_loss_weight * cls + patch_loss_weight (0.5) * patch; both parts detached."""
    method = ibot_method(patch_loss_weight=0.5, cls_loss_weight=cls_weight).train()
    perturb(method.student, seed=10)
    out = method(ibot_batch(), TEACHER_TEMP, PATCH_TEMP)
    assert tuple(out) == method.loss_names == ("loss", "cls", "patch")
    assert out["loss"].requires_grad and not out["cls"].requires_grad and not out["patch"].requires_grad
    assert out["patch"].item() > 0 and out["cls"].item() > 0
    expected = cls_weight * out["cls"].item() + 0.5 * out["patch"].item()
    assert out["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert method.loss_weights == (cls_weight, 0.5)


@pytest.mark.parametrize("separate", [False, True])
def test_ibot_losses_and_centers_equal_reference(separate: bool) -> None:
    """cls = dino's loss on the student's masked-global + local views, patch = ibot's on the same masked globals
    against the unmasked teacher; afterwards both centers = 0.9 old + 0.1 mean (patch: over ALL teacher tokens)."""
    method = ibot_method(**(SEPARATE if separate else {})).train()
    perturb(method.student, seed=11)
    patch_k = 48 if separate else K
    method.dino_loss.center.copy_(torch.linspace(-0.5, 0.5, K))
    method.patch_loss.center.copy_(torch.linspace(0.3, -0.3, patch_k))
    old_center, old_patch_center = method.dino_loss.center.clone(), method.patch_loss.center.clone()
    batch = ibot_batch()
    s, t = method.student, method.teacher
    s_patch_head = s["patch_head"] if separate else s["head"]
    t_patch_head = t["patch_head"] if separate else t["head"]
    with torch.no_grad():
        student = s["backbone"].forward_features(batch.global_crops, masks=batch.masks)
        student_cls = s["head"](torch.cat([student.cls, s["backbone"](batch.local_crops)]))
        student_patch = s_patch_head(student.patch_tokens)  # (G*B, N, K') at every position
        teacher = t["backbone"].forward_features(batch.global_crops)
        teacher_cls, teacher_patch = t["head"](teacher.cls), t_patch_head(teacher.patch_tokens)
        out = method(batch, TEACHER_TEMP, PATCH_TEMP)
    assert teacher_patch.shape == (2 * B, N_PATCHES, patch_k)
    assert out["cls"].item() == pytest.approx(reference_loss(student_cls, teacher_cls, old_center, 4).item(), rel=1e-5)
    expected_patch = reference_patch_loss(student_patch, teacher_patch, batch.masks, old_patch_center)
    assert out["patch"].item() == pytest.approx(expected_patch.item(), rel=1e-5)
    torch.testing.assert_close(method.dino_loss.center, 0.9 * old_center + 0.1 * teacher_cls.mean(0, keepdim=True))
    all_tokens = teacher_patch.mean(dim=(0, 1)).reshape(1, patch_k)
    torch.testing.assert_close(method.patch_loss.center, 0.9 * old_patch_center + 0.1 * all_tokens)


@pytest.mark.parametrize("separate", [False, True])
def test_ibot_unmasked_student_patch_tokens_do_not_change_patch_loss(separate: bool,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Noise on the student's global patch tokens at UNMASKED positions leaves both losses identical; at masked
    positions it changes the patch loss (only masked tokens reach the patch head and the loss)."""
    method = ibot_method(**(SEPARATE if separate else {})).train()
    perturb(method.student, seed=12)
    batch = ibot_batch()
    base = forward_keeping_centers(method, batch)
    backbone = method.student["backbone"]
    original = backbone.forward_features
    where: dict[str, torch.Tensor] = {}

    def noisy(x: torch.Tensor, masks: torch.Tensor | None = None) -> Any:
        out = original(x, masks)
        if masks is not None:  # the global call
            noise = 3 * torch.randn(out.patch_tokens.shape, generator=torch.Generator().manual_seed(0))
            out.patch_tokens = out.patch_tokens + noise * where["select"].unsqueeze(-1)
        return out

    monkeypatch.setattr(backbone, "forward_features", noisy)
    where["select"] = ~batch.masks
    unmasked_noise = forward_keeping_centers(method, batch)
    where["select"] = batch.masks
    masked_noise = forward_keeping_centers(method, batch)
    assert torch.equal(unmasked_noise["patch"], base["patch"]) and torch.equal(unmasked_noise["cls"], base["cls"])
    assert abs(masked_noise["patch"].item() - base["patch"].item()) > 1e-3


@pytest.mark.parametrize("separate", [False, True])
def test_ibot_patch_loss_trains_mask_token_and_patch_head(separate: bool) -> None:
    """With cls_loss_weight 0, backward of the patch loss alone reaches the mask token and the patch head
    (shared: `head`; separate: `patch_head`, while `head` gets exactly zero); the teacher gets nothing."""
    method = ibot_method(cls_loss_weight=0.0, **(SEPARATE if separate else {})).train()
    perturb(method.student, seed=13)
    method(ibot_batch(), TEACHER_TEMP, PATCH_TEMP)["loss"].backward()
    student = method.student
    for name, grad in [("mask_token", student["backbone"].mask_token.grad),
                       ("patch head", (student["patch_head"] if separate else student["head"]).mlp[0].weight.grad),
                       ("patch prototypes", (student["patch_head"] if separate else student["head"])
                        .last_layer.weight_v.grad)]:
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().amax() > 0, name
    if separate:
        assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in student["head"].parameters())
    assert all(p.grad is None for p in method.teacher.parameters())


def test_ibot_full_loss_backward_reaches_every_trainable_student_parameter() -> None:
    """Separate heads, default weights: every trainable student parameter gets a finite gradient, the teacher none."""
    method = ibot_method(**SEPARATE).train()
    method(ibot_batch(), TEACHER_TEMP, PATCH_TEMP)["loss"].backward()
    for name, p in method.student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None for p in method.teacher.parameters())


def test_ibot_batch_without_masks_has_zero_patch_loss() -> None:
    """All masks False: the patch loss is 0 (finite), the mask token's gradient is 0, the patch center still moves."""
    method = ibot_method().train()
    batch = ibot_batch(empty_rows=tuple(range(2 * B)))
    out = method(batch, TEACHER_TEMP, PATCH_TEMP)
    assert out["patch"].item() == 0.0 and torch.isfinite(out["loss"])
    assert out["loss"].item() == pytest.approx(out["cls"].item(), rel=1e-6)
    out["loss"].backward()
    mask_grad = method.student["backbone"].mask_token.grad
    assert mask_grad is None or torch.count_nonzero(mask_grad) == 0
    assert torch.count_nonzero(method.patch_loss.center) > 0


@pytest.mark.parametrize("separate", [False, True])
def test_ibot_head_calls_per_step(separate: bool) -> None:
    """Shared: one student head call on (V*B + M) rows, one teacher call on (G*B + G*B*N) rows. Separate: `head`
    once on the CLS rows and `patch_head` once on the M masked tokens (teacher: on all G*B x N tokens)."""
    method = ibot_method(**(SEPARATE if separate else {})).train()
    batch = ibot_batch()
    num_masked = int(batch.masks.sum())
    names = ("head", "patch_head") if separate else ("head",)
    calls: dict[str, list[tuple[int, ...]]] = {f"{side}.{n}": [] for side in ("s", "t") for n in names}
    handles = [record_calls((method.student if side == "s" else method.teacher)[n], calls[f"{side}.{n}"])
               for side in ("s", "t") for n in names]
    try:
        method(batch, TEACHER_TEMP, PATCH_TEMP)
    finally:
        for handle in handles:
            handle.remove()
    if separate:
        assert calls == {"s.head": [(4 * B, D)], "s.patch_head": [(num_masked, D)],
                         "t.head": [(2 * B, D)], "t.patch_head": [(2 * B, N_PATCHES, D)]}
    else:
        assert calls == {"s.head": [(4 * B + num_masked, D)], "t.head": [(2 * B + 2 * B * N_PATCHES, D)]}


def test_ibot_last_layers_and_loss_state() -> None:
    """Separate head: its prototype layer is frozen with the CLS one; loss_state holds both centers as copies."""
    separate, shared = ibot_method(**SEPARATE), ibot_method()
    s = separate.student
    assert separate.last_layer_parameters() == [s["head"].last_layer.weight_v, s["patch_head"].last_layer.weight_v]
    assert shared.last_layer_parameters() == [shared.student["head"].last_layer.weight_v]
    assert "patch_head" not in shared.student and "patch_head" in separate.teacher
    state = separate.loss_state()
    assert set(state) == {"center", "patch_center"}
    assert state["center"].shape == (1, K) and state["patch_center"].shape == (1, 48)
    state["patch_center"].add_(1.0)
    assert torch.count_nonzero(separate.patch_loss.center) == 0  # a copy, not the live buffer
    assert set(shared.loss_state()) == {"center", "patch_center"}
    assert shared.loss_state()["patch_center"].shape == (1, K)


def test_load_loss_state_is_the_inverse_of_loss_state() -> None:
    """A checkpoint's centers (CLS and iBOT patch) go back into place as values, on a method of the same shape."""
    saved, fresh = ibot_method(**SEPARATE), ibot_method(**SEPARATE)
    saved.dino_loss.center.normal_()
    saved.patch_loss.center.normal_()
    state = saved.loss_state()
    fresh.load_loss_state(state)
    assert all(torch.equal(fresh.loss_state()[name], state[name]) for name in ("center", "patch_center"))
    state["center"].zero_()
    assert torch.count_nonzero(fresh.dino_loss.center) > 0  # copied in, not shared
    dino = tiny_method()
    dino.load_loss_state({"center": torch.ones(1, K)})
    assert torch.equal(dino.dino_loss.center, torch.ones(1, K))


def test_ibot_teacher_ema_covers_patch_head_and_mask_token() -> None:
    """update_teacher(0.5) moves every teacher parameter, the separate patch head's included, halfway."""
    method = ibot_method(**SEPARATE)
    perturb(method.student, seed=14)
    before = {n: p.detach().clone() for n, p in method.teacher.named_parameters()}
    student = {n: p.detach() for n, p in method.student.named_parameters()}
    assert any(n.startswith("patch_head.") for n in before) and "backbone.mask_token" in before
    method.update_teacher(0.5)
    for name, p in method.teacher.named_parameters():
        torch.testing.assert_close(p.detach(), 0.5 * before[name] + 0.5 * student[name], rtol=1e-6, atol=1e-7,
                                   msg=name)


def test_dino_path_has_no_mask_token_and_ibot_has_one() -> None:
    """DINO: no mask token, no patch loss, losses (loss, dino); iBOT: a trainable mask token, (loss, cls, patch)."""
    dino, ibot = tiny_method(), ibot_method()
    assert dino.student["backbone"].mask_token is None and not dino.is_ibot and dino.patch_loss is None
    assert dino.loss_names == ("loss", "dino") and "mask_token" not in dino.student["backbone"].state_dict()
    assert set(dino.loss_state()) == {"center"}
    token = ibot.student["backbone"].mask_token
    assert ibot.is_ibot and ibot.loss_names == ("loss", "cls", "patch")
    assert isinstance(token, nn.Parameter) and token.shape == (1, D)
    assert any(p is token for p in ibot.trainable_parameters())


def test_ibot_without_masks_or_patch_temperature_is_an_error() -> None:
    """iBOT refuses a batch without masks or a call without a teacher patch temperature."""
    method = ibot_method()
    with pytest.raises(ValueError, match="masks"):
        method(crop_batch(), TEACHER_TEMP, PATCH_TEMP)
    with pytest.raises(ValueError, match="patch temperature"):
        method(ibot_batch(), TEACHER_TEMP)


def test_ibot_train_step_freezes_patch_prototypes_and_moves_mask_token() -> None:
    """One iBOT step with the last layer frozen: both prototype layers stay, the mask token and patch MLP move."""
    runtime = setup("cpu", "fp32", 0)
    torch.set_num_threads(1)  # setup() picks every core; keep these tiny tensors on one
    torch.manual_seed(0)
    method = build_method(tiny_config(algorithm="ibot", **SEPARATE)).train()
    optimizer = build_optimizer(method.student, torch.device("cpu"))
    values = {"lr": 1e-3, "weight_decay": 0.04, "momentum": 0.9, "teacher_temp": TEACHER_TEMP,
              "teacher_patch_temp": PATCH_TEMP}
    before = {n: p.detach().clone() for n, p in method.student.named_parameters()}
    out = train_step(method, optimizer, ibot_batch(), values, runtime=runtime, clip_grad_norm=3.0,
                     freeze_last_layer=True)
    assert set(out) == {"loss", "cls", "patch"} and torch.isfinite(out["loss"])
    after = {n: p.detach() for n, p in method.student.named_parameters()}
    for name in ("head.last_layer.weight_v", "patch_head.last_layer.weight_v"):
        assert torch.equal(after[name], before[name]), name
    for name in ("backbone.mask_token", "patch_head.mlp.0.weight"):
        assert not torch.equal(after[name], before[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("algorithm", ["dino", "ibot"])
def test_a_cuda_training_step_never_waits_for_the_host(algorithm: str) -> None:
    """Between two log lines a step is queued without any device-to-host synchronisation (issue 6): the iBOT masks
    are gathered with host-built indices, clipping and the EMA are foreach kernels, and losses stay on the device."""
    runtime = setup("cuda", "bf16", 0)
    method = tiny_method(algorithm=algorithm).to(runtime.device).train()
    optimizer = build_optimizer(method.student, runtime.device)
    batch = (ibot_batch() if algorithm == "ibot" else crop_batch()).pin_memory().to(runtime.device)
    values = {"lr": 1e-4, "weight_decay": 0.04, "momentum": 0.996, "teacher_temp": TEACHER_TEMP,
              "teacher_patch_temp": PATCH_TEMP}

    def step() -> dict[str, torch.Tensor]:
        return train_step(method, optimizer, batch, values, runtime=runtime, clip_grad_norm=3.0,
                          freeze_last_layer=False)

    step()  # the first step initialises kernels and optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(losses["loss"]).item()


# ----------------------------------------------------------------------------------- KoLeo, contrast, teacher views


def test_koleo_adds_its_weighted_term_on_each_global_view() -> None:
    from dinopre.model.regularisers.koleo import koleo_loss

    plain, regularised = tiny_method(), tiny_method(koleo_weight=0.5)
    batch = crop_batch()
    base = plain(batch, TEACHER_TEMP)
    out = regularised(batch, TEACHER_TEMP)
    with torch.no_grad():
        views = regularised.student["backbone"](batch.global_crops).chunk(2)
    expected = sum(koleo_loss(v) for v in views)
    assert out["koleo"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(base["loss"].item() + 0.5 * expected.item(), rel=1e-5)
    assert regularised.loss_names == ("loss", "dino", "koleo")


def test_the_contrastive_head_trains_with_the_student_and_is_never_exported() -> None:
    from dinopre.files.export import backbone_state
    from dinopre.model.regularisers.contrast import info_nce

    method = tiny_method(contrast_weight=2.0).train()
    assert "contrast_head" in method.student and method.loss_names[-1] == "contrast"
    batch = crop_batch()
    out = method(batch, TEACHER_TEMP)
    with torch.no_grad():
        z = method.student["contrast_head"](method.student["backbone"](batch.global_crops))
    assert out["contrast"].item() == pytest.approx(info_nce(z, 2, 0.2).item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["dino"].item() + 2.0 * out["contrast"].item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None for p in method.student["contrast_head"].parameters())
    state = {"teacher": method.teacher.state_dict(), "student": method.student.state_dict()}
    assert not any("contrast" in key for key in backbone_state(state, "teacher"))


@pytest.mark.parametrize("algorithm", ["dino", "ibot"])
def test_the_drloc_head_locates_patch_tokens_trains_with_the_student_and_is_never_exported(algorithm: str) -> None:
    from dinopre.files.export import backbone_state
    from dinopre.model.regularisers.drloc import DRLOC_PAIRS, localisation_loss, relative_offsets, sample_token_pairs

    method = tiny_method(drloc_weight=0.5, algorithm=algorithm).train()
    plain = tiny_method(algorithm=algorithm).train()
    assert "drloc_head" in method.student and method.loss_names[-1] == "drloc"
    assert "drloc_head" not in plain.student and "drloc" not in plain.loss_names
    batch = crop_batch() if algorithm == "dino" else ibot_batch()
    torch.manual_seed(7)
    out = method(batch, TEACHER_TEMP, *(() if algorithm == "dino" else (PATCH_TEMP,)))
    with torch.no_grad():  # the student's tokens (masked for iBOT), as the loss saw them
        masks = batch.masks if algorithm == "ibot" else None
        tokens = method.student["backbone"].forward_features(batch.global_crops, masks=masks).patch_tokens
    torch.manual_seed(7)  # nothing else in the step draws from the global generator (no drop-path here)
    pairs = sample_token_pairs(2 * B, tokens.shape[1], DRLOC_PAIRS, tokens.device)
    expected = localisation_loss(method.student["drloc_head"](tokens, pairs), relative_offsets(pairs, (4, 4)))
    assert out["drloc"].item() == pytest.approx(expected.item(), rel=1e-5)
    main = out["dino"] if algorithm == "dino" else out["cls"] + out["patch"]
    assert out["loss"].item() == pytest.approx(main.item() + 0.5 * out["drloc"].item(), rel=1e-5)
    out["loss"].backward()
    assert all(p.grad is not None for p in method.student["drloc_head"].parameters())
    assert method.student["backbone"].pos_embed.grad.abs().sum() > 0
    state = {"teacher": method.teacher.state_dict(), "student": method.student.state_dict()}
    assert not any("drloc" in key for key in backbone_state(state, "teacher"))


@pytest.mark.parametrize("view", ["gray", "pattern"])
def test_the_teacher_can_see_its_views_without_colour(view: str) -> None:
    from dinopre.data.augment import grayscale_normalized

    method = tiny_method(teacher_view=view)
    batch = crop_batch()
    calls: list[torch.Tensor] = []
    handle = method.teacher["backbone"].register_forward_hook(lambda _m, args, _o: calls.append(args[0]))
    try:
        method(batch, TEACHER_TEMP)
    finally:
        handle.remove()
    seen = calls[0]
    if view == "gray":
        torch.testing.assert_close(seen, grayscale_normalized(batch.global_crops))
        pixels = seen * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(
            3, 1, 1)
        torch.testing.assert_close(pixels[:, 0], pixels[:, 2])  # the same gray in every channel: no colour left
    else:  # standardised per view: brightness and contrast are gone too
        assert torch.equal(seen[:, 0], seen[:, 2])
        torch.testing.assert_close(seen.mean(dim=(1, 2, 3)), torch.zeros(2 * B), atol=1e-5, rtol=0)
        torch.testing.assert_close(seen.square().mean(dim=(1, 2, 3)), torch.ones(2 * B), atol=1e-4, rtol=0)
        brighter = CropBatch(batch.global_crops * 1.5 + 0.3, batch.local_crops, batch.indices)
        calls.clear()
        handle = method.teacher["backbone"].register_forward_hook(lambda _m, args, _o: calls.append(args[0]))
        try:
            method(brighter, TEACHER_TEMP)
        finally:
            handle.remove()
        torch.testing.assert_close(calls[0], seen, atol=1e-4, rtol=0)


def test_sinkhorn_centering_through_the_method_leaves_the_center() -> None:
    method = tiny_method(centering="sinkhorn")
    method(crop_batch(), TEACHER_TEMP)
    assert torch.equal(method.dino_loss.center, torch.zeros(1, K))


# ----------------------------------------------------------------------------------- zero-mean patch filters


def test_zero_mean_patches_make_features_blind_to_a_colour_offset_through_training() -> None:
    """With --zero-mean-patches, adding a constant to one colour channel of an image changes neither the student's
    nor the teacher's features, at the start and after optimizer steps; without it, it does."""
    runtime = setup("cpu", "fp32", 0)
    torch.set_num_threads(1)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    shifted = images + torch.tensor([0.7, -0.3, 0.2]).view(1, 3, 1, 1)
    for on in (True, False):
        torch.manual_seed(0)
        method = build_method(tiny_config(zero_mean_patches=on)).train()
        optimizer = build_optimizer(method.student, torch.device("cpu"))
        values = {"lr": 1e-2, "weight_decay": 0.04, "momentum": 0.5, "teacher_temp": TEACHER_TEMP}
        for _ in range(2):
            train_step(method, optimizer, crop_batch(), values, runtime=runtime, clip_grad_norm=0.0,
                       freeze_last_layer=False)
        for model in (method.student, method.teacher):
            backbone = model["backbone"].eval()
            with torch.no_grad():
                same = torch.allclose(backbone(images), backbone(shifted), atol=1e-4)
            assert same is on
            weight = backbone.patch_embed.proj.weight
            assert (weight.mean(dim=(2, 3)).abs().max().item() < 1e-6) is on


def test_reference_recipe_leaves_patch_filters_free_and_auto_constrains_them() -> None:
    """On a folder of crops; the demo keeps free filters (its synthetic crops differ mostly in colour)."""
    def zero_mean(demo: bool, **settings: Any) -> bool:
        config = build_config("face", demo=demo, cli_settings={"train_dir": ["crops"], **settings})
        return resolve(config, 2000).config.model.zero_mean_patches

    assert zero_mean(False, recipe="reference") is False
    assert zero_mean(False) is True
    assert zero_mean(True) is False
