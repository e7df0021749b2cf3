"""`dinopre preview`, `dinopre plot` and `dinopre attention`: pictures of the views, the curves and the attention."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dinopre.cli.common import Preset, Weights, fail, settings_given, user_errors
from dinopre.cli.training import (
    _ALGORITHM,
    _AUGMENT_ON,
    _CONFIG,
    _DEMO,
    _DEVICE,
    _FLIP_PROB,
    _GLOBAL_CROP_SCALE,
    _IMAGE_SIZE,
    _LOCAL_CROP_SCALE,
    _LOCAL_CROP_SIZE,
    _MASK_PROBABILITY,
    _MASK_SHAPE,
    _NUM_LOCAL_CROPS,
    _PATCH_MASK_RATIO,
    _PATCH_SIZE,
    _RECIPE,
    _SEED,
    _TRAIN_DIR,
)


# The parameter list names the same shared option types as `train` (each defined once, beside `train` in
# cli/training.py): Typer reads a command's options from its signature, so the names repeat but their flags, help and
# types cannot drift.
@user_errors()
def preview(
    preset: Annotated[Preset, typer.Argument(help="face or hands: the augmentation defaults to show.",
                                             case_sensitive=False)],
    train_dir: _TRAIN_DIR = None,
    demo: _DEMO = False,
    config: _CONFIG = None,
    num_local_crops: _NUM_LOCAL_CROPS = None,
    local_crop_size: _LOCAL_CROP_SIZE = None,
    global_crop_scale: _GLOBAL_CROP_SCALE = None,
    local_crop_scale: _LOCAL_CROP_SCALE = None,
    flip_prob: _FLIP_PROB = None,
    augment_on: _AUGMENT_ON = None,
    image_size: _IMAGE_SIZE = None,
    patch_size: _PATCH_SIZE = None,
    algorithm: _ALGORITHM = None,
    recipe: _RECIPE = None,
    patch_mask_ratio: _PATCH_MASK_RATIO = None,
    mask_probability: _MASK_PROBABILITY = None,
    mask_shape: _MASK_SHAPE = None,
    seed: _SEED = None,
    device: _DEVICE = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG or JPEG to write.")] = Path("views.png"),
    images: Annotated[int, typer.Option(help="Images shown (the first ones training visits).")] = 4,
    epoch: Annotated[int, typer.Option(help="Epoch whose draws to show (1 = the first).")] = 1,
    cell_size: Annotated[int, typer.Option(help="Side of each view in the grid, in pixels (16 to 1024).")] = 96,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
) -> None:
    """Draw every global and local view of a few images exactly as `train` would render them (iBOT masks shaded).

    Check at a glance that the crops keep what matters: e.g. that --local-crop-scale does not cut the fingers off
    a hand crop. `train` writes the same picture into its run directory (views.png).
    """
    cli_settings = settings_given(locals())
    for name, value, low in (("--images", images, 1), ("--epoch", epoch, 1), ("--cell-size", cell_size, 16)):
        if value < low:
            fail(f"{name} must be at least {low}, got {value}.")
    from dinopre.config.loading import build_config, read_config_file
    from dinopre.viz.preview import preview as draw

    file_settings = read_config_file(config) if config is not None else None
    resolved = build_config(preset.value, demo=demo, file_settings=file_settings, cli_settings=cli_settings)
    path = draw(resolved, output, count=images, epoch=epoch - 1, cell=cell_size, force=force,
                inputs=(config,) if config is not None else ())
    typer.echo(f"Wrote {path}.")


@user_errors()
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (their metrics.jsonl); several are overlaid.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG to write.")] = Path("curves.png"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
) -> None:
    """Draw training curves: loss and its parts, lr, momentum and teacher temperature, teacher entropy against
    ln K, k-NN and RankMe (needs matplotlib: pip install "dinopre\\[plots]")."""
    from dinopre.viz.plot import plot_runs

    path = plot_runs(runs, output, force=force)
    typer.echo(f"Wrote {path}.")


@user_errors()
def attention(
    model: Annotated[Path, typer.Argument(help="Backbone export or training checkpoint.")],
    images: Annotated[list[Path] | None, typer.Argument(
        help="Image files or folders of images (searched recursively).", show_default=False)] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Draw the built-in synthetic crops of the model's preset "
                                                       "(what `train --demo` trains on).")] = False,
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG or JPEG to write.")] = Path("attention.png"),
    weights: Annotated[Weights, typer.Option(
        help="Of a training checkpoint: teacher (what training exports) or student.")] = Weights.teacher,
    image_size: Annotated[int | None, typer.Option(
        help="Input size in pixels; other than the trained size, the position embedding is interpolated "
        "\\[default: the backbone's size].", show_default=False)] = None,
    max_images: Annotated[int, typer.Option(help="Images drawn at most (the first ones, sorted).")] = 8,
    keep_mass: Annotated[float, typer.Option(
        help="Also show the patches holding this share of the mean map's attention (DINO's threshold; 0: "
        "leave the column out).")] = 0.6,
    mean: Annotated[bool, typer.Option("--mean/--no-mean", help="Add the mean of the heads.")] = True,
    cell_size: Annotated[int, typer.Option(help="Side of each picture in the grid, in pixels (16 to 1024).")] = 128,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
) -> None:
    """Draw the last block's CLS attention, one map per head, over each image (DINO's first check of a backbone).

    A good face backbone lights up eyes, mouth and face outline in different heads; a hand backbone, the fingers.
    Maps that are uniform or all alike mean the backbone has not learned much yet.
    """
    for name, value, low in (("--max-images", max_images, 1), ("--cell-size", cell_size, 16)):
        if value < low:
            fail(f"{name} must be at least {low}, got {value}.")
    if image_size is not None and image_size < 1:
        fail(f"--image-size must be a positive number of pixels, got {image_size}.")
    from dinopre.viz.attention import draw_attention

    path, notes = draw_attention(model, images or [], output, weights=weights.value, image_size=image_size,
                                 limit=max_images, keep=keep_mass or None, mean=mean, cell=cell_size,
                                 force=force, demo=demo)
    for note in notes:
        typer.echo(note)
    typer.echo(f"Wrote {path}.")
