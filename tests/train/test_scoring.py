"""Scoring backbone files (`dinopre eval`'s core): the k-NN is training's, images are decoded once per input size,
the linear probe reaches its optimum and separates what is separable, and unusable inputs are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinopre.base.errors import CheckpointError, ConfigError, DataError
from dinopre.base.events import ScoringProgress
from dinopre.files.checkpoint import backbone_metadata
from dinopre.files.export import load_any_backbone, write_backbone
from dinopre.model.vit import VisionTransformer
from dinopre.train.evaluation import Evaluator, scan_labelled, weighted_knn_accuracy
from dinopre.train.scoring import (
    PROBE_WEIGHT_DECAY,
    Score,
    fit_linear_probe,
    linear_probe_accuracy,
    probe_objective,
    score_backbones,
)


class Recorder:
    def __init__(self) -> None:
        self.events: list[object] = []

    def emit(self, event: object) -> None:
        self.events.append(event)


def write_export(path: Path, *, image_size: int = 32, patch_size: int = 8, seed: int = 0) -> Path:
    """A tiny random ViT written as an `slt` export (what `dinopre export` writes)."""
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=image_size, patch_size=patch_size, embed_dim=32, depth=2, num_heads=2)
    config = {"model": {"image_size": image_size, "patch_size": patch_size, "vit_embed_dim": 32, "vit_depth": 2,
                        "vit_num_heads": 2, "vit_mlp_ratio": 4.0},
              "preset": "face", "run": {}, "method": {"algorithm": "dino"}}
    write_backbone(model.state_dict(), backbone_metadata(config, epoch=0, weights="teacher"), path)
    return path


def write_colour_classes(root: Path, count: int = 12, size: int = 40) -> Path:
    """Classes anyone can tell apart: noisy images of a red, a green and a blue tint."""
    rng = np.random.default_rng(0)
    for name, channel in (("red", 0), ("green", 1), ("blue", 2)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 90, (size, size, 3))
            pixels[..., channel] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_colour_classes(tmp_path_factory.mktemp("colours"))


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("exports")
    return {"a32": write_export(folder / "a32.pt"), "b32": write_export(folder / "b32.pt", seed=1),
            "c48": write_export(folder / "c48.pt", image_size=48, seed=2)}


def test_the_knn_is_trainings_evaluator_on_the_same_folds(exports: dict[str, Path], colours: Path) -> None:
    [score] = score_backbones([exports["a32"]], colours, seed=3, test_share=0.25, device="cpu")
    model, _ = load_any_backbone(exports["a32"])
    evaluator = Evaluator(32, [], scan_labelled(colours, 3, 0.25))  # as `train --eval-dir --seed 3` builds it
    assert score.knn_top1 == evaluator.knn(model, torch.device("cpu"))
    assert (score.train_images, score.test_images, score.classes) == (27, 9, 3)  # 3 of each 12 held out
    assert (score.image_size, score.weights, score.linear_top1, score.skipped) == (32, "teacher", None, ())


def test_images_are_decoded_once_per_input_size(exports: dict[str, Path], colours: Path) -> None:
    recorder = Recorder()
    paths = [exports["a32"], exports["c48"], exports["b32"]]
    scores = score_backbones(paths, colours, device="cpu", reporter=recorder)
    assert [s.path for s in scores] == [str(p) for p in paths]  # the order given
    assert [s.image_size for s in scores] == [32, 48, 32]  # each backbone's own size
    tasks = list(dict.fromkeys(e.task for e in recorder.events if isinstance(e, ScoringProgress)))
    assert tasks == ["decoding at 32 px", "embedding by a32.pt", "embedding by b32.pt", "decoding at 48 px",
                     "embedding by c48.pt"]
    finished = [e for e in recorder.events if isinstance(e, ScoringProgress) and e.done == e.total]
    assert [e.total for e in finished] == [36] * 5

    forced = score_backbones(paths, colours, image_size=48, device="cpu", reporter=(again := Recorder()))
    assert [s.image_size for s in forced] == [48] * 3
    assert sum(1 for e in again.events if isinstance(e, ScoringProgress) and e.task.startswith("decoding")
               and e.done == 0) == 1
    assert forced[1] == scores[1]  # the 48 px backbone at its own size either way


def test_images_that_do_not_decode_are_left_out_and_listed(exports: dict[str, Path], tmp_path: Path) -> None:
    folder = write_colour_classes(tmp_path / "broken")
    (folder / "red" / "zz.png").write_bytes(b"not a png")
    [score] = score_backbones([exports["a32"]], folder, device="cpu")
    assert [Path(file).name for file, _ in score.skipped] == ["zz.png"]
    assert score.train_images + score.test_images == 36  # the 36 good ones
    assert score.as_dict()["skipped_images"] == 1


def test_scores_are_deterministic(exports: dict[str, Path], colours: Path) -> None:
    first = score_backbones([exports["a32"], exports["c48"]], colours, linear=True, device="cpu")
    assert score_backbones([exports["a32"], exports["c48"]], colours, linear=True, device="cpu") == first
    assert all(0.0 <= s.linear_top1 <= 100.0 for s in first)


def test_the_probe_reaches_the_optimum_of_its_objective() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=generator)
    features = torch.randn(4, 16, generator=generator)[labels] + 2.0 * torch.randn(200, 16, generator=generator)
    head = fit_linear_probe(features, labels, num_classes=4)
    weight, bias = head.weight.clone().requires_grad_(True), head.bias.clone().requires_grad_(True)
    x = torch.nn.functional.normalize(features.double(), dim=1) - head.mean
    loss = probe_objective(type(head)(head.mean, weight, bias), x, labels, PROBE_WEIGHT_DECAY)
    gradient = torch.cat([g.flatten() for g in torch.autograd.grad(loss, [weight, bias])])
    assert gradient.norm() < 1e-6  # the stationary point of a strictly convex objective: its unique minimum
    again = fit_linear_probe(features, labels, num_classes=4)
    assert torch.equal(again.weight, head.weight) and torch.equal(again.bias, head.bias)


def test_the_probe_separates_separable_features_that_a_knn_confuses() -> None:
    # Two classes apart along one axis, buried in large noise along 31 others: a linear head finds the axis, the
    # cosine k-NN is dominated by the noise.
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 2
    features = torch.randn(400, 32, generator=generator) * 3.0
    features[:, 0] = (labels * 2 - 1) * (1.0 + torch.rand(400, generator=generator))
    accuracy = linear_probe_accuracy(features[:300], labels[:300], features[300:], labels[300:], num_classes=2)
    assert accuracy == 100.0
    assert weighted_knn_accuracy(features[:300], labels[:300], features[300:], labels[300:]) < 80.0


def test_the_json_record_has_the_fields() -> None:
    score = Score("bb.pt", "teacher", 32, 75.0, None, 27, 9, 3, skipped=(("x.png", "broken"),))
    assert score.as_dict() == {"path": "bb.pt", "weights": "teacher", "image_size": 32, "knn_top1": 75.0,
                               "train_images": 27, "test_images": 9, "classes": 3, "skipped_images": 1}
    assert "linear_top1" in Score("bb.pt", None, 32, 75.0, 50.0, 27, 9, 3).as_dict()


def test_refusals(exports: dict[str, Path], colours: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--image-size 36 is not a multiple of the patch size 8 of .*a32.pt'; "
                                          r"pass a multiple of 8, e\.g\. --image-size 32"):
        score_backbones([exports["a32"]], colours, image_size=36)
    with pytest.raises(CheckpointError, match="does not exist"):
        score_backbones([exports["a32"], tmp_path / "missing.pt"], colours)
    one_class = tmp_path / "one"
    write_colour_classes(one_class)
    for name in ("green", "blue"):
        for file in (one_class / name).iterdir():
            file.unlink()
    with pytest.raises(DataError, match="at least two class"):
        score_backbones([exports["a32"]], one_class)
    folds = tmp_path / "folds"  # train/ and test/: a class folder may exist and hold nothing
    write_colour_classes(folds / "train")
    write_colour_classes(folds / "test")
    for name in ("green", "blue"):
        for file in (folds / "train" / name).iterdir():
            file.unlink()
    with pytest.raises(DataError, match="has train images of 1 class only"):
        score_backbones([exports["a32"]], folds)
    with pytest.raises(ConfigError, match="--test-share"):
        score_backbones([exports["a32"]], colours, test_share=1.0)
    with pytest.raises(ConfigError, match="at least one backbone"):
        score_backbones([], colours)
