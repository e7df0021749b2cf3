"""AdamW with DINO's parameter groups, per-tensor gradient clipping and the last-layer freeze.

- No weight decay on biases and 1-D parameters (norm weights): dino utils.py `get_params_groups`. As there, the
  (K, 1) prototype norms `weight_g` are 2-D and decayed when they are trainable (`--no-norm-last-layer`).
- Weight decay is scheduled on the decayed group only; the lr schedule applies to every group.
- Clipping is per parameter tensor, as dino utils.py `clip_gradients` (not one global norm).
- The prototype layer gets no update during the first `freeze_last_layer_epochs` (dino
  `cancel_gradients_last_layer`): its gradients are dropped, so AdamW skips it entirely, weight decay included.
- Continued pretraining (`--init-from`) splits the backbone into a group per layer and decay kind: layer-wise lr
  decay (BEiT `param_groups_lrd`: block i of n at decay^(n + 1 - i), the embeddings at decay^(n + 1), the final
  norm and the heads at 1), and a scale on the whole backbone that the head warm-up holds at 0.
"""

from __future__ import annotations

import re

import torch
from torch import nn

DECAY, NO_DECAY = "decay", "no_decay"


def param_groups(module: nn.Module) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group.

    Returns:
        Two AdamW parameter groups with a `name` key; the no-decay group has weight_decay 0.
    """
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or param.ndim <= 1 else decay).append(param)
    return [
        {"name": DECAY, "params": decay},
        {"name": NO_DECAY, "params": no_decay, "weight_decay": 0.0},
    ]


def backbone_layer(name: str, depth: int) -> int | None:
    """The layer of a student parameter for layer-wise decay: 0 for the embeddings (patch, position, CLS, mask
    token), i + 1 for block i, depth + 1 for the final norm; None outside the backbone (the heads)."""
    if not name.startswith("backbone."):
        return None
    block = re.match(r"backbone\.blocks\.(\d+)\.", name)
    if block:
        return int(block.group(1)) + 1
    return depth + 1 if name.startswith("backbone.norm.") else 0


def layered_param_groups(module: nn.Module, depth: int, layer_decay: float) -> list[dict]:
    """`param_groups` with the backbone split by layer: each group carries its `lr_scale` (decay^(depth + 1 -
    layer)) and whether it is the `backbone`'s; the heads keep the two plain groups, listed first."""
    groups: dict[tuple[int, str], dict] = {}
    heads = [dict(group, backbone=False, lr_scale=1.0) for group in
             param_groups(nn.ModuleDict({k: v for k, v in module.named_children() if k != "backbone"}))]
    for name, param in module.named_parameters():
        layer = backbone_layer(name, depth)
        if layer is None or not param.requires_grad:
            continue
        kind = NO_DECAY if name.endswith(".bias") or param.ndim <= 1 else DECAY
        group = groups.setdefault((layer, kind), {"name": kind, "params": [], "backbone": True, "layer": layer,
                                                  "lr_scale": layer_decay ** (depth + 1 - layer)})
        if kind == NO_DECAY:
            group["weight_decay"] = 0.0
        group["params"].append(param)
    return heads + [groups[key] for key in sorted(groups)]


def build_optimizer(module: nn.Module, device: torch.device, *, layered: bool = False, depth: int = 0,
                    layer_decay: float = 1.0) -> torch.optim.AdamW:
    """AdamW (0.9, 0.999), eps 1e-8 as dino; the fused kernel on CUDA, foreach elsewhere.

    Args:
        module: the student.
        device: where it trains.
        layered: split the backbone by layer (`layered_param_groups`): continued pretraining. Without it the
            optimizer has the two groups every run before it had, so their checkpoints load as they are.
        depth: the backbone's blocks.
        layer_decay: the lr decay per layer from the top.
    """
    fused = device.type == "cuda"
    groups = layered_param_groups(module, depth, layer_decay) if layered else param_groups(module)
    return torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.999), eps=1e-8, fused=fused,
                             foreach=None if fused else True)


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float,
                    backbone_scale: float = 1.0) -> None:
    """Write this step's lr into every group (times its layer's `lr_scale`, and `backbone_scale` for the
    backbone's groups) and the weight decay into the decayed groups."""
    for group in optimizer.param_groups:
        scale = group.get("lr_scale", 1.0) * (backbone_scale if group.get("backbone") else 1.0)
        group["lr"] = lr * scale if scale != 1.0 else lr
        if group.get("name") == DECAY:
            group["weight_decay"] = weight_decay


@torch.no_grad()
def clip_gradients_per_tensor(parameters: list[nn.Parameter], max_norm: float) -> None:
    """Scale each gradient tensor whose norm exceeds `max_norm` down to it (dino utils.py `clip_gradients`).

    Vectorised with foreach kernels and no host synchronisation: tensors under the limit are multiplied by 1.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    norms = torch._foreach_norm(grads)
    coefs = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)


def cancel_gradients(parameters: list[nn.Parameter]) -> None:
    """Drop the gradients of these parameters so the optimizer leaves them untouched this step."""
    for param in parameters:
        param.grad = None
