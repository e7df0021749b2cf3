"""`dinopre eval`: score backbone files side by side on labelled crops, without training anything."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dinopre.cli.common import Weights, user_errors
from dinopre.config.settings import EvalConfig, RunConfig

EVAL_EPILOG = (
    "Examples:\n\n"
    "  dinopre eval work_dirs/dino_face/backbone.pt --eval-dir data/labelled_faces\n\n"
    "  dinopre eval dino_vits16.pt work_dirs/continued/checkpoint_best.pt work_dirs/scratch/backbone.pt "
    "--eval-dir data/labelled_faces --linear --json\n\n"
    "A run's own figure: give its checkpoint and the --eval-dir it trained with (and its --seed when the folder has "
    "no train/ and test/ sub-folders); the k-NN equals the one its epoch logged."
)


@user_errors()
def evaluate(
    backbones: Annotated[list[Path], typer.Argument(
        metavar="BACKBONE", help="Backbone exports (slt or timm, converted files too) or training checkpoints, "
        "scored side by side.", show_default=False)],
    eval_dir: Annotated[Path, typer.Option(
        help="Labelled images: one sub-folder per class (or train/ and test/ holding those), as for `train "
        "--eval-dir`.", show_default=False)],
    image_size: Annotated[int | None, typer.Option(
        help="Input size in pixels for every backbone; the position embedding is interpolated \\[default: each "
        "backbone's own size].", show_default=False)] = None,
    weights: Annotated[Weights, typer.Option(
        help="Of a training checkpoint: teacher (what training evaluates and exports) or student.")] = Weights.teacher,
    linear: Annotated[bool, typer.Option(
        "--linear", help="Also score a linear probe: logistic regression on the frozen, L2-normalised CLS features "
        "of the train fold, tested on the test fold (seconds on a CPU).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list, one object per backbone, and no "
                                                         "progress.")] = False,
    seed: Annotated[int, typer.Option(
        help="Seeds the held-out share of each class when the folder has no train/ and test/; pass the run's "
        "--seed to reproduce its figure.")] = RunConfig.seed,
    test_share: Annotated[float, typer.Option(
        help="Share of each class held out for testing when the folder has no train/ and test/.")]
        = EvalConfig.eval_test_share,
    knn_k: Annotated[int, typer.Option(help="Neighbours that vote.")] = EvalConfig.knn_k,
    knn_temperature: Annotated[float, typer.Option(help="Votes are exp(cosine similarity / T).")]
        = EvalConfig.knn_temperature,
    device: Annotated[str, typer.Option(help="Where the features are computed: auto, cpu, cuda or cuda:INDEX.")]
        = "auto",
) -> None:
    """Score backbone files on labelled crops with the weighted k-NN training logs (and a linear probe), side by side.

    Compare a public backbone, its continuation and a scratch run without training anything.
    """
    from dinopre.progress import print_scores, scoring_reporter
    from dinopre.train.scoring import score_backbones

    reporter = scoring_reporter(quiet=as_json)
    try:
        scores = score_backbones(backbones, eval_dir, weights=weights.value, image_size=image_size, linear=linear,
                                 seed=seed, test_share=test_share, k=knn_k, temperature=knn_temperature,
                                 device=device, reporter=reporter)
    finally:
        reporter.close()
    if as_json:
        import json

        typer.echo(json.dumps([score.as_dict() for score in scores], indent=2))
        return
    print_scores(scores, str(eval_dir), knn_k, knn_temperature)
