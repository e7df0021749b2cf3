"""Tests of the DINO loss and the collapse diagnostics (dinopre.model.losses) against dino main_dino.py `DINOLoss`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinopre.model.losses import DINOLoss, IBOTPatchLoss, teacher_diagnostics

K = 64
B = 5
GLOBAL_VIEWS = 2


pytestmark = pytest.mark.usefixtures("single_thread")


def reference_dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    num_student_views: int,
    teacher_temp: float,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """dino main_dino.py `DINOLoss.forward` written out as its double loop, in float64."""
    student_out = (student_logits.double() / student_temp).chunk(num_student_views)
    teacher_out = F.softmax((teacher_logits.double() - center.double()) / teacher_temp, dim=-1).chunk(GLOBAL_VIEWS)
    total, n_pairs = torch.zeros((), dtype=torch.float64), 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue  # the student and the teacher saw the same view
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total = total + loss.mean()
            n_pairs += 1
    return total / n_pairs


def random_logits(num_local: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop-major student logits ((2 + L)*B, K) and teacher logits (2*B, K) with a realistic spread."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn((GLOBAL_VIEWS + num_local) * B, K, generator=generator)
    teacher = 3 * torch.randn(GLOBAL_VIEWS * B, K, generator=generator)
    return student, teacher


def loss_with_center(center: torch.Tensor, **kwargs: float) -> DINOLoss:
    """A DINOLoss whose center is already set (as after some steps)."""
    loss = DINOLoss(K, **kwargs)
    loss.center.copy_(center)
    return loss


@pytest.fixture
def center() -> torch.Tensor:
    return torch.linspace(-1.0, 2.0, K).reshape(1, K)


# ----------------------------------------------------------------------------------- the formula


@pytest.mark.parametrize("num_local", [0, 1, 4])
def test_loss_equals_reference_double_loop(num_local: int, center: torch.Tensor) -> None:
    """The one-pass sum over pairs equals dino's double loop (total / n_pairs) for 2 globals + 0, 1, 4 locals."""
    student, teacher = random_logits(num_local, seed=num_local)
    views = GLOBAL_VIEWS + num_local
    loss = loss_with_center(center)(student, teacher, num_student_views=views, teacher_temp=0.04)
    expected = reference_dino_loss(student, teacher, center, views, teacher_temp=0.04)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_pairs_exclude_only_same_view() -> None:
    """With identical logits in every view, each pair contributes the same term: the loss is that term."""
    row = torch.randn(B, K, generator=torch.Generator().manual_seed(3))
    student, teacher = row.repeat(GLOBAL_VIEWS + 3, 1), row.repeat(GLOBAL_VIEWS, 1)
    loss = DINOLoss(K)(student, teacher, num_student_views=GLOBAL_VIEWS + 3, teacher_temp=0.07)
    one_pair = -(F.softmax(row.double() / 0.07, -1) * F.log_softmax(row.double() / 0.1, -1)).sum(-1).mean()
    assert loss.item() == pytest.approx(one_pair.item(), rel=1e-5)


