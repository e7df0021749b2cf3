"""The learning benchmark: its independent k-NN probe agrees with dinopre's, and its supervised ceiling trains."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinopre.train.evaluation import weighted_knn_accuracy

_BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(_BENCHMARKS))  # learn.py imports its sibling probes.py
_spec = importlib.util.spec_from_file_location("learn", _BENCHMARKS / "learn.py")
learn = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(learn)

TINY = ["--image-size", "32", "--patch-size", "8", "--vit-embed-dim", "32", "--vit-depth", "1", "--vit-num-heads", "2",
        "--local-crop-size", "16"]


def test_the_benchmarks_knn_equals_dinopres_evaluation() -> None:
    """Two independent implementations of the DINO k-NN protocol give the same accuracy, so the benchmark's
    table and a run's `--eval-dir` curve can be read side by side."""
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(200, 16)).astype(np.float32), rng.normal(size=(60, 16)).astype(np.float32)
    train_labels, test_labels = rng.integers(0, 5, 200), rng.integers(0, 5, 60)
    test[:30] = train[:30] + 0.05 * rng.normal(size=(30, 16)).astype(np.float32)  # some neighbours to find
    test_labels[:30] = train_labels[:30]
    ours = learn.weighted_knn(train, train_labels, test, test_labels)
    theirs = weighted_knn_accuracy(torch.tensor(train), torch.tensor(train_labels), torch.tensor(test),
                                   torch.tensor(test_labels), k=20, temperature=0.07)
    assert abs(ours - theirs) < 1e-6
    assert ours > 40  # the planted neighbours are found


def _stripes(root: Path, split: str, count: int, rng: np.random.Generator) -> None:
    """Two classes told apart only by the stripes' direction: any colour pair, any phase."""
    for label, name in enumerate(("horizontal", "vertical")):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(count):
            period, phase = int(rng.integers(4, 9)), int(rng.integers(0, 8))
            on = ((np.arange(32) + phase) // (period // 2)) % 2 == 0
            mask = np.broadcast_to(on[:, None] if label == 0 else on[None, :], (32, 32))
            colours = rng.integers(0, 256, (2, 3))
            pixels = np.where(mask[..., None], colours[0], colours[1]).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")


def test_the_supervised_ceiling_trains_the_backbone(tmp_path: Path) -> None:
    """The ceiling row trains the backbone itself, not only its classifier (the untrained backbone is built frozen,
    as the teacher's copy), and its features then sort a labelled family by class better than the untrained ones."""
    rng = np.random.default_rng(0)
    _stripes(tmp_path, "train", 40, rng)
    _stripes(tmp_path, "test", 20, rng)
    untrained = learn.random_backbone(TINY)  # seeded as a run is: the same draw as the ceiling's start
    trained = learn.supervised_backbone(TINY, tmp_path, 32, epochs=20)
    before, after = untrained.state_dict(), trained.state_dict()
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-3
    assert learn.probe(trained, tmp_path, 32) >= learn.probe(untrained, tmp_path, 32) + 15  # measured 65 vs 40
