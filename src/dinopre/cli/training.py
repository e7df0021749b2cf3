"""`dinopre train` and `dinopre resume`, and `train_with_settings`, the same training for the legacy scripts.

Heavy modules (torch, the engine) are imported inside function bodies so that `dinopre --help` stays instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from dinopre.base.errors import Interrupted, RunComplete, TrainingStopped
from dinopre.cli.common import (
    DATA,
    EVAL,
    METHOD,
    MODEL,
    OPTIM,
    RUN,
    Algorithm,
    AugmentOn,
    BestBy,
    Centering,
    MaskShape,
    Precision,
    Preset,
    Recipe,
    TeacherView,
    fail,
    settings_given,
    user_errors,
)
from dinopre.config.settings import HELP, RESUME_HELP

TRAIN_EPILOG = (
    "Examples:\n\n"
    "  dinopre train face --demo --output-dir work_dirs/demo_face\n\n"
    "  dinopre train face --train-dir data/rois/face --epochs 100 --batch-size 64 "
    "--export-backbone work_dirs/dino_face/backbone.pt\n\n"
    "  dinopre train hands --train-dir data/rois/left --train-dir data/rois/right --config hands.toml\n\n"
    "If the loss stays flat at ln(out-dim) the teacher has collapsed to uniform: lower --teacher-temp (e.g. 0.02) "
    "or --out-dim, or raise --learning-rate. If it drops to ~0 within an epoch (one-hot collapse), raise "
    "--teacher-momentum-base towards 0.999 or lower --learning-rate."
)


# Options `train` shares with `preview` (one definition each, so the two cannot drift apart).
_TRAIN_DIR = Annotated[list[Path] | None, typer.Option(
    "--train-dir", help=HELP["train_dir"], rich_help_panel=DATA, show_default=False)]
_DEMO = Annotated[bool, typer.Option(
    "--demo", help=HELP["demo"],
    rich_help_panel=DATA)]
_NUM_LOCAL_CROPS = Annotated[int | None, typer.Option(
    help=HELP["num_local_crops"],
    rich_help_panel=DATA, show_default=False)]
_LOCAL_CROP_SIZE = Annotated[int | None, typer.Option(
    help=HELP["local_crop_size"],
    rich_help_panel=DATA, show_default=False)]
_GLOBAL_CROP_SCALE = Annotated[tuple[float, float] | None, typer.Option(
    metavar="MIN MAX", help=HELP["global_crop_scale"],
    rich_help_panel=DATA, show_default=False)]
_LOCAL_CROP_SCALE = Annotated[tuple[float, float] | None, typer.Option(
    metavar="MIN MAX", help=HELP["local_crop_scale"],
    rich_help_panel=DATA, show_default=False)]
_FLIP_PROB = Annotated[float | None, typer.Option(
    help=HELP["flip_prob"],
    rich_help_panel=DATA, show_default=False)]
_AUGMENT_ON = Annotated[AugmentOn | None, typer.Option(
    help=HELP["augment_on"],
    rich_help_panel=DATA, show_default=False)]
_IMAGE_SIZE = Annotated[int | None, typer.Option(
    help=HELP["image_size"],
    rich_help_panel=MODEL, show_default=False)]
_PATCH_SIZE = Annotated[int | None, typer.Option(help=HELP["patch_size"], rich_help_panel=MODEL,
                                               show_default=False)]
_ALGORITHM = Annotated[Algorithm | None, typer.Option(help=HELP["algorithm"], rich_help_panel=METHOD,
                                                    show_default=False)]
_RECIPE = Annotated[Recipe | None, typer.Option(
    help=HELP["recipe"], rich_help_panel=METHOD,
    show_default=False)]
_PATCH_MASK_RATIO = Annotated[tuple[float, float] | None, typer.Option(
    metavar="MIN MAX", help=HELP["patch_mask_ratio"], rich_help_panel=METHOD,
    show_default=False)]
_MASK_PROBABILITY = Annotated[float | None, typer.Option(
    help=HELP["mask_probability"], rich_help_panel=METHOD,
    show_default=False)]
_MASK_SHAPE = Annotated[MaskShape | None, typer.Option(
    help=HELP["mask_shape"], rich_help_panel=METHOD,
    show_default=False)]
_CONFIG = Annotated[Path | None, typer.Option(
    "--config", help="TOML or JSON file of settings (flag names with underscores, flat or in \\[model] \\[data] "
    "\\[optim] \\[method] \\[run] tables). Flags given here win over the file.", rich_help_panel=RUN,
    show_default=False)]
_SEED = Annotated[int | None, typer.Option(help=HELP["seed"],
                                         rich_help_panel=RUN, show_default=False)]
_DEVICE = Annotated[str | None, typer.Option(help=HELP["device"],
                                           rich_help_panel=RUN, show_default=False)]


def train(
    preset: Annotated[Preset, typer.Argument(help="Defaults for the kind of crops: [b]face[/] or [b]hands[/] "
                                             "(hands turns horizontal flips off: handedness matters).",
                                             case_sensitive=False)],
    train_dir: _TRAIN_DIR = None,
    demo: _DEMO = False,
    num_local_crops: _NUM_LOCAL_CROPS = None,
    local_crop_size: _LOCAL_CROP_SIZE = None,
    global_crop_scale: _GLOBAL_CROP_SCALE = None,
    local_crop_scale: _LOCAL_CROP_SCALE = None,
    flip_prob: _FLIP_PROB = None,
    num_workers: Annotated[int | None, typer.Option(
        help=HELP["num_workers"],
        rich_help_panel=DATA, show_default=False)] = None,
    augment_on: _AUGMENT_ON = None,
    strict_data: Annotated[bool | None, typer.Option(
        "--strict-data", help=HELP["strict_data"], rich_help_panel=DATA, show_default=False)] = None,
    keep_blank: Annotated[bool | None, typer.Option(
        "--keep-blank", help=HELP["keep_blank"], rich_help_panel=DATA, show_default=False)] = None,
    image_size: _IMAGE_SIZE = None,
    patch_size: _PATCH_SIZE = None,
    vit_embed_dim: Annotated[int | None, typer.Option(help=HELP["vit_embed_dim"], rich_help_panel=MODEL,
                                                      show_default=False)] = None,
    vit_depth: Annotated[int | None, typer.Option(help=HELP["vit_depth"], rich_help_panel=MODEL,
                                                  show_default=False)] = None,
    vit_num_heads: Annotated[int | None, typer.Option(help=HELP["vit_num_heads"], rich_help_panel=MODEL,
                                                      show_default=False)] = None,
    vit_mlp_ratio: Annotated[float | None, typer.Option(help=HELP["vit_mlp_ratio"],
                                                        rich_help_panel=MODEL, show_default=False)] = None,
    init_from: Annotated[Path | None, typer.Option(
        metavar="SOURCE", help=HELP["init_from"], rich_help_panel=MODEL, show_default=False)] = None,
    drop_path_rate: Annotated[float | None, typer.Option(help=HELP["drop_path_rate"],
                                                         rich_help_panel=MODEL, show_default=False)] = None,
    out_dim: Annotated[int | None, typer.Option(
        help=HELP["out_dim"],
        rich_help_panel=MODEL, show_default=False)] = None,
    head_hidden_dim: Annotated[int | None, typer.Option(help=HELP["head_hidden_dim"],
                                                        rich_help_panel=MODEL, show_default=False)] = None,
    norm_last_layer: Annotated[bool | None, typer.Option(
        "--norm-last-layer/--no-norm-last-layer",
        help=HELP["norm_last_layer"],
        rich_help_panel=MODEL, show_default=False)] = None,
    zero_mean_patches: Annotated[bool | None, typer.Option(
        "--zero-mean-patches/--no-zero-mean-patches",
        help=HELP["zero_mean_patches"], rich_help_panel=MODEL, show_default=False)] = None,
    shared_head: Annotated[bool | None, typer.Option(
        "--shared-head/--no-shared-head",
        help=HELP["shared_head"],
        rich_help_panel=MODEL, show_default=False)] = None,
    patch_out_dim: Annotated[int | None, typer.Option(
        help=HELP["patch_out_dim"], rich_help_panel=MODEL,
        show_default=False)] = None,
    epochs: Annotated[int | None, typer.Option(help=HELP["epochs"], rich_help_panel=OPTIM,
                                               show_default=False)] = None,
    batch_size: Annotated[int | None, typer.Option(help=HELP["batch_size"],
                                                   rich_help_panel=OPTIM, show_default=False)] = None,
    learning_rate: Annotated[float | None, typer.Option(
        help=HELP["learning_rate"],
        rich_help_panel=OPTIM, show_default=False)] = None,
    min_lr: Annotated[float | None, typer.Option(help=HELP["min_lr"], rich_help_panel=OPTIM,
                                                 show_default=False)] = None,
    warmup_epochs: Annotated[float | None, typer.Option(help=HELP["warmup_epochs"],
                                                      rich_help_panel=OPTIM, show_default=False)] = None,
    weight_decay: Annotated[float | None, typer.Option(help=HELP["weight_decay"],
                                                       rich_help_panel=OPTIM, show_default=False)] = None,
    weight_decay_end: Annotated[float | None, typer.Option(help=HELP["weight_decay_end"],
                                                           rich_help_panel=OPTIM, show_default=False)] = None,
    clip_grad_norm: Annotated[float | None, typer.Option(
        help=HELP["clip_grad_norm"],
        rich_help_panel=OPTIM, show_default=False)] = None,
    freeze_last_layer_epochs: Annotated[float | None, typer.Option(
        help=HELP["freeze_last_layer_epochs"],
        rich_help_panel=OPTIM, show_default=False)] = None,
    head_warmup_epochs: Annotated[float | None, typer.Option(
        help=HELP["head_warmup_epochs"], rich_help_panel=OPTIM, show_default=False)] = None,
    layer_decay: Annotated[float | None, typer.Option(
        help=HELP["layer_decay"], rich_help_panel=OPTIM, show_default=False)] = None,
    algorithm: _ALGORITHM = None,
    recipe: _RECIPE = None,
    student_temp: Annotated[float | None, typer.Option(help=HELP["student_temp"],
                                                       rich_help_panel=METHOD, show_default=False)] = None,
    teacher_temp: Annotated[float | None, typer.Option(
        help=HELP["teacher_temp"],
        rich_help_panel=METHOD, show_default=False)] = None,
    warmup_teacher_temp: Annotated[float | None, typer.Option(help=HELP["warmup_teacher_temp"],
                                                              rich_help_panel=METHOD, show_default=False)] = None,
    warmup_teacher_temp_epochs: Annotated[float | None, typer.Option(
        help=HELP["warmup_teacher_temp_epochs"], rich_help_panel=METHOD, show_default=False)] = None,
    center_momentum: Annotated[float | None, typer.Option(help=HELP["center_momentum"],
                                                          rich_help_panel=METHOD, show_default=False)] = None,
    centering: Annotated[Centering | None, typer.Option(
        help=HELP["centering"], rich_help_panel=METHOD, show_default=False)] = None,
    koleo_weight: Annotated[float | None, typer.Option(
        help=HELP["koleo_weight"], rich_help_panel=METHOD,
        show_default=False)] = None,
    teacher_view: Annotated[TeacherView | None, typer.Option(
        help=HELP["teacher_view"], rich_help_panel=METHOD,
        show_default=False)] = None,
    contrast_weight: Annotated[float | None, typer.Option(
        help=HELP["contrast_weight"], rich_help_panel=METHOD,
        show_default=False)] = None,
    drloc_weight: Annotated[float | None, typer.Option(
        help=HELP["drloc_weight"],
        rich_help_panel=METHOD, show_default=False)] = None,
    teacher_momentum_base: Annotated[float | None, typer.Option(
        help=HELP["teacher_momentum_base"],
        rich_help_panel=METHOD, show_default=False)] = None,
    teacher_momentum_final: Annotated[float | None, typer.Option(help=HELP["teacher_momentum_final"],
                                                                 rich_help_panel=METHOD, show_default=False)] = None,
    patch_mask_ratio: _PATCH_MASK_RATIO = None,
    mask_probability: _MASK_PROBABILITY = None,
    mask_shape: _MASK_SHAPE = None,
    patch_loss_weight: Annotated[float | None, typer.Option(
        help=HELP["patch_loss_weight"], rich_help_panel=METHOD,
        show_default=False)] = None,
    teacher_patch_temp: Annotated[float | None, typer.Option(
        help=HELP["teacher_patch_temp"], rich_help_panel=METHOD,
        show_default=False)] = None,
    eval_dir: Annotated[Path | None, typer.Option(
        help=HELP["eval_dir"], rich_help_panel=EVAL, show_default=False)] = None,
    eval_every: Annotated[int | None, typer.Option(
        help=HELP["eval_every"],
        rich_help_panel=EVAL, show_default=False)] = None,
    best_by: Annotated[BestBy | None, typer.Option(
        help=HELP["best_by"], rich_help_panel=EVAL, show_default=False)] = None,
    output_dir: Annotated[Path | None, typer.Option(
        help=HELP["output_dir"], rich_help_panel=RUN,
        show_default=False)] = None,
    config: _CONFIG = None,
    export_backbone: Annotated[Path | None, typer.Option(
        help=HELP["export_backbone"],
        rich_help_panel=RUN, show_default=False)] = None,
    resume: Annotated[Path | None, typer.Option(
        "--resume", help="Continue this checkpoint (the original scripts' flag); the other flags must match the "
        "checkpoint except --epochs, --device, --num-workers, --log-interval, --checkpoint-every. "
        "`dinopre resume RUN_DIR` is the shorter way.", rich_help_panel=RUN, show_default=False)] = None,
    checkpoint_every: Annotated[int | None, typer.Option(
        help=HELP["checkpoint_every"], rich_help_panel=RUN, show_default=False)] = None,
    stream: Annotated[str | None, typer.Option(
        help=HELP["stream"], rich_help_panel=RUN, show_default=False)] = None,
    compile: Annotated[bool | None, typer.Option(
        "--compile", help=HELP["compile"], rich_help_panel=RUN,
        show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Start over in an output folder that already holds a run.", rich_help_panel=RUN)] = False,
    seed: _SEED = None,
    device: _DEVICE = None,
    precision: Annotated[Precision | None, typer.Option(
        help=HELP["precision"],
        rich_help_panel=RUN, show_default=False)] = None,
    log_interval: Annotated[int | None, typer.Option(help=HELP["log_interval"],
                                                     rich_help_panel=RUN, show_default=False)] = None,
    logger: Annotated[list[str] | None, typer.Option(
        "--logger", help=HELP["logger"], rich_help_panel=RUN,
        show_default=False)] = None,
    rendezvous_timeout: Annotated[float | None, typer.Option(
        metavar="SECONDS", help=HELP["rendezvous_timeout"], rich_help_panel=RUN, show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.",
                                        rich_help_panel=RUN)] = False,
) -> None:
    """Train a backbone with DINO or iBOT on folders of crops (or on built-in demo data with --demo)."""
    cli_settings = settings_given(locals())
    if resume is not None and init_from is not None:
        fail("--init-from starts a new run from a backbone and --resume continues a checkpoint, whose weights "
             "already came from wherever it started; drop one of them.")
    _run_training(preset.value, demo, config, cli_settings, overwrite=overwrite, quiet=quiet, resume_from=resume)


def _run_training(preset: str, demo: bool, config_file: Path | None, cli_settings: dict[str, Any], *,
                  overwrite: bool, quiet: bool, resume_from: Path | None = None) -> None:
    """Resolve the configuration, then train (or continue `resume_from`)."""
    from dinopre.config.loading import build_config, read_config_file

    def resolve() -> tuple[Any, Path | None]:
        file_settings = read_config_file(config_file) if config_file is not None else None
        settings = dict(cli_settings)
        if resume_from is not None and "output_dir" not in settings and "output_dir" not in (file_settings or {}):
            # Continue in the checkpoint's own folder unless told otherwise, not in the preset's default folder.
            folder = resume_from if resume_from.is_dir() else resume_from.parent
            settings["output_dir"] = str(folder)
        return build_config(preset, demo=demo, file_settings=file_settings, cli_settings=settings), resume_from

    _call_fit(resolve, overwrite=overwrite, quiet=quiet, inputs=(config_file,) if config_file is not None else ())


def train_with_settings(preset: str, settings: dict[str, Any], *, overwrite: bool = False, quiet: bool = False,
                        resume_from: str | Path | None = None) -> int:
    """Train like `dinopre train PRESET` with flag values given as a dict (for the legacy scripts in tools/).

    Args:
        preset: `face` or `hands`.
        settings: configuration fields as `dinopre train` flags would set them (only the ones given).
        overwrite: start over in an output folder that holds a run.
        quiet: print nothing but errors.
        resume_from: a checkpoint to continue.

    Returns:
        The exit code: 0 on success, 2 for a user error, 1 when training stopped, 130 when interrupted.
    """
    try:
        _run_training(preset, False, None, settings, overwrite=overwrite, quiet=quiet,
                      resume_from=Path(resume_from) if resume_from is not None else None)
    except typer.Exit as exc:
        return exc.exit_code
    return 0


class _SaveWatch:
    """Passes events on to a reporter and remembers the last checkpoint saved, for the message after a Ctrl-C."""

    def __init__(self, reporter: Any) -> None:
        self.reporter, self.saved = reporter, None

    def emit(self, event: object) -> None:
        from dinopre.base.events import CheckpointSaved

        if isinstance(event, CheckpointSaved):
            self.saved = event
        self.reporter.emit(event)


def _here(error: BaseException) -> str:
    """The message to print for `error` in this process: none on a process other than the main one when all of them
    stopped together (the main one says it), else the message, naming the process when there are several."""
    from dinopre.base.distributed import launched_rank, shown_here

    if not shown_here(error):
        return ""
    return f"(process {launched_rank()}) {error}" if launched_rank() > 0 else str(error)


@user_errors(message=_here)
def _call_fit(resolve: Any, *, overwrite: bool, quiet: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Run `engine.fit` with a reporter suited to the terminal; map errors to one sentence and an exit code."""
    watch = None
    try:
        config, resume_from = resolve()
        from dinopre.base.distributed import launched_rank
        from dinopre.train.engine import fit  # torch is imported only now: --help and bad flags stay instant
        from dinopre.viz.run_pictures import run_pictures

        reporter = _make_reporter(quiet)
        watch = _SaveWatch(reporter)
        try:
            result = fit(config, watch, overwrite=overwrite, resume_from=resume_from, inputs=inputs,
                         hooks=run_pictures())
        finally:
            reporter.close()
        if result.ignored_signal and not quiet and launched_rank() == 0:  # one process reports
            typer.secho(f"{result.ignored_signal} arrived after the last step and was ignored: the run is complete "
                        "(exit code 0).", fg=typer.colors.YELLOW, err=True)
    except RunComplete as exc:  # every process found it so: one says it, and all exit 0
        from dinopre.base.distributed import launched_rank

        if not quiet and launched_rank() == 0:
            typer.echo(str(exc))
    except TrainingStopped as exc:
        fail(_here(exc), code=1)
    except Interrupted as exc:
        if _here(exc):
            typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        from dinopre.base.hints import resume_command

        saved = watch.saved if watch is not None else None
        if saved is not None:
            fail(f"Interrupted before the next checkpoint; the last one (step {saved.global_step}) is in "
                 f"'{saved.path}'. Continue with: {resume_command(saved.path.parent)}", code=130)
        fail("Interrupted before a new checkpoint could be written; nothing was saved by this command, and an "
             "earlier checkpoint_last.pt, if any, is intact.", code=130)


