"""The command line shared by the legacy scripts `pretrain_dino_face.py` and `pretrain_dino_hands.py`.

The original tool shipped two argparse scripts with the same flags. They are kept so that existing commands and
job files still work, but they are thin shims: this module parses exactly the original flags (plus `--overwrite`
and `--quiet`), maps them onto `dinopre train` settings and calls `dinopre.cli.training.train_with_settings`, the
same core the `dinopre` command uses. There is no second training loop here.

`tools/` is not a package: the scripts put their own folder on `sys.path` and `import _legacy_cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any, NoReturn

# The scripts promise to run as `python tools/pretrain_dino_face.py` from a fresh clone: _checkout falls back to
# the package next to this folder.
import _checkout  # noqa: F401  (first: puts the checkout's src/ on sys.path when dinopre is not installed)

# Both imports are cheap (no torch): `--help` and malformed flags answer at once; torch loads only to train.
from dinopre.cli.training import train_with_settings
from dinopre.config.presets import PRESETS, reference_value
from dinopre.config.settings import FIELD_SECTION, RECIPE_SETTINGS, SECTIONS


def preset_default(preset: str, name: str) -> Any:
    """The value a setting takes under `preset` when no flag sets it.

    Args:
        preset: `face` or `hands`.
        name: a configuration field name, e.g. `out_dim`.

    Returns:
        The preset's value, or the DINO reference default of the field when the preset keeps it.
    """
    if name in PRESETS[preset]:
        return PRESETS[preset][name]
    section = SECTIONS[FIELD_SECTION[name]]
    return next(f.default for f in dataclasses.fields(section) if f.name == name)


def _shown(value: Any) -> str:
    """A default as it would be typed on the command line (tuples as `MIN MAX`)."""
    if isinstance(value, (tuple, list)):
        return " ".join(str(v) for v in value)
    return str(value)


class _LegacyParser(argparse.ArgumentParser):
    """argparse with dinopre's error style: one `Error:` sentence on stderr and exit code 2, no usage dump."""

    def error(self, message: str) -> NoReturn:
        """Report a malformed command line in one sentence and exit with code 2."""
        self.exit(2, f"Error: {message}; run `{self.prog} --help` for the options.\n")


