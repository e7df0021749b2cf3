"""AdamW with DINO's parameter groups, per-tensor gradient clipping and the last-layer freeze.

- No weight decay on biases and 1-D parameters (norm weights): dino utils.py `get_params_groups`. As there, the
  (K, 1) prototype norms `weight_g` are 2-D and decayed when they are trainable (`--no-norm-last-layer`).
- Weight decay is scheduled on the decayed group only; the lr schedule applies to every group.
- Clipping is per parameter tensor, as dino utils.py `clip_gradients` (not one global norm).
- The prototype layer gets no update during the first `freeze_last_layer_epochs` (dino
  `cancel_gradients_last_layer`): its gradients are dropped, so AdamW skips it entirely, weight decay included.
"""

from __future__ import annotations

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


def build_optimizer(module: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """AdamW (0.9, 0.999), eps 1e-8 as dino; the fused kernel on CUDA, foreach elsewhere."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        param_groups(module), lr=0.0, betas=(0.9, 0.999), eps=1e-8, fused=fused, foreach=None if fused else True
    )


def apply_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Write this step's lr into every group and the weight decay into the decayed group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
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