@pytest.mark.parametrize("teacher_temp", [0.02, 0.04, 0.07])
def test_teacher_temperature_is_the_argument(teacher_temp: float, center: torch.Tensor) -> None:
    """The teacher temperature of the call is the one in the formula; changing it changes the loss."""
    student, teacher = random_logits(2, seed=11)
    loss = loss_with_center(center)(student, teacher, num_student_views=4, teacher_temp=teacher_temp)
    expected = reference_dino_loss(student, teacher, center, 4, teacher_temp=teacher_temp)
    other = reference_dino_loss(student, teacher, center, 4, teacher_temp=teacher_temp * 2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(loss.item() - other.item()) > 1e-3


def test_student_temperature_is_the_argument(center: torch.Tensor) -> None:
    """`student_temp` replaces dino's 0.1 in log_softmax(s / tau_s)."""
    student, teacher = random_logits(2, seed=12)
    loss = loss_with_center(center, student_temp=0.25)(student, teacher, num_student_views=4, teacher_temp=0.04)
    expected = reference_dino_loss(student, teacher, center, 4, teacher_temp=0.04, student_temp=0.25)
    default = reference_dino_loss(student, teacher, center, 4, teacher_temp=0.04)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(loss.item() - default.item()) > 1e-3


def test_uniform_teacher_and_student_give_ln_k() -> None:
    """Constant logits everywhere: cross-entropy of two uniform distributions is ln K."""
    student, teacher = torch.full((4 * B, K), 0.3), torch.full((2 * B, K), -1.2)
    loss = DINOLoss(K)(student, teacher, num_student_views=4, teacher_temp=0.04)
    assert loss.item() == pytest.approx(math.log(K), rel=1e-6)


# ----------------------------------------------------------------------------------- the center


def test_loss_uses_old_center_then_updates_it(center: torch.Tensor) -> None:
    """The loss is computed with the center before the update; afterwards center = 0.9 old + 0.1 mean(teacher)."""
    student, teacher = random_logits(3, seed=5)
    module = loss_with_center(center)
    loss = module(student, teacher, num_student_views=5, teacher_temp=0.04)
    with_old = reference_dino_loss(student, teacher, center, 5, teacher_temp=0.04)
    expected_center = 0.9 * center.double() + 0.1 * teacher.double().mean(0, keepdim=True)
    with_new = reference_dino_loss(student, teacher, expected_center, 5, teacher_temp=0.04)
    assert loss.item() == pytest.approx(with_old.item(), rel=1e-5)
    assert abs(loss.item() - with_new.item()) > 1e-4
    torch.testing.assert_close(module.center.double(), expected_center, rtol=0, atol=1e-6)


def test_center_momentum_is_the_argument(center: torch.Tensor) -> None:
    """center <- m c + (1 - m) mean(teacher logits) with the configured m."""
    _, teacher = random_logits(0, seed=6)
    module = loss_with_center(center, center_momentum=0.5)
    module.update_center(teacher)
    expected = 0.5 * center + 0.5 * teacher.mean(0, keepdim=True)
    torch.testing.assert_close(module.center, expected, rtol=0, atol=1e-6)


def test_update_center_false_leaves_center(center: torch.Tensor) -> None:
    """`update_center=False` computes the same loss and does not touch the center."""
    student, teacher = random_logits(1, seed=7)
    module = loss_with_center(center)
    loss = module(student, teacher, num_student_views=3, teacher_temp=0.04, update_center=False)
    assert torch.equal(module.center, center)
    assert loss.item() == pytest.approx(reference_dino_loss(student, teacher, center, 3, 0.04).item(), rel=1e-5)


def test_center_is_saved_state() -> None:
    """The center is a (1, K) zero-initialised buffer, so checkpoints carry it."""
    module = DINOLoss(K)
    assert "center" in module.state_dict() and module.state_dict()["center"].shape == (1, K)
    assert torch.count_nonzero(module.center) == 0 and list(module.parameters()) == []


# ----------------------------------------------------------------------------------- precision and gradients


def test_loss_is_fp32_for_bf16_inputs(center: torch.Tensor) -> None:
    """bf16 logits (autocast) give an fp32 loss equal to the reference on the same (upcast) values."""
    student, teacher = (t.bfloat16() for t in random_logits(2, seed=8))
    module = loss_with_center(center)
    loss = module(student, teacher, num_student_views=4, teacher_temp=0.04)
    assert loss.dtype == torch.float32 and module.center.dtype == torch.float32
    expected = reference_dino_loss(student.float(), teacher.float(), center, 4, teacher_temp=0.04)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_reaches_student_only_and_matches_reference(center: torch.Tensor) -> None:
    """d loss / d student equals the reference's gradient; teacher logits get no gradient (stop-gradient)."""
    student, teacher = random_logits(2, seed=9)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    loss_with_center(center)(student, teacher, num_student_views=4, teacher_temp=0.04).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()
    ref_student = student.detach().double().requires_grad_(True)
    reference_dino_loss(ref_student, teacher.detach(), center, 4, teacher_temp=0.04).backward()
    torch.testing.assert_close(student.grad.double(), ref_student.grad, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------- diagnostics


def _diagnose(logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> dict[str, torch.Tensor]:
    """The diagnostics of the teacher targets the DINO loss computes with this center."""
    loss = DINOLoss(logits.shape[1])
    loss.center.copy_(center)
    return teacher_diagnostics(loss.teacher_targets(logits, teacher_temp))


def test_diagnostics_uniform_teacher_has_entropy_ln_k() -> None:
    """Constant teacher logits (uniform collapse): entropy is ln K."""
    out = _diagnose(torch.full((8, K), 2.0), torch.zeros(1, K), teacher_temp=0.04)
    assert out["teacher_entropy"].item() == pytest.approx(math.log(K), rel=1e-6)


def test_diagnostics_one_dominant_prototype_counts_one() -> None:
    """Every row picks the same prototype (one-hot collapse): prototypes_used = 1, entropy ~ 0."""
    logits = torch.randn(10, K, generator=torch.Generator().manual_seed(0))
    logits[:, 17] += 100.0
    out = _diagnose(logits, torch.zeros(1, K), teacher_temp=0.04)
    assert out["prototypes_used"].item() == 1
    assert out["teacher_entropy"].item() < 1e-6


def test_diagnostics_distinct_winners_and_center_is_subtracted() -> None:
    """Each of 8 rows winning a different prototype counts 8; the center is subtracted before the argmax."""
    logits = torch.zeros(8, K)
    logits[torch.arange(8), torch.arange(8)] = 5.0
    assert _diagnose(logits, torch.zeros(1, K), 0.04)["prototypes_used"].item() == 8
    center = torch.zeros(1, K)
    center[0, 40] = -10.0  # subtracting it makes prototype 40 win in every row
    assert _diagnose(logits, center, 0.04)["prototypes_used"].item() == 1


def test_diagnostics_entropy_formula(center: torch.Tensor) -> None:
    """Entropy is the mean over rows of -sum p ln p with p = softmax((t - c) / tau)."""
    _, teacher = random_logits(0, seed=10)
    p = F.softmax((teacher.double() - center.double()) / 0.07, dim=-1)
    expected = -(p * p.clamp_min(1e-300).log()).sum(-1).mean()
    out = _diagnose(teacher, center, 0.07)
    assert out["teacher_entropy"].item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


# ----------------------------------------------------------------------------------- iBOT patch loss

N_PATCHES = 16  # the demo's 4x4 grid


def reference_ibot_patch_loss(
    student_patch: torch.Tensor,
    teacher_patch: torch.Tensor,
    masks: torch.Tensor,
    center: torch.Tensor,
    teacher_temp: float,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """ibot main_ibot.py `iBOTLoss` patch term on FULL (G*B, N, K) student logits, per global view, in float64.

    For view q: loss2 = sum_p CE(softmax((t - c) / tau_t), log_softmax(s / tau_s)) * mask / clamp(mask.sum, 1),
    averaged over the view's B images; then averaged over the G views (n_loss_terms2 = G).
    """
    teacher_p = F.softmax((teacher_patch.double() - center.double()) / teacher_temp, dim=-1).chunk(GLOBAL_VIEWS)
    student_out = (student_patch.double() / student_temp).chunk(GLOBAL_VIEWS)
    view_masks = masks.chunk(GLOBAL_VIEWS)
    total = torch.zeros((), dtype=torch.float64)
    for q in range(GLOBAL_VIEWS):
        loss2 = torch.sum(-teacher_p[q] * F.log_softmax(student_out[q], dim=-1), dim=-1)  # (B, N)
        mask = view_masks[q].double()
        loss2 = torch.sum(loss2 * mask, dim=-1) / mask.sum(dim=-1).clamp(min=1.0)  # (B,)
        total = total + loss2.mean()
    return total / GLOBAL_VIEWS


def patch_masks(seed: int, empty_rows: tuple[int, ...] = (1, 6)) -> torch.Tensor:
    """(G*B, N) bool masks, ~40 % masked per row, with the listed rows left entirely unmasked."""
    generator = torch.Generator().manual_seed(seed)
    masks = torch.rand(GLOBAL_VIEWS * B, N_PATCHES, generator=generator) < 0.4
    masks[:, seed % N_PATCHES] = True  # every other row masks at least one patch
    masks[list(empty_rows)] = False
    return masks


def random_patch_logits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full student patch logits (G*B, N, K) and teacher patch logits (G*B, N, K) with a realistic spread."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(GLOBAL_VIEWS * B, N_PATCHES, K, generator=generator)
    teacher = 3 * torch.randn(GLOBAL_VIEWS * B, N_PATCHES, K, generator=generator)
    return student, teacher


def patch_loss_with_center(center: torch.Tensor, **kwargs: float) -> IBOTPatchLoss:
    """An IBOTPatchLoss whose center is already set (as after some steps)."""
    loss = IBOTPatchLoss(K, **kwargs)
    loss.center.copy_(center)
    return loss


@pytest.mark.parametrize("empty_rows", [(), (1, 6), (0, 2, 3, 4, 5, 7, 8, 9)])
def test_ibot_patch_loss_equals_reference(empty_rows: tuple[int, ...], center: torch.Tensor) -> None:
    """Masked-only student logits in masks[masks] order give ibot's per-view, per-image masked mean (float64)."""
    student, teacher = random_patch_logits(seed=len(empty_rows))
    masks = patch_masks(seed=3 + len(empty_rows), empty_rows=empty_rows)
    loss = patch_loss_with_center(center)(student[masks], teacher, masks, teacher_temp=0.07)
    expected = reference_ibot_patch_loss(student, teacher, masks, center, teacher_temp=0.07)
    assert loss.shape == () and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_ibot_images_count_equally_and_unmasked_images_count_zero() -> None:
    """One masked image among G*B: loss = its mean CE over its masked patches / (G*B), not a mean over tokens."""
    student, teacher = random_patch_logits(seed=20)
    masks = torch.zeros(GLOBAL_VIEWS * B, N_PATCHES, dtype=torch.bool)
    masks[3, [0, 5, 9]] = True
    masks[7, 2] = True
    loss = IBOTPatchLoss(K)(student[masks], teacher, masks, teacher_temp=0.04, update_center=False)
    ce = -(F.softmax(teacher.double() / 0.04, -1) * F.log_softmax(student.double() / 0.1, -1)).sum(-1)  # (GB, N)
    expected = (ce[3, [0, 5, 9]].mean() + ce[7, 2]) / (GLOBAL_VIEWS * B)
    token_mean = ce[masks].mean()  # what a plain mean over the 4 masked tokens would give
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(loss.item() - token_mean.item()) > 1e-2


def test_ibot_no_masked_patch_gives_zero_loss_and_still_updates_center(center: torch.Tensor) -> None:
    """A batch without any masked patch: loss exactly 0 and finite, gradient 0, center still moves (all tokens)."""
    _, teacher = random_patch_logits(seed=21)
    masks = torch.zeros(GLOBAL_VIEWS * B, N_PATCHES, dtype=torch.bool)
    student_masked = torch.zeros(0, K, requires_grad=True)
    module = patch_loss_with_center(center)
    loss = module(student_masked, teacher, masks, teacher_temp=0.07)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert student_masked.grad is not None and student_masked.grad.shape == (0, K)
    expected_center = 0.9 * center + 0.1 * teacher.mean(dim=(0, 1)).reshape(1, K)
    torch.testing.assert_close(module.center, expected_center, rtol=0, atol=1e-6)


def test_ibot_unmasked_student_positions_do_not_matter(center: torch.Tensor) -> None:
    """Perturbing the full student tensor at unmasked positions leaves the loss bit-identical; at masked, not."""
    student, teacher = random_patch_logits(seed=22)
    masks = patch_masks(seed=5)
    noise = 5 * torch.randn(student.shape, generator=torch.Generator().manual_seed(0))
    at_unmasked = student + noise * (~masks).unsqueeze(-1)
    at_masked = student + noise * masks.unsqueeze(-1)
    module = patch_loss_with_center(center)
    base = module(student[masks], teacher, masks, teacher_temp=0.07, update_center=False)
    same = module(at_unmasked[masks], teacher, masks, teacher_temp=0.07, update_center=False)
    moved = module(at_masked[masks], teacher, masks, teacher_temp=0.07, update_center=False)
    assert torch.equal(base, same)
    assert abs(moved.item() - base.item()) > 1e-3
    full_reference = reference_ibot_patch_loss(at_unmasked, teacher, masks, center, teacher_temp=0.07)
    assert base.item() == pytest.approx(full_reference.item(), rel=1e-5)


def test_ibot_masked_order_is_row_major_over_images_and_patches(center: torch.Tensor) -> None:
    """Student rows are matched to teacher tokens in masks[masks] order: shuffling the rows changes the loss."""
    student, teacher = random_patch_logits(seed=23)
    masks = patch_masks(seed=6)
    module = patch_loss_with_center(center)
    ordered = module(student[masks], teacher, masks, teacher_temp=0.07, update_center=False)
    flipped = module(student[masks].flip(0), teacher, masks, teacher_temp=0.07, update_center=False)
    expected = reference_ibot_patch_loss(student, teacher, masks, center, teacher_temp=0.07)
    assert ordered.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(flipped.item() - expected.item()) > 1e-3


def test_ibot_gradient_reaches_student_only_and_matches_reference(center: torch.Tensor) -> None:
    """d loss / d student masked logits equals the reference's gradient at the masked positions; teacher gets none."""
    student, teacher = random_patch_logits(seed=24)
    masks = patch_masks(seed=7)
    student_masked = student[masks].clone().requires_grad_(True)
    teacher.requires_grad_(True)
    patch_loss_with_center(center)(student_masked, teacher, masks, teacher_temp=0.07).backward()
    assert teacher.grad is None
    assert student_masked.grad is not None and torch.isfinite(student_masked.grad).all()
    ref_student = student.double().requires_grad_(True)
    reference_ibot_patch_loss(ref_student, teacher.detach(), masks, center, teacher_temp=0.07).backward()
    torch.testing.assert_close(student_masked.grad.double(), ref_student.grad[masks], rtol=1e-4, atol=1e-8)
    assert torch.count_nonzero(ref_student.grad[~masks]) == 0  # the reference agrees: unmasked tokens get nothing


def test_ibot_uses_old_center_then_updates_from_all_teacher_tokens(center: torch.Tensor) -> None:
    """The loss uses the center before the update; then center = 0.9 old + 0.1 mean over ALL teacher patch tokens."""
    student, teacher = random_patch_logits(seed=25)
    masks = patch_masks(seed=8)
    module = patch_loss_with_center(center)
    loss = module(student[masks], teacher, masks, teacher_temp=0.07)
    expected_center = 0.9 * center.double() + 0.1 * teacher.double().mean(dim=(0, 1)).reshape(1, K)
    masked_only = 0.9 * center.double() + 0.1 * teacher.double()[masks].mean(0, keepdim=True)
    with_old = reference_ibot_patch_loss(student, teacher, masks, center, teacher_temp=0.07)
    with_new = reference_ibot_patch_loss(student, teacher, masks, expected_center, teacher_temp=0.07)
    assert loss.item() == pytest.approx(with_old.item(), rel=1e-5)
    assert abs(loss.item() - with_new.item()) > 1e-4
    torch.testing.assert_close(module.center.double(), expected_center, rtol=0, atol=1e-6)
    assert (module.center.double() - masked_only).abs().max() > 1e-3  # not the mean over masked tokens only


def test_ibot_update_center_false_and_momentum_argument(center: torch.Tensor) -> None:
    """`update_center=False` leaves the center; `center_momentum` is the m of c <- m c + (1 - m) mean."""
    student, teacher = random_patch_logits(seed=26)
    masks = patch_masks(seed=9)
    module = patch_loss_with_center(center)
    loss = module(student[masks], teacher, masks, teacher_temp=0.07, update_center=False)
    assert torch.equal(module.center, center)
    assert loss.item() == pytest.approx(
        reference_ibot_patch_loss(student, teacher, masks, center, teacher_temp=0.07).item(), rel=1e-5)
    fast = patch_loss_with_center(center, center_momentum=0.5)
    fast.update_center(teacher)
    torch.testing.assert_close(fast.center, 0.5 * center + 0.5 * teacher.mean(dim=(0, 1)).reshape(1, K),
                               rtol=0, atol=1e-6)


def test_ibot_temperatures_are_the_arguments(center: torch.Tensor) -> None:
    """The teacher temperature of the call and the module's `student_temp` are the ones in the formula."""
    student, teacher = random_patch_logits(seed=27)
    masks = patch_masks(seed=10)
    module = patch_loss_with_center(center, student_temp=0.2)
    loss = module(student[masks], teacher, masks, teacher_temp=0.04, update_center=False)
    expected = reference_ibot_patch_loss(student, teacher, masks, center, teacher_temp=0.04, student_temp=0.2)
    default = reference_ibot_patch_loss(student, teacher, masks, center, teacher_temp=0.07, student_temp=0.1)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(loss.item() - default.item()) > 1e-3


def test_ibot_bf16_inputs_fp32_loss_and_center_is_state(center: torch.Tensor) -> None:
    """bf16 logits give an fp32 loss equal to the reference on the upcast values; the center is a (1, K) buffer."""
    student, teacher = (t.bfloat16() for t in random_patch_logits(seed=28))
    masks = patch_masks(seed=11)
    module = patch_loss_with_center(center)
    loss = module(student[masks], teacher, masks, teacher_temp=0.07)
    expected = reference_ibot_patch_loss(student.float(), teacher.float(), masks, center, teacher_temp=0.07)
    assert loss.dtype == torch.float32 and module.center.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    fresh = IBOTPatchLoss(48)
    assert fresh.state_dict()["center"].shape == (1, 48) and torch.count_nonzero(fresh.center) == 0
    assert list(fresh.parameters()) == []


# ----------------------------------------------------------------------------------- Sinkhorn-Knopp


def reference_sinkhorn_knopp(teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """dinov2 loss/dino_clstoken_loss.py `sinkhorn_knopp_teacher` for one process, in float64 (no max shift)."""
    q = torch.exp(teacher_output.double() / teacher_temp).t()
    b, k = q.shape[1], q.shape[0]
    q /= torch.sum(q)
    for _ in range(n_iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def test_sinkhorn_knopp_equals_dinov2() -> None:
    from dinopre.model.losses import sinkhorn_knopp

    _, teacher = random_logits(0, seed=3)
    teacher = teacher / 10  # cosine-like logits in about [-1, 1]
    got = sinkhorn_knopp(teacher, 0.04)
    torch.testing.assert_close(got.double(), reference_sinkhorn_knopp(teacher, 0.04), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got.sum(-1), torch.ones(len(teacher)))  # one distribution per image
    # the prototypes' shares are close to equal, unlike a plain softmax of the same logits
    shares = got.sum(0) / got.sum()
    plain = F.softmax(teacher / 0.04, dim=-1).sum(0) / len(teacher)
    assert (shares - 1 / K).abs().max() < (plain - 1 / K).abs().max()


def test_sinkhorn_knopp_survives_logits_that_would_overflow_exp() -> None:
    """With trainable prototype norms (g = 4 here) logits leave [-1, 1]; exp(4 / 0.04) is inf in fp32 without the
    max shift. With it the targets stay finite distributions."""
    from dinopre.model.losses import sinkhorn_knopp

    _, teacher = random_logits(0, seed=4)
    grown = (teacher / 3).clamp(-1, 1) * 4
    assert not torch.isfinite(torch.exp(grown.max() / 0.04))
    got = sinkhorn_knopp(grown, 0.04)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(-1), torch.ones(len(teacher)))


def test_sinkhorn_centering_leaves_the_center_alone_and_changes_the_targets() -> None:
    student, teacher = random_logits(2, seed=5)
    teacher = teacher / 10  # cosine-like logits
    ema, sk = DINOLoss(K), DINOLoss(K, centering="sinkhorn")
    expected_targets = reference_sinkhorn_knopp(teacher, 0.04)
    loss = sk(student, teacher, num_student_views=4, teacher_temp=0.04)
    assert torch.equal(sk.center, torch.zeros(1, K))  # unused and not moved
    assert loss.item() != pytest.approx(ema(student, teacher, num_student_views=4, teacher_temp=0.04).item())
    # the loss is the DINO cross-entropy against the Sinkhorn-Knopp targets
    logp = F.log_softmax(student.double() / 0.1, dim=-1).unflatten(0, (4, B))
    q = expected_targets.unflatten(0, (2, B))
    pairs = [-(q[i] * logp[v]).sum(-1).mean() for i in range(2) for v in range(4) if v != i]
    assert loss.item() == pytest.approx(float(sum(pairs) / len(pairs)), rel=1e-5)