def _make_reporter(quiet: bool) -> Any:
    from dinopre.base.distributed import launched_rank
    from dinopre.base.events import NullReporter
    from dinopre.progress import PlainReporter, RichReporter

    if quiet or launched_rank() > 0:  # one process reports progress
        return NullReporter()
    return RichReporter() if sys.stdout.isatty() else PlainReporter()


RESUME_EPILOG = (
    "With a larger --epochs, every schedule (lr, weight decay, teacher momentum and temperatures) is redefined over "
    "the new total as if the run had been started with it, and the run continues from the new curves' values at "
    "its current step. Without it, a run that stopped early finishes its planned epochs, bit for bit as if it had "
    "never stopped (on the same kind of device)."
)


def resume(
    target: Annotated[Path, typer.Argument(help="Run directory (its checkpoint_last.pt) or a checkpoint file.")],
    epochs: Annotated[int | None, typer.Option(help=RESUME_HELP["epochs"],
                                               show_default=False)] = None,
    device: Annotated[str | None, typer.Option(help=RESUME_HELP["device"], show_default=False)] = None,
    num_workers: Annotated[int | None, typer.Option(help=RESUME_HELP["num_workers"], show_default=False)] = None,
    augment_on: Annotated[AugmentOn | None, typer.Option(
        help=RESUME_HELP["augment_on"], show_default=False)] = None,
    log_interval: Annotated[int | None, typer.Option(help=RESUME_HELP["log_interval"], show_default=False)] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help=RESUME_HELP["checkpoint_every"],
                                                         show_default=False)] = None,
    eval_every: Annotated[int | None, typer.Option(help=RESUME_HELP["eval_every"],
                                                   show_default=False)] = None,
    rendezvous_timeout: Annotated[float | None, typer.Option(
        metavar="SECONDS", help=RESUME_HELP["rendezvous_timeout"], show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    init_from: Annotated[Path | None, typer.Option(hidden=True, show_default=False)] = None,
) -> None:
    """Continue a run exactly where it stopped: same data order, augmentations, masks, schedules and centers."""
    if init_from is not None:  # hidden: only to say why, instead of "no such option"
        fail("--init-from starts a new run; a resumed run continues from its checkpoint's weights (and needs no "
             "source file). Use `dinopre train PRESET --init-from SOURCE` for a new run.")
    overrides = settings_given(locals())

    def resolve() -> tuple[Any, Path]:
        from dinopre.train.resume import resume_config

        return resume_config(target, overrides)

    _call_fit(resolve, overwrite=False, quiet=quiet)