def build_parser(preset: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of a legacy script: the original flags plus `--overwrite` and `--quiet`.

    Every value flag defaults to None so that the preset decides; the help names the preset's value.

    Args:
        preset: `face` or `hands`; only changes the defaults shown in the help.
        prog: program name for usage and errors (default: the script's file name).

    Returns:
        The parser; its namespace holds the settings in `LEGACY_SETTINGS` plus `resume`, `overwrite` and `quiet`.
    """

    def default(name: str, shown: str | None = None) -> str:
        if shown is None and name in RECIPE_SETTINGS and preset_default(preset, name) is None:
            reference = reference_value(preset, name)
            shown = "derived from the data by the auto recipe" + (
                f"; the reference recipe's is {_shown(reference)}" if reference is not None else "")
        return f" [{preset} default: {shown if shown is not None else _shown(preset_default(preset, name))}]"

    parser = _LegacyParser(
        prog=prog,
        description=f"Pretrain a {preset} backbone (ViT) with DINO or iBOT on folders of crops and export it for "
        f"load_dinov2_backbone. Legacy entry point: it runs exactly `dinopre train {preset}` with the original "
        "scripts' flags. Only --overwrite and --quiet are new; everything else (e.g. --config, --demo, "
        "--flip-prob, --mask-shape) is available through `dinopre train`.",
        epilog=f"Example: python {prog or 'tools/pretrain_dino_' + preset + '.py'} --train-dir data/rois/{preset} "
        f"--epochs 100 --batch-size 64 --export-backbone work_dirs/dino_{preset}/backbone.pt",
    )

    data = parser.add_argument_group("data")
    # nargs="+" with action="extend" accepts both `--train-dir a b` and `--train-dir a --train-dir b`, as the
    # original scripts did.
    data.add_argument("--train-dir", nargs="+", action="extend", metavar="DIR",
                      help="Folder(s) of images, searched recursively (.png .jpg .jpeg .bmp .tif .tiff). Give "
                      "several after one flag or repeat the flag. Required.")
    data.add_argument("--num-local-crops", type=int, metavar="N",
                      help="Small views per image seen by the student only." + default("num_local_crops"))
    data.add_argument("--local-crop-size", type=int, metavar="PX",
                      help="Side of the local views in pixels (a multiple of --patch-size)."
                      + default("local_crop_size"))
    data.add_argument("--global-crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                      help="Share of the image area a global view covers." + default("global_crop_scale"))
    data.add_argument("--local-crop-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                      help="Share of the image area a local view covers." + default("local_crop_scale"))
    data.add_argument("--num-workers", type=int, metavar="N",
                      help="Data-loading processes." + default("num_workers", "CPUs - 1, at most 8"))

    model = parser.add_argument_group("model")
    model.add_argument("--image-size", type=int, metavar="PX",
                       help="Side of the global views and of the exported backbone's input." + default("image_size"))
    model.add_argument("--patch-size", type=int, metavar="PX", help="ViT patch side." + default("patch_size"))
    model.add_argument("--vit-embed-dim", type=int, metavar="D",
                       help="Token width (384 = ViT-S)." + default("vit_embed_dim"))
    model.add_argument("--vit-depth", type=int, metavar="N", help="Transformer blocks." + default("vit_depth"))
    model.add_argument("--vit-num-heads", type=int, metavar="N", help="Attention heads." + default("vit_num_heads"))
    model.add_argument("--vit-mlp-ratio", type=float, metavar="X",
                       help="MLP width as a multiple of the token width." + default("vit_mlp_ratio"))
    model.add_argument("--out-dim", type=int, metavar="K",
                       help="Prototypes of the projection head." + default("out_dim"))
    model.add_argument("--head-hidden-dim", type=int, metavar="D",
                       help="Hidden width of the projection head MLP." + default("head_hidden_dim"))
    model.add_argument("--patch-out-dim", type=int, metavar="K",
                       help="iBOT: prototypes of the patch head; a value other than --out-dim gives a separate "
                       "patch head." + default("patch_out_dim", "--out-dim, one head shared with the CLS token"))

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--epochs", type=int, metavar="N", help="Passes over the data." + default("epochs"))
    optim.add_argument("--batch-size", type=int, metavar="N",
                       help="Images per step (each gives 2 global + local views)." + default("batch_size"))
    optim.add_argument("--learning-rate", type=float, metavar="LR",
                       help="Peak learning rate after warmup." + default("learning_rate"))
    decay_end = _shown(preset_default(preset, "weight_decay_end"))
    optim.add_argument("--weight-decay", type=float, metavar="WD",
                       help=f"AdamW weight decay at the start (cosine to {decay_end} at the end)."
                       + default("weight_decay"))
    optim.add_argument("--warmup-epochs", type=int, metavar="N",
                       help="Epochs of linear learning-rate warmup from 0." + default("warmup_epochs"))
    optim.add_argument("--clip-grad-norm", type=float, metavar="X",
                       help="Clip each parameter's gradient norm to this (0 disables)." + default("clip_grad_norm"))

    method = parser.add_argument_group("method")
    method.add_argument("--algorithm", choices=("dino", "ibot"),
                        help="Self-supervision method: DINO, or iBOT (DINO plus masked patch prediction)."
                        + default("algorithm"))
    method.add_argument("--teacher-momentum-base", type=float, metavar="M",
                        help="Teacher EMA momentum at the start (cosine to the final value)."
                        + default("teacher_momentum_base"))
    method.add_argument("--teacher-momentum-final", type=float, metavar="M",
                        help="Teacher EMA momentum at the end." + default("teacher_momentum_final"))
    method.add_argument("--student-temp", type=float, metavar="T",
                        help="Student softmax temperature." + default("student_temp"))
    method.add_argument("--teacher-temp", type=float, metavar="T",
                        help="Teacher softmax temperature." + default("teacher_temp"))
    method.add_argument("--center-momentum", type=float, metavar="M",
                        help="EMA momentum of the teacher output center." + default("center_momentum"))
    method.add_argument("--patch-mask-ratio", type=float, metavar="R",
                        help="iBOT: share of a masked view's patches that are masked, fixed at R for every view "
                        "(same as `dinopre train --patch-mask-ratio R R`)."
                        + default("patch_mask_ratio", "drawn in 0.1-0.5 per view"))
    method.add_argument("--patch-loss-weight", type=float, metavar="W",
                        help="iBOT: weight of the masked-patch loss against the CLS loss."
                        + default("patch_loss_weight"))

    run = parser.add_argument_group("output and hardware")
    run.add_argument("--output-dir", metavar="DIR",
                     help="Run folder for checkpoint_last.pt, checkpoint_best.pt and logs." + default("output_dir"))
    run.add_argument("--export-backbone", metavar="PATH",
                     help="At the end, write the teacher backbone here (plus a .json sidecar) in the format "
                     "load_dinov2_backbone reads." + default("export_backbone", "no export"))
    run.add_argument("--stream", metavar="NAME",
                     help="Pipeline stream the backbone is for (e.g. face, hand_left), recorded in the export's "
                     "metadata." + default("stream", preset))
    run.add_argument("--resume", metavar="CHECKPOINT",
                     help="Continue this training checkpoint (or run folder). Repeat the original run's flags, "
                     "--output-dir included; only --epochs (to train longer), --device, --num-workers, "
                     "--log-interval, --export-backbone and --stream may differ.")
    run.add_argument("--seed", type=int, help="Seed; the same seed and data give the same run." + default("seed"))
    run.add_argument("--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:INDEX." + default("device"))
    run.add_argument("--log-interval", type=int, metavar="N",
                     help="Steps between log lines." + default("log_interval"))
    run.add_argument("--overwrite", action="store_true",
                     help="Start over in an output folder that already holds a run (new; not in the original "
                     "scripts).")
    run.add_argument("--quiet", action="store_true",
                     help="Print nothing but errors (new; not in the original scripts).")
    return parser


def settings_from_args(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    """Map parsed legacy flags onto `dinopre train` settings, keeping only the flags the user gave.

    Args:
        preset: `face` or `hands`; needed to resolve `--out-dim` when only `--patch-out-dim` is given.
        args: the namespace from `build_parser(preset).parse_args(...)`.

    Returns:
        Settings for `train_with_settings`: unset flags are absent so that the preset decides.
    """
    settings: dict[str, Any] = {}
    for name, value in vars(args).items():
        if name not in FIELD_SECTION or value is None:
            continue  # --resume, --overwrite and --quiet are not settings; unset flags leave the preset's value
        if name == "patch_mask_ratio":
            value = (value, value)  # the original single ratio R was a fixed share: dinopre's range [R, R]
        elif name in ("global_crop_scale", "local_crop_scale"):
            value = tuple(value)
        settings[name] = value
    if "patch_out_dim" in settings:
        if settings["patch_out_dim"] != settings.get("out_dim"):
            # The original tool always had its own patch head, so a patch size other than the CLS head's means a
            # separate head; dinopre shares the head by default and would refuse the combination otherwise.
            settings["shared_head"] = False
    return settings


# The original scripts' value flags, as `dinopre train` setting names: every parser option named like a setting.
LEGACY_SETTINGS: tuple[str, ...] = tuple(action.dest for action in build_parser("face")._actions
                                         if action.dest in FIELD_SECTION)


def main(preset: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parse a legacy command line and train like `dinopre train PRESET`.

    Args:
        preset: `face` or `hands`.
        argv: the arguments without the program name (default: `sys.argv[1:]`).
        prog: program name for usage and errors (default: the script's file name).

    Returns:
        The exit code of `train_with_settings`: 0 on success, 2 for bad input, 1 when training stopped,
        130 when interrupted. Malformed flags exit with code 2 before training starts.
    """
    args = build_parser(preset, prog).parse_args(argv)
    settings = settings_from_args(preset, args)
    return train_with_settings(preset, settings, overwrite=args.overwrite, quiet=args.quiet, resume_from=args.resume)
