"""Score backbone files on a labelled folder, side by side: what `dinopre eval` runs.

Each backbone (an `slt` or `timm` export, a converted file, or a training checkpoint's teacher or student) is
measured exactly as training measures its teacher with `--eval-dir` (`dinopre.train.evaluation`): the same folds
(`train/` and `test/`, or a seeded share of each class held out), the same decoding and resizing, CLS features in
eval mode without autocast, and DINO's weighted k-NN (cosine, 20 neighbours, votes exp(s / 0.07)). So the figure
for a run's checkpoint equals the k-NN its last epoch logged, and a public backbone, its continuation and a scratch
run can be compared on the same labelled crops without training anything.

The images are decoded once per input size: backbones that share a size share the decoded folds. Optionally a
linear probe (`linear_probe_accuracy`) is scored on the same features.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dinopre.base.errors import ConfigError
from dinopre.base.events import Reporter, ScoringProgress
from dinopre.config.settings import UPPER_BOUNDS
from dinopre.files.export import load_any_backbone
from dinopre.model.vit import VisionTransformer
from dinopre.train.evaluation import Evaluator, LabelledFolder, check_decoded_classes, scan_labelled
from dinopre.train.runtime import resolve_device

# The linear probe's L2 penalty on its weights (not the bias), added to the mean cross-entropy. It keeps the optimum
# finite and unique on separable folds (few images, wide features), where plain cross-entropy has none. Measured on
# the learning benchmark's shapes and texture folds (750 train images, 5 classes): 1e-5, 1e-4, 1e-3 and 1e-2 gave
# top-1 within 1.4 points of each other, while LBFGS needed 500-800, 160-330, 30-70 and under 10 iterations;
# 1e-3 is accurate and takes well under a second.
PROBE_WEIGHT_DECAY = 1e-3
PROBE_MAX_ITERATIONS = 1000


@dataclass(frozen=True)
class Score:
    """How one backbone file did on the labelled folder.

    Attributes:
        path: the backbone file, as given.
        weights: `teacher` or `student` (what the file holds or the checkpoint side used); None when unrecorded.
        image_size: the input side the images were resized to, in pixels.
        knn_top1: top-1 accuracy of the weighted k-NN, in percent (as training logs it).
        linear_top1: top-1 accuracy of the linear probe on the test fold, in percent; None when not asked.
        train_images: images of the train fold that decoded.
        test_images: images of the test fold that decoded.
        classes: classes of the labelled folder.
        skipped: (file, reason) of the folder's images that could not be decoded at this size.
    """

    path: str
    weights: str | None
    image_size: int
    knn_top1: float
    linear_top1: float | None
    train_images: int
    test_images: int
    classes: int
    skipped: tuple[tuple[str, str], ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """The JSON object `dinopre eval --json` prints: `linear_top1` only when the probe ran."""
        out: dict[str, Any] = {"path": self.path, "weights": self.weights, "image_size": self.image_size,
                               "knn_top1": self.knn_top1}
        if self.linear_top1 is not None:
            out["linear_top1"] = self.linear_top1
        return {**out, "train_images": self.train_images, "test_images": self.test_images, "classes": self.classes,
                "skipped_images": len(self.skipped)}


@dataclass(frozen=True)
class _Backbone:
    path: Path
    model: VisionTransformer
    weights: str | None
    image_size: int  # the input size it is scored at


def score_backbones(paths: Sequence[str | Path], eval_dir: str | Path, *, weights: str = "teacher",
                    image_size: int | None = None, linear: bool = False, seed: int = 0, test_share: float = 0.25,
                    k: int = 20, temperature: float = 0.07, device: str = "auto", threads: int | None = None,
                    reporter: Reporter | None = None) -> list[Score]:
    """Score each backbone file with training's weighted k-NN (and optionally a linear probe) on `eval_dir`.

    Every file is loaded and checked before any image is decoded, so a bad path fails at once.

    Args:
        paths: backbone exports (`slt`, `timm`, converted files) or training checkpoints, in the order of the result.
        eval_dir: a folder with one sub-folder of images per class, or `train/` and `test/` holding those.
        weights: of a training checkpoint, `teacher` or `student`.
        image_size: the input side for every backbone; None: each backbone's own (from its metadata).
        linear: also train and score a linear probe.
        seed: seeds the held-out share of each class when the folder has no `train/` and `test/` (training uses
            its `--seed`, 0 by default: the same seed gives the same folds).
        test_share: the share of each class held out in that case.
        k: neighbours that vote.
        temperature: votes are exp(cosine similarity / temperature).
        device: `auto`, `cpu`, `cuda` or `cuda:INDEX`: where the features are computed.
        threads: decoding threads (default: the CPUs, at most 8).
        reporter: receives `ScoringProgress` events while images are decoded and embedded.

    Returns:
        One `Score` per path, in the order given.

    Raises:
        ConfigError: a setting out of range, or an input size that a backbone's patch size does not divide.
        CheckpointError: a file that is missing or not a backbone or training checkpoint.
        DataError: the folder cannot be used (missing, fewer than two classes with images, an empty fold).
    """
    _check_settings(paths, image_size, seed, test_share, k, temperature)
    target = resolve_device(device)
    backbones = [_load(Path(path), weights, image_size) for path in paths]
    labelled = scan_labelled(eval_dir, seed, test_share)
    threads = threads or min(8, os.cpu_count() or 1)
    emit = reporter.emit if reporter is not None else (lambda event: None)
    scores: dict[int, Score] = {}
    for size, indices in _by_size(backbones).items():
        evaluator = _decode(labelled, size, k, temperature, threads, emit)
        check_decoded_classes(evaluator, eval_dir)
        for index in indices:
            scores[index] = _score(backbones[index], evaluator, labelled, target, linear, emit)
        del evaluator  # one size's decoded images at a time
    return [scores[index] for index in range(len(backbones))]


def _check_settings(paths: Sequence[str | Path], image_size: int | None, seed: int, test_share: float, k: int,
                    temperature: float) -> None:
    """One sentence for the first setting out of range, before any file is read (bounds as for `train`)."""
    if not paths:
        raise ConfigError("Give at least one backbone file to score.")
    if image_size is not None and image_size < 1:
        raise ConfigError(f"--image-size must be a positive number of pixels, got {image_size}.")
    if seed < 0:
        raise ConfigError(f"--seed must be 0 or more, got {seed}.")
    if not 0.0 < test_share < 1.0:
        raise ConfigError(f"--test-share is the share of each class held out for testing, in (0, 1); got "
                          f"{test_share}.")
    if k < 1:
        raise ConfigError(f"--knn-k must be a positive number of neighbours, got {k}.")
    if not temperature > 0:
        raise ConfigError(f"--knn-temperature must be positive, got {temperature}.")
    for flag, value, bound in (("--image-size", image_size, UPPER_BOUNDS["image_size"]),
                               ("--seed", seed, UPPER_BOUNDS["seed"]), ("--knn-k", k, UPPER_BOUNDS["knn_k"]),
                               ("--knn-temperature", temperature, UPPER_BOUNDS["knn_temperature"])):
        if value is not None and value > bound:
            raise ConfigError(f"{flag} {value} is beyond what dinopre accepts ({bound:g}); check the value.")


def _load(path: Path, weights: str, image_size: int | None) -> _Backbone:
    """A backbone file (export or training checkpoint), and the input size it is scored at."""
    model, metadata = load_any_backbone(path, weights=weights)
    shape = metadata["backbone"]
    size, patch = image_size or shape["image_size"], shape["patch_size"]
    if size % patch:
        nearest = max(patch, round(size / patch) * patch)
        raise ConfigError(f"--image-size {size} is not a multiple of the patch size {patch} of '{path}'; pass a "
                          f"multiple of {patch}, e.g. --image-size {nearest}.")
    return _Backbone(path, model, metadata.get("weights"), size)


def _by_size(backbones: list[_Backbone]) -> dict[int, list[int]]:
    """Positions of the backbones per input size, sizes in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for index, backbone in enumerate(backbones):
        groups.setdefault(backbone.image_size, []).append(index)
    return groups


