"""`dinopre export`, `dinopre inspect-checkpoint` and `dinopre verify-backbone`: the backbone files of a run."""

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


@user_errors()
def inspect_checkpoint(
    path: Annotated[Path, typer.Argument(help="Training checkpoint or backbone export.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Describe a training checkpoint or a backbone export: kind, versions, progress, config, sizes, sha256."""
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
