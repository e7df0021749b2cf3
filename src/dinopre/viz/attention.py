"""What a backbone looks at: the last block's CLS-to-patch attention, per head, drawn over the images.

DINO's first check of a backbone (dino `visualize_attention.py`): in a self-supervised ViT the CLS token's
attention heads in the last block pick out the object, the face or the fingers, without any label. The same
function reads the maps of our training ViT (`vit.Attention`, fused qkv) and of the translation pipeline's ViT
(`nn.MultiheadAttention`, through `need_weights=True, average_attn_weights=False`), so the maps a user sees are the
ones the pipeline's backbone computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from dinopre.base.errors import ConfigError
from dinopre.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from dinopre.model.vit import Attention
from dinopre.viz.figures import Grid, normalized, overlay, to_rgb_array

DEFAULT_KEEP = 0.6  # dino visualize_attention.py's --threshold: the patches holding 60 % of the attention mass


def last_cls_attention(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """CLS-to-patch attention weights of the last attention layer of a ViT.

    Args:
        model: a ViT whose forward runs its attention layers in order (ours, or one built of
            `nn.MultiheadAttention` with batch-first inputs, as the pipeline's).
        images: (B, 3, H, W) normalised images, H and W multiples of the patch size.

    Returns:
        (B, heads, N) softmax weights of the CLS query over the N patch tokens (without the CLS key's own weight,
        so a row sums to at most 1).
    """
    layers = [m for m in model.modules() if isinstance(m, (Attention, nn.MultiheadAttention))]
    if not layers:
        raise ValueError("the model has no attention layer")
    last = layers[-1]
    captured: dict[str, torch.Tensor] = {}

    def keep_weights(module: nn.Module, args: tuple, output: object) -> None:  # None: the output stays as it is
        captured["w"] = output[1] if isinstance(module, nn.MultiheadAttention) else _fused_qkv_weights(module, args[0])

    handles = [last.register_forward_hook(keep_weights)]
    if isinstance(last, nn.MultiheadAttention):
        handles.append(last.register_forward_pre_hook(_ask_for_weights, with_kwargs=True))
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for handle in handles:
            handle.remove()
    return captured["w"][:, :, 0, 1:].float()  # (B, H, N)


def _ask_for_weights(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return args, {**kwargs, "need_weights": True, "average_attn_weights": False}


def _fused_qkv_weights(module: Attention, x: torch.Tensor) -> torch.Tensor:
    """(B, H, N+1, N+1) attention probabilities of our fused-qkv attention on its input tokens."""
    B, N, D = x.shape
    qkv = module.qkv(x).reshape(B, N, 3, module.num_heads, D // module.num_heads).permute(2, 0, 3, 1, 4)
    q, k = qkv[0].float(), qkv[1].float()
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)


def attention_maps(model: nn.Module, images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, heads, H/p, W/p) CLS attention maps of the last block, one per head (see `last_cls_attention`)."""
    weights = last_cls_attention(model, images)
    return weights.unflatten(-1, (images.shape[-2] // patch_size, images.shape[-1] // patch_size))


def keep_mass(attention: torch.Tensor, share: float) -> torch.Tensor:
    """Which patches hold `share` of the attention mass, the strongest first (DINO's thresholded maps).

    Args:
        attention: (..., N) weights.
        share: the part of the mass to keep, in (0, 1].

    Returns:
        (..., N) bool: the smallest set of strongest patches whose weights sum to at least `share` of the total.
    """
    values, order = torch.sort(attention, dim=-1, descending=True)
    cumulative = torch.cumsum(values, dim=-1) / values.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    keep_sorted = (cumulative - values / values.sum(dim=-1, keepdim=True).clamp_min(1e-12)) < share
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


@dataclass
class AttentionFigure:
    """Maps of a set of images and the options of their grid."""

    names: list[str]
    inputs: list[np.ndarray]  # (S, S, 3) uint8, as the model saw them
    maps: torch.Tensor  # (B, heads, h, w)
    keep: float | None
    mean: bool

    def grid(self, cell: int) -> Grid:
        """The figure: per image its input, each head's map over it, optionally the mean and the kept mass."""
        heads = self.maps.shape[1]
        titles = ["input"] + [f"head {h + 1}" for h in range(heads)]
        titles += ["mean"] if self.mean else []
        titles += [f"{self.keep:.0%} of mass"] if self.keep is not None else []
        grid = Grid(cell, titles, colour_bar=True,
                    footer="CLS attention of the last block, per head; each map scaled to its own range")
        for name, image, maps in zip(self.names, self.inputs, self.maps):
            size = image.shape[0]
            pictures = [image] + [overlay(image, _upsampled(normalized(m.numpy()), size)) for m in maps]
            mean = maps.mean(0)
            if self.mean:
                pictures.append(overlay(image, _upsampled(normalized(mean.numpy()), size)))
            if self.keep is not None:
                kept = keep_mass(mean.flatten(), self.keep).reshape(mean.shape).float().numpy()
                shade = _upsampled(kept, size)[..., None]
                pictures.append((image * (0.25 + 0.75 * shade)).round().astype(np.uint8))
            grid.add_row(name, pictures)
        return grid


def _upsampled(values: np.ndarray, size: int) -> np.ndarray:
    """A patch-grid map at image resolution, each patch a block (dino upsamples with nearest)."""
    return np.asarray(Image.fromarray(values.astype(np.float32), mode="F").resize((size, size),
                                                                                  Image.Resampling.NEAREST))


def compute_figure(model: nn.Module, patch_size: int, loaders: list[tuple[str, Callable[[], Image.Image]]],
                   image_size: int, *, keep: float | None = DEFAULT_KEEP, mean: bool = True) -> AttentionFigure:
    """Resize each image to `image_size` (the position embedding is interpolated to its grid), run the model and
    keep each head's map.

    Raises:
        ConfigError: `image_size` is not a multiple of the patch size.
    """
    if image_size % patch_size:
        raise ConfigError(f"--image-size {image_size} must be a multiple of the backbone's patch size {patch_size}.")
    names, inputs = [], []
    for name, load in loaders:
        names.append(name)
        inputs.append(to_rgb_array(load(), image_size))
    batch = torch.from_numpy(np.stack(inputs)).permute(0, 3, 1, 2).float().div_(255.0)
    maps = attention_maps(model, normalize(batch, IMAGENET_MEAN, IMAGENET_STD), patch_size)
    return AttentionFigure(names, inputs, maps, keep, mean)


def interpolated_size_note(native: int, asked: int) -> str:
    """What a user should know when the maps are computed at another size than the backbone was trained at."""
    return (f"The backbone was trained on {native} px views; at {asked} px its position embedding is interpolated "
            "(bicubic), as the pipeline does for other input sizes.")



# ============ the command ============


def collect_images(paths: list[Path], limit: int) -> list[Path]:
    """Image files given directly or found under folders (sorted, recursively, blank crops left out), at most
    `limit` of them.

    Raises:
        DataError: a path does not exist, or no image was found.
    """
    from dinopre.base.errors import DataError
    from dinopre.data.scan import usable_files

    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(usable_files([str(path)])[:max(0, limit - len(found))])
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"'{path}' does not exist; give image files or folders of images.")
    if not found:
        raise DataError(f"No image (.png .jpg .jpeg .bmp .tif .tiff) under {', '.join(map(str, paths))}.")
    return found[:limit]


def draw_attention(model_path: Path, paths: list[Path], output: Path, *, weights: str = "teacher",
                   image_size: int | None = None, limit: int = 8, keep: float | None = DEFAULT_KEEP,
                   mean: bool = True, cell: int = 128, force: bool = False,
                   demo: bool = False) -> tuple[Path, list[str]]:
    """`dinopre attention`: load the backbone, compute the maps of up to `limit` images (the built-in crops first
    with `demo`) and write the grid.

    Returns:
        The PNG written and notes for the user (skipped files, an interpolated size).

    Raises:
        UserError: an unusable model, no usable image, a bad option or an output that must not be written.
    """
    from dinopre.base.errors import DataError
    from dinopre.data.blank import reject_flat
    from dinopre.data.images import BadImageError, load_rgb
    from dinopre.files.export import load_any_backbone
    from dinopre.files.outputs import check_output, check_parent_writable
    from dinopre.viz.figures import check_cells, check_grid, check_picture_path, save_picture

    check_picture_path(output)
    check_cells(limit, cell, images_flag="--max-images")  # the whole picture once the heads are known
    check_output(output, force=force, inputs=[model_path, *paths], what="--output")
    check_parent_writable(output, "the --output picture")
    if keep is not None and not 0 < keep <= 1:
        raise ConfigError(f"--keep-mass must be in (0, 1], got {keep}; 0.6 is DINO's choice.")
    if not paths and not demo:
        raise DataError("Give image files or folders to draw the attention of, or --demo for the built-in crops.")
    model, metadata = load_any_backbone(model_path, weights)
    native, patch = metadata["backbone"]["image_size"], metadata["backbone"]["patch_size"]
    size = image_size or native
    columns = 1 + metadata["backbone"]["num_heads"] + int(mean) + int(keep is not None)
    check_grid(limit, columns, cell, images_flag="--max-images")
    check_attention_size(size, patch)
    notes: list[str] = []
    loaders: list[tuple[str, Callable[[], Image.Image]]] = []
    if demo:  # the synthetic crops of the model's preset (`train --demo` trains on them)
        from dinopre.data.dataset import SyntheticSource

        source = SyntheticSource(str(metadata.get("preset", "face")), limit)
        loaders += [(source.describe(i).replace("synthetic ", ""), lambda i=i: source.load(i)) for i in range(limit)]
    for path in collect_images(paths, limit - len(loaders)) if paths else []:
        try:
            image = reject_flat(load_rgb(path))  # a blank crop shows nothing to attend to
        except BadImageError as exc:
            notes.append(f"'{path}' was skipped: {exc}.")
            continue
        loaders.append((path.name, lambda image=image: image))
    if not loaders:
        raise DataError("None of the images could be decoded; see the notes above.")
    if size != native:
        notes.append(interpolated_size_note(native, size))
    figure = compute_figure(model, patch, loaders, size, keep=keep, mean=mean)
    return save_picture(figure.grid(cell).render(), output), notes


MAX_GRID = 64  # patches per side: the last block's (N+1)^2 attention weights stay a few hundred MB per image


def check_attention_size(image_size: int, patch_size: int) -> None:
    """Refuse an input size whose attention weights would not fit in memory.

    Raises:
        ConfigError: one sentence with the largest size that works for this backbone.
    """
    grid = image_size // patch_size
    if grid > MAX_GRID:
        raise ConfigError(f"--image-size {image_size} gives a {grid} x {grid} patch grid; the maps take at most "
                          f"{MAX_GRID} x {MAX_GRID} (--image-size {MAX_GRID * patch_size} for this backbone's "
                          f"{patch_size} px patches).")