class _Counter:
    """Counts images done in one task and emits a `ScoringProgress` for each step."""

    def __init__(self, emit: Callable[[object], None], task: str, total: int) -> None:
        self.emit, self.task, self.total, self.done = emit, task, total, 0
        emit(ScoringProgress(task, 0, total))

    def __call__(self, count: int) -> None:
        self.done += count
        self.emit(ScoringProgress(self.task, self.done, self.total))


def _decode(labelled: LabelledFolder, size: int, k: int, temperature: float, threads: int,
            emit: Callable[[object], None]) -> Evaluator:
    """Training's evaluator of the folder at this size (no monitored training images: only the k-NN is wanted)."""
    total = len(labelled.train_files) + len(labelled.test_files)
    counter = _Counter(emit, f"decoding at {size} px", total)
    return Evaluator(size, [], labelled, k=k, temperature=temperature, threads=threads, advance=counter)


def _score(backbone: _Backbone, evaluator: Evaluator, labelled: LabelledFolder, device: torch.device,
           linear: bool, emit: Callable[[object], None]) -> Score:
    assert evaluator.train is not None and evaluator.test is not None
    total = len(evaluator.train.labels) + len(evaluator.test.labels)
    counter = _Counter(emit, f"embedding by {backbone.path.name}", total)
    model = backbone.model.to(device)
    train, test = evaluator.fold_features(model, device, advance=counter)
    knn = evaluator.knn_of(train, test)
    probe = None
    if linear:
        probe = linear_probe_accuracy(train, evaluator.train.labels, test, evaluator.test.labels,
                                      num_classes=len(labelled.classes))
    backbone.model.to("cpu")
    return Score(str(backbone.path), backbone.weights, backbone.image_size, knn, probe,
                 train_images=len(evaluator.train.labels), test_images=len(evaluator.test.labels),
                 classes=len(labelled.classes), skipped=tuple(evaluator.skipped))


