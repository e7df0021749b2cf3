"""`dinopre convert`: a public checkpoint written as the pipeline's backbone file, computing the source's function.

`sources.read_source` recognises the file and gives its backbone in dinopre's names (q/k/v fused, LayerScale
folded). What is left to make the pipeline's plain ViT compute the same function:
- the input normalisation: the pipeline feeds ImageNet-normalised images, and a source trained with another mean
  and std (many timm ViTs use 0.5 / 0.5) sees `a x + b` per channel of them. That affine map folds exactly into the
  patch convolution (no padding): `W (a x + b) + c = (W a) x + (c + sum W b)`;
- `--image-size`: the position embedding resampled once for a smaller training size (bicubic, the same operations
  as dinopre's on-the-fly interpolation).
The output and its sidecar go through `export.write_backbone`: the same path rules as `export` (no overwrite
without --force, never the input) and a strict reload. The metadata records where the weights came from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dinopre import __version__
from dinopre.base.errors import ConfigError
from dinopre.files.checkpoint import FORMAT_VERSION, KIND_BACKBONE, SLT_MODEL_NAME
from dinopre.files.export import write_backbone
from dinopre.files.outputs import check_export_paths
from dinopre.files.sources import IMAGENET, Source, read_source
from dinopre.model.vit import resample_pos_embed


@dataclass(frozen=True)
class Converted:
    """What `convert_source` read and wrote.

    Attributes:
        source: the recognised source.
        output: the backbone file written.
        sidecar: its JSON metadata.
        backbone: the written ViT's description (the source's, at the output's image size).
        notes: what was folded, resampled, dropped or assumed, one sentence each.
    """

    source: Source
    output: Path
    sidecar: Path
    backbone: dict[str, Any]
    notes: tuple[str, ...]


def fold_normalization(tensors: dict[str, torch.Tensor], source: dict[str, list[float]],
                       target: dict[str, list[float]] = IMAGENET) -> dict[str, torch.Tensor]:
    """Patch-embedding weights that give, on `target`-normalised images, what the source's gave on its own.

    An image x in [0, 1] reaches the source as (x - m_s) / s_s and arrives here as t = (x - m_t) / s_t, so the
    source sees a t + b with a = s_t / s_s and b = (m_t - m_s) / s_s per channel; the convolution has no padding,
    so every tap sees a real pixel and the map folds in exactly. Computed in float64, stored in fp32.

    Returns:
        A new dict with `patch_embed.proj.weight` and `.bias` replaced (the same dict when nothing changes).
    """
    if source == target:
        return tensors
    weight = tensors["patch_embed.proj.weight"].double()  # (D, C, p, p)
    bias = tensors["patch_embed.proj.bias"].double()
    mean_s, std_s, mean_t, std_t = (torch.tensor(v, dtype=torch.float64) for v in
                                    (source["mean"], source["std"], target["mean"], target["std"]))
    scale, shift = std_t / std_s, (mean_t - mean_s) / std_s
    folded_bias = bias + (weight * shift[None, :, None, None]).sum(dim=(1, 2, 3))
    return {**tensors, "patch_embed.proj.weight": (weight * scale[None, :, None, None]).float(),
            "patch_embed.proj.bias": folded_bias.float()}


def check_normalization(mean: list[float] | None, std: list[float] | None) -> None:
    """Refuse a --source-mean / --source-std that is not three finite numbers (std positive).

    Raises:
        ConfigError: the first value that is wrong.
    """
    for flag, values in (("--source-mean", mean), ("--source-std", std)):
        if values is None:
            continue
        if len(values) != 3 or not all(math.isfinite(v) for v in values):
            raise ConfigError(f"{flag} takes three finite numbers (red, green, blue), got {list(values)}.")
    if std is not None and min(std) <= 0:
        raise ConfigError(f"--source-std must be positive for each channel, got {list(std)}.")


def pipeline_tensors(source: Source, image_size: int | None = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """The source's backbone as the pipeline runs it: ImageNet-normalised inputs, at `image_size` (default: the
    source's own).

    Returns:
        The tensors (dinopre's names), the ViT description, and notes on what changed.

    Raises:
        ConfigError: `image_size` is not a positive multiple of the patch size, or the normalisation cannot be
            folded (not 3 input channels).
    """
    backbone, notes = dict(source.backbone), []
    tensors = source.tensors
    if source.normalization != IMAGENET:
        if backbone["in_channels"] != 3:
            raise ConfigError(f"'{source.path}' takes {backbone['in_channels']} input channels, so its normalisation "
                              "cannot be mapped onto the pipeline's RGB ImageNet normalisation.")
        tensors = fold_normalization(tensors, source.normalization)
        notes.append(f"Folded the source's input normalisation (mean {_short(source.normalization['mean'])}, std "
                     f"{_short(source.normalization['std'])}) into the patch convolution, so ImageNet-normalised "
                     "inputs give its function.")
    patch, native = backbone["patch_size"], backbone["image_size"]
    if image_size is not None and image_size != native:
        if image_size < patch or image_size % patch:
            raise ConfigError(f"--image-size {image_size} is not a positive multiple of the source's patch size "
                              f"{patch}; pass e.g. --image-size {max(1, round(image_size / patch)) * patch}.")
        grid = image_size // patch
        tensors = {**tensors, "pos_embed": resample_pos_embed(tensors["pos_embed"], grid, grid).detach()}
        backbone["image_size"] = image_size
        notes.append(f"Resampled the position embedding from {native // patch} x {native // patch} to {grid} x "
                     f"{grid} patches (bicubic) for {image_size} px inputs.")
    return tensors, backbone, notes


def _short(values: list[float]) -> str:
    return "/".join(f"{v:g}" for v in values)


def converted_metadata(source: Source, backbone: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The metadata of a converted file: what the pipeline needs to build its ViT, and where the weights came from
    (layout, sha256, the source's LayerNorm eps and input normalisation, what was changed)."""
    return {
        "backbone": backbone,
        "kind": KIND_BACKBONE,
        "format": "slt",
        "format_version": FORMAT_VERSION,
        "model_name": SLT_MODEL_NAME,
        "dinopre_version": __version__,
        **({"weights": source.weights} if source.weights else {}),
        # The eps the weights compute their function with; the pipeline's ViT uses 1e-5 whatever this says.
        "layer_norm_eps": source.layer_norm_eps,
        "normalization": IMAGENET,
        "source": {
            "layout": source.layout,
            "description": source.description,
            "path": str(source.path),
            "sha256": source.sha256,
            "layer_norm_eps": source.layer_norm_eps,
            "normalization": source.normalization,
            "image_size": source.backbone["image_size"],
            "notes": [*source.notes, *notes],
        },
    }


def convert_source(path: str | Path, output: str | Path, *, fmt: str = "slt", weights: str = "teacher",
                   image_size: int | None = None, mean: list[float] | None = None, std: list[float] | None = None,
                   force: bool = False) -> Converted:
    """Write the backbone of a public (or dinopre) checkpoint as the pipeline's file, plus its JSON sidecar.

    Args:
        path: the source (see `sources.read_source` for what is recognised).
        output: the file to write; the sidecar gets the same stem and `.json`.
        fmt: `slt` (the pipeline's key names) or `timm`.
        weights: of a training checkpoint, `teacher` or `student`.
        image_size: resample the position embedding once for this input size.
        mean, std: the source's input normalisation, when its layout does not say.
        force: an existing output (and sidecar) may be replaced.

    Raises:
        RunDirError: the output must not be written (exists without `force`, is the source, ...).
        CheckpointError: the source is unreadable, unknown, not representable exactly, or inconsistent.
        ConfigError: a bad --image-size, --source-mean or --source-std.
    """
    path, output = Path(path), Path(output)
    check_normalization(mean, std)
    check_export_paths(output, force=force, inputs=[path], what="The output")  # before the (slow) read
    source = read_source(path, weights=weights, mean=mean, std=std)
    tensors, backbone, notes = pipeline_tensors(source, image_size)
    metadata = converted_metadata(source, backbone, notes)
    output, sidecar = write_backbone(tensors, metadata, output, fmt=fmt, force=force, inputs=[path],
                                     what="The output")
    return Converted(source, output, sidecar, backbone, (*source.notes, *notes))


def describe_source(source: Source) -> dict[str, Any]:
    """What `inspect-checkpoint` shows for a file that `dinopre convert` takes: its layout and what it would become."""
    b = source.backbone
    head = source.heads.get("head.last_layer.weight_v")
    return {
        "kind": "checkpoint to convert",
        "layout": f"{source.description} ({source.layout})",
        "weights": source.weights,
        "backbone": {"width": b["embed_dim"], "depth": b["depth"], "heads": b["num_heads"], "patch": b["patch_size"],
                     "image size": b["image_size"], "mlp ratio": b["mlp_ratio"]},
        "parameters": {"backbone": sum(t.numel() for t in source.tensors.values())},
        "layer_norm_eps": f"{source.layer_norm_eps:g}",
        "normalization": f"mean {_short(source.normalization['mean'])}, std {_short(source.normalization['std'])}",
        "dino_head": None if head is None else f"{head.shape[0]} prototypes",
        "convert": f"`dinopre convert {source.path} backbone.pt` writes the pipeline's ViT with the same function for "
                   "ImageNet-normalised inputs",
        "notes": " ".join(source.notes) or None,
    }
