"""The `dinopre` command: thin Typer commands that build a config and call one core function.

Heavy modules (torch, PIL, the engine) are imported inside command bodies so that `dinopre --help` and shell
completion stay instant. Errors the user can fix print one sentence and exit with code 2, never a traceback.
The commands live in `training` (train, resume), `files` (export, convert, inspect-checkpoint, verify-backbone),
`scoring` (eval), `viz` (preview, plot, attention) and `data` (pack); this module builds the app from them.
"""

from __future__ import annotations

from typing import Annotated

import typer

from dinopre import __version__
from dinopre.cli import data, files, scoring, training, viz

app = typer.Typer(
    name="dinopre",
    help="Pretrain small Vision Transformers with DINO or iBOT self-supervision on face and hand crops, and export "
    "the teacher backbone for the sign-language translation pipeline.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dinopre {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Pretrain small Vision Transformers with DINO or iBOT on face and hand crops."""


# Typer lists the commands in `dinopre --help` in the order they are added here.
app.command(epilog=training.TRAIN_EPILOG)(training.train)
app.command(epilog=training.RESUME_EPILOG)(training.resume)
app.command()(files.export)
app.command(epilog=files.CONVERT_EPILOG)(files.convert)
app.command("inspect-checkpoint")(files.inspect_checkpoint)
app.command("verify-backbone")(files.verify_backbone)
app.command("eval", epilog=scoring.EVAL_EPILOG)(scoring.evaluate)
app.command()(viz.preview)
app.command()(viz.plot)
app.command()(viz.attention)
app.command(epilog=data.PACK_EPILOG)(data.pack)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="dinopre")
