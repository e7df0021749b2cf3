"""`dinopre export`, `dinopre convert`, `dinopre inspect-checkpoint` and `dinopre verify-backbone`: the backbone
files of a run, and public checkpoints made into them."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from dinopre.cli.common import Weights, fail, user_errors


class ExportFormat(str, Enum):
    slt = "slt"
    timm = "timm"


@user_errors()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Training checkpoint (checkpoint_last.pt / checkpoint_best.pt).")],
    output: Annotated[Path, typer.Argument(help="Backbone file to write; a .json sidecar goes next to it.")],
    format: Annotated[ExportFormat, typer.Option(
        "--format", help="slt: the translation pipeline's format (load_dinov2_backbone); timm: official DINO / timm "
        "key names for timm.create_model(..., num_classes=0, checkpoint_path=FILE).")] = ExportFormat.slt,
    weights: Annotated[Weights, typer.Option(
        help="teacher (what DINO evaluates and the better backbone) or student.")] = Weights.teacher,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
) -> None:
    """Export a checkpoint's backbone; the file is reloaded strictly before the command succeeds."""
    from dinopre.files.export import export_checkpoint

    path, sidecar, note = export_checkpoint(checkpoint, output, fmt=format.value, weights=weights.value,
                                            force=force)
    typer.echo(f"Wrote {path} ({format.value}, {weights.value} weights) and {sidecar}.")
    if note:
        typer.echo(note)
    if format is ExportFormat.slt:
        typer.echo(f'Load it with load_dinov2_backbone("file::{path}:slt_vitsmall_patch16"); check it with '
                   f"`dinopre verify-backbone {path} --checkpoint {checkpoint}`.")


CONVERT_EPILOG = (
    "Examples (download the files yourself; dinopre never downloads):\n\n"
    "  dinopre convert dino_deitsmall16_pretrain.pth dino_vits16.pt\n\n"
    "  dinopre convert dinov2_vits14_pretrain.pth dinov2_vits14_112.pt --image-size 112\n\n"
    "  dinopre convert model.safetensors vit_s16_timm.pt --source-mean 0.5 0.5 0.5 --source-std 0.5 0.5 0.5\n\n"
    "The shape (width, depth, patch, MLP) comes from the tensors. Variants the pipeline's plain ViT cannot compute "
    "exactly (register tokens, SwiGLU, RoPE, non-square patches) are refused."
)


@user_errors()
def convert(
    source: Annotated[Path, typer.Argument(
        help="Checkpoint to read, recognised by its content: an official DINO backbone or training checkpoint, a "
        "DINOv2 ViT, a timm ViT state dict, a Hugging Face ViTModel or Dinov2Model (.pth, .pt, .bin, "
        ".safetensors), or a dinopre export or training checkpoint.")],
    output: Annotated[Path, typer.Argument(help="Backbone file to write; a .json sidecar goes next to it.")],
    format: Annotated[ExportFormat, typer.Option(
        "--format", help="slt: the translation pipeline's format (load_dinov2_backbone); timm: official DINO / timm "
        "key names.")] = ExportFormat.slt,
    weights: Annotated[Weights, typer.Option(
        help="Of a training checkpoint: teacher (what DINO evaluates) or student.")] = Weights.teacher,
    image_size: Annotated[int | None, typer.Option(
        help="Resample the position embedding once for this input size, a multiple of the source's patch "
        "\\[default: the source's own size].", show_default=False)] = None,
    source_mean: Annotated[tuple[float, float, float] | None, typer.Option(
        metavar="R G B", help="The source's input mean for RGB in [0, 1] when its files do not say (e.g. 0.5 0.5 "
        "0.5 for many timm ViTs) \\[default: ImageNet's, or a config beside the file].",
        show_default=False)] = None,
    source_std: Annotated[tuple[float, float, float] | None, typer.Option(
        metavar="R G B", help="The source's input standard deviation, likewise.", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output file.")] = False,
) -> None:
    """Write a public ViT checkpoint as the pipeline's backbone file with the same function: LayerScale and the
    source's input normalisation are folded into its weights, and the file is reloaded strictly before the command
    succeeds."""
    from dinopre.files.convert import convert_source

    done = convert_source(source, output, fmt=format.value, weights=weights.value, image_size=image_size,
                          mean=list(source_mean) if source_mean else None, std=list(source_std) if source_std else None,
                          force=force)
    read, b = done.source, done.backbone
    typer.echo(f"Read {source}: {read.description}, sha256 {read.sha256[:12]}...: ViT {b['embed_dim']}-d, depth "
               f"{b['depth']}, {b['num_heads']} heads, patch {b['patch_size']}, LayerNorm eps "
               f"{read.layer_norm_eps:g}.")
    for note in done.notes:
        typer.echo(f"  {note}")
    typer.echo(f"Wrote {done.output} ({format.value}, {b['image_size']} px inputs normalised with ImageNet's mean "
               f"and std) and {done.sidecar}.")
    if format is ExportFormat.slt:
        typer.echo(f'Load it with load_dinov2_backbone("file::{done.output}:slt_vitsmall_patch16").')


@user_errors()
def inspect_checkpoint(
    path: Annotated[Path, typer.Argument(help="Training checkpoint, backbone export, or a checkpoint that `dinopre "
                                              "convert` takes.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Describe a training checkpoint or a backbone export (kind, versions, progress, config, sizes, sha256), or a
    public checkpoint: its layout and what `dinopre convert` would make of it."""
    from dinopre.files.export import inspect_file

    info = inspect_file(path)
    if as_json:
        import json

        typer.echo(json.dumps(info, indent=2))
        return
    from dinopre.progress import print_inspection

    print_inspection(info)


@user_errors()
def verify_backbone(
    backbone: Annotated[Path, typer.Argument(help="Exported backbone file.")],
    checkpoint: Annotated[Path | None, typer.Option(
        help="Also check the features equal this checkpoint's (relative error < 1e-4).", show_default=False)] = None,
    image_size: Annotated[int | None, typer.Option(
        help="The second input size to try \\[default: the export's size + 2 patches].", show_default=False)] = None,
) -> None:
    """Check an export loads strictly, runs at two sizes with finite outputs, and matches its checkpoint."""
    if not backbone.is_file():
        fail(f"'{backbone}' does not exist or is not a file; give the path of an exported backbone.")
    if checkpoint is not None and not checkpoint.is_file():
        fail(f"--checkpoint '{checkpoint}' does not exist or is not a file; give a training checkpoint.")
    if image_size is not None and image_size < 1:
        fail(f"--image-size must be a positive number of pixels, got {image_size}.")
    from dinopre.files.export import verify_backbone as verify
    from dinopre.progress import print_verification

    report = verify(backbone, checkpoint=checkpoint, image_size=image_size)
    print_verification(report.rows)
    if not report.ok:
        raise typer.Exit(1)
