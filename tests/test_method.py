"""Tests of the student/teacher pair (dinopre.method) and one DINO optimizer step (dinopre.engine.train_step)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinopre.config import PretrainConfig, build_config
from dinopre.data import CropBatch
from dinopre.engine import train_step
from dinopre.method import StudentTeacher, build_method
from dinopre.optim import build_optimizer
from dinopre.runtime import setup

B, K, D = 3, 64, 32
TEACHER_TEMP = 0.04


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread avoids OpenMP wake-up latency on a loaded 2-core machine (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(**overrides: Any) -> PretrainConfig:
    """The face demo config shrunk to a 32-wide, 2-block ViT with K = 64 prototypes and 2 local crops."""
    settings: dict[str, Any] = dict(vit_embed_dim=D, vit_depth=2, vit_num_heads=2, out_dim=K, head_hidden_dim=64,
                                    head_bottleneck_dim=16, num_local_crops=2)
    settings.update(overrides)
    return build_config("face", demo=True, cli_settings=settings)


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
