"""In-training evaluation: the k-NN maths against a plain loop, the label-free signals at their known extremes,
the collapse verdict, and reading a labelled folder (given folds or a seeded split)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinopre.base.errors import DataError
from dinopre.train.evaluation import (
    Evaluator,
    check_decoded_classes,
    collapse_message,
    collapse_verdict,
    feature_spread,
    monitor_indices,
    prototype_signals,
    rankme,
    scan_labelled,
    weighted_knn_accuracy,
)


def _loop_knn(train, train_labels, test, test_labels, k, temperature) -> float:
    """DINO eval_knn.py written out one test image at a time."""
    correct = 0
    for x, label in zip(test, test_labels):
        sims = [float(np.dot(x, t) / (np.linalg.norm(x) * np.linalg.norm(t))) for t in train]
        order = sorted(range(len(train)), key=lambda i: -sims[i])[:k]
        votes: dict[int, float] = {}
        for i in order:
            votes[int(train_labels[i])] = votes.get(int(train_labels[i]), 0.0) + math.exp(sims[i] / temperature)
        correct += max(votes, key=votes.get) == label
    return 100.0 * correct / len(test)


@pytest.mark.parametrize(("k", "chunk"), [(20, 1024), (5, 3), (500, 7)])  # k above the train size: all vote
def test_weighted_knn_equals_the_reference_loop(k: int, chunk: int) -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16))
    train_labels, test_labels = rng.integers(0, 4, 60), rng.integers(0, 4, 25)
    train = centers[train_labels] + rng.normal(scale=1.5, size=(60, 16))
    test = centers[test_labels] + rng.normal(scale=1.5, size=(25, 16))
    expected = _loop_knn(train, train_labels, test, test_labels, k, 0.07)
    got = weighted_knn_accuracy(torch.tensor(train), torch.tensor(train_labels), torch.tensor(test),
                                torch.tensor(test_labels), k=k, temperature=0.07, chunk=chunk)
    assert got == pytest.approx(expected)
    assert 25 < got < 100  # a real classification problem, neither hopeless nor trivial


def test_rankme_counts_the_effective_dimensions() -> None:
    q, _ = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))
    assert rankme(q[:, :10] * 3.0) == pytest.approx(10.0, rel=1e-4)  # 10 equal singular values
    assert rankme(torch.randn(256, 1) @ torch.randn(1, 32)) == pytest.approx(1.0, abs=1e-3)  # rank one


def test_feature_spread_is_one_for_spread_features_and_zero_for_a_point() -> None:
    assert feature_spread(torch.randn(4096, 64)) == pytest.approx(1.0, abs=0.02)
    assert feature_spread(torch.ones(100, 64) + 1e-9 * torch.randn(100, 64)) == pytest.approx(0.0, abs=1e-6)


def _targets(logits: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax((logits - center) / temperature, dim=-1)


def test_prototype_signals_and_the_collapse_verdict() -> None:
    k = 256
    flat = prototype_signals(_targets(torch.zeros(100, k), torch.zeros(1, k), 0.04))
    assert flat["teacher_entropy"] == pytest.approx(math.log(k)) and flat["entropy_max"] == pytest.approx(math.log(k))
    assert collapse_verdict(flat) == "uniform"
    assert "--teacher-temp" in collapse_message("uniform", flat)

    one_hot = torch.zeros(100, k)
    one_hot[:95, 7] = 1.0  # 95 of 100 images pick prototype 7
    one_hot[95:, :5] = torch.eye(5)
    signals = prototype_signals(_targets(one_hot, torch.zeros(1, k), 0.04))
    assert signals["top_prototype_share"] == pytest.approx(0.95) and signals["prototypes_used"] == 6
    assert collapse_verdict(signals) == "one-hot"
    assert "95%" in collapse_message("one-hot", signals)

    healthy = prototype_signals(_targets(torch.randn(512, k) * 0.2, torch.zeros(1, k), 0.04))
    assert healthy["teacher_entropy"] < 0.8 * math.log(k) and collapse_verdict(healthy) is None
    # The centering matters: the same sharp logits with their common part as the center are not one-hot.
    shared = torch.randn(1, k) * 3
    assert collapse_verdict(prototype_signals(_targets(torch.randn(512, k) * 0.2 + shared, shared, 0.04))) is None


def test_monitor_subset_is_fixed_by_the_seed() -> None:
    assert monitor_indices(10_000, 64, seed=3) == monitor_indices(10_000, 64, seed=3)
    assert monitor_indices(10_000, 64, seed=3) != monitor_indices(10_000, 64, seed=4)
    assert monitor_indices(50, 1024, seed=0) == list(range(50))  # a small dataset: every image


def _write(folder: Path, count: int, colour: tuple[int, int, int], size: int = 16) -> None:
    """Images of about one colour, with a faint ramp: one of a single flat colour is a blank crop, left out."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        ramp = np.arange(size + i % 3)[None, :, None] % 21 - 10
        pixels = np.clip(np.array(colour)[None, None, :] + ramp + np.zeros((size, 1, 1)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, "RGB").save(folder / f"{i:03d}.png")


def test_a_labelled_folder_with_train_and_test_folds(tmp_path: Path) -> None:
    for fold, count in (("train", 6), ("test", 2)):
        _write(tmp_path / fold / "cat", count, (200, 0, 0))
        _write(tmp_path / fold / "dog" / "nested", count, (0, 0, 200))  # searched recursively
    labelled = scan_labelled(tmp_path, seed=0, test_share=0.25)
    assert labelled.split == "folders" and labelled.classes == ("cat", "dog")
    assert len(labelled.train_files) == 12 and labelled.test_labels == (0, 0, 1, 1)


def test_a_labelled_folder_is_split_per_class_by_the_seed(tmp_path: Path) -> None:
    _write(tmp_path / "a", 12, (200, 0, 0))
    _write(tmp_path / "b", 8, (0, 200, 0))
    first, again = scan_labelled(tmp_path, 1, 0.25), scan_labelled(tmp_path, 1, 0.25)
    assert first == again and first.split == "seeded"
    assert first.test_labels.count(0) == 3 and first.test_labels.count(1) == 2  # 25 % of each class
    assert not set(first.train_files) & set(first.test_files)
    assert len(first.train_files) + len(first.test_files) == 20
    assert scan_labelled(tmp_path, 2, 0.25).test_files != first.test_files


@pytest.mark.parametrize(("layout", "message"), [
    ("missing", "is not a folder"),
    ("one class", "at least two class sub-folders"),
    ("test-only class", "test/ has classes that train/ lacks"),
])
def test_unusable_labelled_folders_are_refused(tmp_path: Path, layout: str, message: str) -> None:
    root = tmp_path / "probe"
    if layout == "one class":
        _write(root / "only", 4, (1, 2, 3))
    elif layout == "test-only class":
        for name in ("a", "b"):
            _write(root / "train" / name, 2, (9, 9, 9))
            _write(root / "test" / name, 2, (9, 9, 9))
        _write(root / "test" / "c", 2, (9, 9, 9))
    with pytest.raises(DataError, match=message):
        scan_labelled(root, 0, 0.25)


class _MeanColour(torch.nn.Module):
    """A 'backbone' whose CLS feature is the mean colour: red and blue images are told apart perfectly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_the_evaluator_scores_a_backbone_and_skips_broken_probe_images(tmp_path: Path) -> None:
    _write(tmp_path / "red", 10, (220, 20, 20))
    _write(tmp_path / "blue", 10, (20, 20, 220))
    (tmp_path / "red" / "broken.png").write_bytes(b"not a png")
    labelled = scan_labelled(tmp_path, 0, 0.3)
    monitor = [lambda i=i: Image.new("RGB", (20, 20), (i * 10, 0, 0)) for i in range(8)]
    evaluator = Evaluator(16, monitor, labelled, k=3)
    assert len(evaluator.skipped) == 1 and "broken.png" in evaluator.skipped[0][0]
    assert evaluator.monitor.images.shape == (8, 3, 16, 16)  # resized to the input size, kept as uint8
    assert evaluator.knn(_MeanColour(), torch.device("cpu")) == 100.0
    head = torch.nn.Linear(3, 16)
    signals = evaluator.signals(_MeanColour(), head, lambda logits: torch.softmax(logits / 0.04, -1),
                                torch.device("cpu"))
    assert set(signals) == {"rankme", "feature_spread", "teacher_entropy", "entropy_max", "prototypes_used",
                            "top_prototype_share"}
    assert 1.0 <= signals["rankme"] <= 3.0  # three colour channels, one of which varies


def test_a_class_whose_images_all_fail_to_decode_does_not_count(tmp_path: Path) -> None:
    """Before, it counted towards "two classes or more": the k-NN then had one class and reported 100 % every
    epoch, which `--best-by knn` picked by."""
    _write(tmp_path / "red", 10, (220, 20, 20))
    (tmp_path / "broken").mkdir()
    for i in range(4):
        (tmp_path / "broken" / f"{i}.png").write_bytes(b"not a png")
    labelled = scan_labelled(tmp_path, 0, 0.3)
    assert labelled.classes == ("broken", "red")  # found by name: decoding comes later
    with pytest.raises(DataError, match=r"^--eval-dir 'probe' has train images of 1 class only; the k-NN needs images "
                                        r"of at least two classes \(none of 'broken' decodes\)\.$"):
        check_decoded_classes(Evaluator(16, [], labelled), "probe")
    _write(tmp_path / "blue", 10, (20, 20, 220))
    evaluator = Evaluator(16, [], scan_labelled(tmp_path, 0, 0.3), k=3)  # two good classes: the broken one is left out
    check_decoded_classes(evaluator, "probe")
    assert set(evaluator.test.labels.tolist()) == set(evaluator.train.labels.tolist()) == {0, 2}  # blue, red
    assert evaluator.knn(_MeanColour(), torch.device("cpu")) == 100.0


@pytest.mark.parametrize("fold", ["train", "test"])
def test_half_of_a_split_is_named_as_such_not_counted_as_a_class(tmp_path: Path, fold: str) -> None:
    _write(tmp_path / fold / "a", 3, (9, 9, 9))
    _write(tmp_path / fold / "b", 3, (9, 9, 9))
    other = "test" if fold == "train" else "train"
    with pytest.raises(DataError, match=rf"has a {fold}/ folder but no {other}/; give both, each with one sub-folder "
                                        "per class, or put the class sub-folders directly in it."):
        scan_labelled(tmp_path, 0, 0.25)
