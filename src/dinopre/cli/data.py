"""`dinopre pack`: folders of crops written into tar shards that `--train-dir` reads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dinopre.cli.common import user_errors

PACK_EPILOG = (
    "Example: dinopre pack crops/face shards/face --shard-size 1GB, then dinopre train face --train-dir shards/face "
    "(or the brace pattern the command prints). Pack each stream (face, hand_l, hand_r) on its own."
)


@user_errors()
def pack(
    folders: Annotated[list[Path], typer.Argument(help="Folders of crops, searched recursively.", show_default=False)],
    output_dir: Annotated[Path, typer.Argument(help="The folder to create for the shards (must not exist).",
                                               show_default=False)],
    shard_size: Annotated[str, typer.Option(help="Largest shard: 1GB, 500MB, 2GiB, ...")] = "1GB",
    shuffle_seed: Annotated[int | None, typer.Option(
        help="Spread the images over the shards in this seed's random order \\[default: the folders' sorted order].",
        show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
) -> None:
    """Write folders of crops into tar shards (the WebDataset layout) for --train-dir, leaving out blank crops and
    files that cannot be decoded (listed in left_out.json)."""
    from dinopre.data.pack import pack_folders, parse_size
    from dinopre.progress import CountProgress

    size = parse_size(shard_size)
    with CountProgress("packing", quiet=quiet) as progress:
        result = pack_folders(folders, output_dir, shard_size=size, shuffle_seed=shuffle_seed, progress=progress)
    if not quiet:
        typer.echo(f"Wrote {result.members} images into {len(result.shards)} shard(s) in {result.output}; left out "
                   f"{result.blank} blank and {result.undecodable} undecodable file(s) (left_out.json). Train on them "
                   f"with --train-dir {result.output} or --train-dir '{result.pattern()}'.")
