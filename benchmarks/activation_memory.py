"""Estimate, without a GPU, the activation memory a workload's training step keeps for its backward pass.

    python benchmarks/activation_memory.py W1 W2

Runs the student and teacher forward of one step (bf16 autocast, the GPU code path: blocks fuse their norms as
they do on CUDA) on the CPU at batches 4 and 8, counts the bytes of every distinct tensor storage autograd saves
(`torch.autograd.graph.saved_tensors_hooks`), and extrapolates linearly to the workload's batch. Add the model
state (weights, gradients, AdamW moments, teacher: 20 bytes per student parameter) and the loss's transient
buffers for a rough peak; only `benchmarks/bench.py` on a GPU measures the real one.
"""

from __future__ import annotations

import argparse
import sys

import _checkout  # noqa: F401  (first: puts the checkout's src/ on sys.path when dinopre is not installed)
import numpy as np
import torch
from bench import WORKLOADS

from dinopre.config.loading import build_config
from dinopre.config.recipe import resolve
from dinopre.data.dataset import CropBatch
from dinopre.data.masking import MaskSampler
from dinopre.model import vit
from dinopre.model.method import build_method


def saved_bytes(workload: str, batch: int) -> tuple[int, int]:
    """(bytes autograd saves for one step at `batch`, student parameters) of a workload."""
    settings = {k: v for k, v in WORKLOADS[workload].items() if k != "batch_size"}
    # The reference recipe fills what the workload leaves unset; the image count only matters to the auto recipe.
    config = resolve(build_config("face", cli_settings={**settings, "train_dir": ["unused"]}), 1_000_000).config
    torch.manual_seed(0)
    method = build_method(config).train()
    m, d = config.model, config.data
    masks = None
    if config.method.algorithm == "ibot":
        sampler = MaskSampler(m.image_size // m.patch_size, config.method.mask_probability,
                              config.method.patch_mask_ratio, config.method.mask_shape)
        rng = np.random.default_rng(0)
        masks = torch.from_numpy(np.stack([sampler(rng) for _ in range(2 * batch)]))
    crops = CropBatch(torch.randn(2 * batch, 3, m.image_size, m.image_size),
                      torch.randn(d.num_local_crops * batch, 3, d.local_crop_size, d.local_crop_size)
                      if d.num_local_crops else None, torch.arange(batch), masks)
    storages: dict[int, int] = {}
    parameters = {p.untyped_storage().data_ptr() for p in method.parameters()}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = tensor.untyped_storage().data_ptr()
        if key not in parameters:
            storages.setdefault(key, tensor.untyped_storage().nbytes())
        return tensor

    patch_temp = 0.07 if config.method.algorithm == "ibot" else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        method(crops, 0.04, patch_temp)
    return sum(storages.values()), sum(p.numel() for p in method.student.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workloads", nargs="+", choices=sorted(WORKLOADS))
    args = parser.parse_args(argv)
    vit.NORM_RECOMPUTE_DEVICES = frozenset({"cpu", "cuda"})  # count what the GPU path keeps
    for name in args.workloads:
        small, params = saved_bytes(name, 4)
        large, _ = saved_bytes(name, 8)
        target = WORKLOADS[name]["batch_size"]
        estimate = small + (large - small) * (target - 4) / 4
        print(f"{name}: activations kept for backward at batch {target}: {estimate / 2**30:.2f} GiB "  # noqa: T201
              f"(batch 4: {small / 2**30:.3f}, batch 8: {large / 2**30:.3f}); model state "
              f"{20 * params / 2**30:.2f} GiB for {params / 1e6:.1f}M student parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
