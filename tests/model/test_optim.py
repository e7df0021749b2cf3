"""Tests of DINO's optimizer pieces (dinopre.model.optim): parameter groups, schedules, clipping, last-layer freeze."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dinopre.model.heads import DINOHead
from dinopre.model.optim import (
    DECAY,
    NO_DECAY,
    apply_schedules,
    build_optimizer,
    cancel_gradients,
    clip_gradients_per_tensor,
    param_groups,
)
from dinopre.model.vit import VisionTransformer

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_student(norm_last_layer: bool = True) -> nn.ModuleDict:
    """A student as the method builds it: tiny ViT backbone + DINO head."""
    torch.manual_seed(0)
    backbone = VisionTransformer(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    head = DINOHead(32, 64, hidden_dim=64, bottleneck_dim=16, norm_last_layer=norm_last_layer)
    return nn.ModuleDict({"backbone": backbone, "head": head})


def group_names(module: nn.Module, groups: list[dict]) -> dict[str, set[str]]:
    """Parameter names of each group, by group name."""
    names = {id(p): n for n, p in module.named_parameters()}
    return {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}


def dino_clip_gradients(parameters: list[nn.Parameter], clip: float) -> None:
    """dino utils.py `clip_gradients` (the per-tensor loop) as the reference."""
    for p in parameters:
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)


# ----------------------------------------------------------------------------------- parameter groups


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_param_groups_split_by_bias_and_dimension(norm_last_layer: bool) -> None:
    """Biases and 1-D params are not decayed, >=2-D weights are; frozen params are skipped; each trainable once."""
    student = tiny_student(norm_last_layer)
    groups = param_groups(student)
    by_name = group_names(student, groups)
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    expected_no_decay = {n for n, p in trainable.items() if n.endswith(".bias") or p.ndim == 1}
    assert by_name[NO_DECAY] == expected_no_decay
    assert by_name[DECAY] == set(trainable) - expected_no_decay
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == len(trainable)
    assert all(p.ndim >= 2 and not n.endswith(".bias") for n, p in trainable.items() if n in by_name[DECAY])
    # Concrete members a user would look for.
    assert {"backbone.norm.weight", "backbone.blocks.0.norm1.weight", "backbone.blocks.1.attn.qkv.bias",
            "head.mlp.0.bias"} <= by_name[NO_DECAY]
    assert {"backbone.blocks.0.attn.qkv.weight", "backbone.patch_embed.proj.weight", "backbone.pos_embed",
            "backbone.cls_token", "head.mlp.4.weight", "head.last_layer.weight_v"} <= by_name[DECAY]
    assert [g.get("weight_decay") for g in groups if g["name"] == NO_DECAY] == [0.0]


def test_frozen_prototype_norm_is_in_no_group() -> None:
    """With norm_last_layer the frozen weight_g is left out; without it, its (K, 1) shape is decayed as in dino."""
    student = tiny_student(True)
    assert not student["head"].last_layer.weight_g.requires_grad
    frozen = group_names(student, param_groups(student))
    assert all("head.last_layer.weight_g" not in names for names in frozen.values())
    assert "head.last_layer.weight_v" in frozen[DECAY]
    student = tiny_student(False)
    trainable = group_names(student, param_groups(student))
    assert "head.last_layer.weight_g" in trainable[DECAY]


def test_build_optimizer_is_dino_adamw() -> None:
    """AdamW with betas (0.9, 0.999), eps 1e-8 over the two named groups of trainable parameters."""
    student = tiny_student()
    optimizer = build_optimizer(student, CPU)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["name"] for g in optimizer.param_groups] == [DECAY, NO_DECAY]
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 for g in optimizer.param_groups)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == sum(p.requires_grad for p in student.parameters())


def test_apply_schedules_sets_lr_everywhere_and_wd_on_decay_only() -> None:
    """The lr goes into both groups, the weight decay only into the decayed group (no-decay stays 0)."""
    optimizer = build_optimizer(tiny_student(), CPU)
    apply_schedules(optimizer, lr=0.0123, weight_decay=0.321)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups[DECAY]["lr"] == groups[NO_DECAY]["lr"] == 0.0123
    assert groups[DECAY]["weight_decay"] == 0.321 and groups[NO_DECAY]["weight_decay"] == 0.0


# ----------------------------------------------------------------------------------- clipping


def params_with_grads(norms: list[float], seed: int = 0) -> list[nn.Parameter]:
    """Parameters whose gradients have exactly the given L2 norms (float64)."""
    generator = torch.Generator().manual_seed(seed)
    params = []
    for i, norm in enumerate(norms):
        p = nn.Parameter(torch.zeros(3 + i, 4, dtype=torch.float64))
        g = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        p.grad = g * (norm / g.norm())
        params.append(p)
    return params


def test_clip_gradients_equals_dino_per_tensor_loop() -> None:
    """Each tensor above max_norm is scaled to ~max_norm on its own; tensors below are untouched."""
    norms = [10.0, 0.5, 3.0, 2.999, 100.0]
    params, reference = params_with_grads(norms), params_with_grads(norms)
    originals = [p.grad.clone() for p in params]
    clip_gradients_per_tensor(params, 3.0)
    dino_clip_gradients(reference, 3.0)
    for p, r in zip(params, reference, strict=True):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-12, atol=0)
    after = [p.grad.norm().item() for p in params]
    assert after[0] == pytest.approx(3.0, rel=1e-6) and after[4] == pytest.approx(3.0, rel=1e-6)
    assert torch.equal(params[1].grad, originals[1]) and torch.equal(params[3].grad, originals[3])
    # Per tensor, not one global norm: the small tensor is not scaled by the large ones.
    assert after[1] == pytest.approx(0.5)


def test_clip_zero_leaves_grads_and_none_grads_are_skipped() -> None:
    """max_norm 0 means off; parameters without a gradient are ignored."""
    params = params_with_grads([50.0, 0.1])
    before = [p.grad.clone() for p in params]
    clip_gradients_per_tensor(params, 0.0)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))
    no_grad = nn.Parameter(torch.ones(2))
    clip_gradients_per_tensor(params + [no_grad], 1.0)
    assert no_grad.grad is None and params[0].grad.norm().item() == pytest.approx(1.0, rel=1e-6)


# ----------------------------------------------------------------------------------- last-layer freeze


def test_cancel_gradients_makes_adamw_skip_params_and_their_weight_decay() -> None:
    """After cancel_gradients a parameter is bit-identical after AdamW.step, weight decay included; others move."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 3))
    optimizer = build_optimizer(model, CPU)
    apply_schedules(optimizer, lr=0.1, weight_decay=0.5)
    for _ in range(2):  # the second step runs with AdamW state already present for the frozen tensor
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.zero_grad(set_to_none=True)
        model(torch.randn(5, 4)).square().sum().backward()
        cancel_gradients([model[2].weight])
        assert model[2].weight.grad is None
        optimizer.step()
        after = dict(model.named_parameters())
        assert torch.equal(after["2.weight"], before["2.weight"])
        assert not torch.equal(after["0.weight"], before["0.weight"])
        assert not torch.equal(after["2.bias"], before["2.bias"])
        model[2].weight.grad = None
        cancel_gradients([])  # an empty list is fine


def test_without_cancel_weight_decay_alone_moves_a_zero_grad_param() -> None:
    """Control for the test above: a zero (not None) gradient still gets AdamW's decoupled weight decay."""
    p = nn.Parameter(torch.ones(3, 3))
    optimizer = build_optimizer(nn.ParameterList([p]), CPU)
    apply_schedules(optimizer, lr=0.1, weight_decay=0.5)
    p.grad = torch.zeros_like(p)
    optimizer.step()
    torch.testing.assert_close(p.detach(), torch.full((3, 3), 1 - 0.1 * 0.5))