@dataclass(frozen=True)
class LinearHead:
    """A linear probe: logits = (L2-normalised features - mean) @ weight + bias, in float64 on the CPU."""

    mean: torch.Tensor  # (D,) the train fold's mean normalised feature
    weight: torch.Tensor  # (D, C)
    bias: torch.Tensor  # (C,)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C) class scores of (N, D) raw features."""
        return (_normalised(features) - self.mean) @ self.weight + self.bias


def _normalised(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.detach().to("cpu", torch.float64), dim=1)


def probe_objective(head: LinearHead, x: torch.Tensor, labels: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """Mean cross-entropy of the centred features `x` plus weight_decay / 2 x the squared norm of the weights."""
    return F.cross_entropy(x @ head.weight + head.bias, labels) + 0.5 * weight_decay * head.weight.square().sum()


def fit_linear_probe(train: torch.Tensor, train_labels: torch.Tensor, *, num_classes: int,
                     weight_decay: float = PROBE_WEIGHT_DECAY,
                     max_iterations: int = PROBE_MAX_ITERATIONS) -> LinearHead:
    """A multinomial logistic regression on L2-normalised features, trained full-batch (`probe_objective`).

    Args:
        train: (N, D) frozen features of the train fold.
        train_labels: (N,) their classes.
        num_classes: classes of the folder (some may have no train image).
        weight_decay: the L2 penalty on the weights (not on the bias).
        max_iterations: LBFGS iterations at most.
    """
    # LBFGS rather than Adam: the objective is smooth and strictly convex, so a quasi-Newton method with a line
    # search reaches its unique optimum in tens to hundreds of full-batch iterations with no learning rate to tune,
    # where Adam would need a schedule and thousands of steps to get as close. Starting from zero and running in
    # float64 on the CPU, it draws no random numbers at all (nothing to seed) and gives the same head on any device.
    x = _normalised(train)
    # Centred on the train mean: the bias absorbs the shift exactly (W(x - m) + b = Wx + (b - Wm), and the bias is
    # not penalised), so the optimum is the same function, but the component all CLS features share no longer
    # dominates the curvature, and LBFGS needs fewer iterations.
    mean = x.mean(0)
    x = x - mean
    labels = train_labels.to("cpu", torch.long)
    head = LinearHead(mean, torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True),
                      torch.zeros(num_classes, dtype=torch.float64, requires_grad=True))
    optimizer = torch.optim.LBFGS([head.weight, head.bias], lr=1.0, max_iter=max_iterations, history_size=20,
                                  tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = probe_objective(head, x, labels, weight_decay)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearHead(mean, head.weight.detach(), head.bias.detach())


def linear_probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                          test_labels: torch.Tensor, *, num_classes: int, weight_decay: float = PROBE_WEIGHT_DECAY,
                          max_iterations: int = PROBE_MAX_ITERATIONS) -> float:
    """Top-1 accuracy (%) on the test fold of `fit_linear_probe` trained on the train fold.

    Args:
        train: (N, D) frozen features of the train fold.
        train_labels: (N,) their classes.
        test: (M, D) features of the test fold.
        test_labels: (M,) their classes.
        num_classes: classes of the folder.
        weight_decay: the L2 penalty on the weights.
        max_iterations: LBFGS iterations at most.

    Returns:
        The share of test images whose highest logit is their class, in percent.
    """
    head = fit_linear_probe(train, train_labels, num_classes=num_classes, weight_decay=weight_decay,
                            max_iterations=max_iterations)
    with torch.no_grad():
        correct = (head.logits(test).argmax(1) == test_labels.to("cpu")).sum()
    return 100.0 * float(correct) / test.shape[0]
