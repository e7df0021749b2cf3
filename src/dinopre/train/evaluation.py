"""Is it learning? A weighted k-NN probe on a labelled folder and label-free signals of the teacher's features.

The loss of a working DINO run and of a useless one look alike (dinov2#143: the maintainers tuned by k-NN accuracy
"because the loss is not informative"), so the engine measures the features themselves:

- **k-NN** (`--eval-dir`): the teacher backbone's CLS features of a labelled folder, split into train and test
  folds, classified by a weighted k-NN as in DINO's `eval_knn.py`: cosine similarity, the k nearest train images
  vote with weight exp(similarity / T), k = 20 and T = 0.07 by default.
- **label-free signals**, on a fixed seeded subset of the training images, every epoch:
  - RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values of the CLS features, the
    effective rank; it falls towards 1 as the features collapse;
  - the spread: the mean per-dimension standard deviation of the L2-normalised CLS features times sqrt(D), about
    1 for features spread evenly over the sphere and 0 when every image maps to the same point (SimSiam's check);
  - the teacher's entropy (centered and sharpened as in the loss), against its maximum ln K;
  - prototype usage: how many prototypes win at least one image, and the share of the most popular one.
- **collapse**, decided from those signals (`collapse_verdict`): uniform when the teacher's distribution is
  flat, one-hot when one prototype takes nearly every image.

Images are decoded once, resized to the backbone's input size and kept as uint8; features are computed in eval
mode, without autocast, so the k-NN agrees with an independent evaluation of the exported backbone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dinopre.base.errors import DataError
from dinopre.config.settings import PretrainConfig
from dinopre.data.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from dinopre.data.images import BadImageError, load_rgb
from dinopre.data.scan import usable_files

_MONITOR_STREAM = 3  # separates the monitor subset's generator from the data order and the samples'
_SPLIT_STREAM = 4
FEATURE_BATCH = 256
# Collapse thresholds. Uniform: the teacher's entropy within 2 % of ln K, i.e. its distribution is all but flat
# (a healthy teacher at temperature 0.04-0.07 stays well below; measured in tests/train/test_evaluation.py). One-hot:
# a single prototype wins 90 % or more of the monitored images.
UNIFORM_ENTROPY_SHARE = 0.98
ONE_HOT_SHARE = 0.9


# ============ the maths ============


def weighted_knn_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor,
                          test_labels: torch.Tensor, *, k: int = 20, temperature: float = 0.07,
                          chunk: int = 1024) -> float:
    """Top-1 accuracy (%) of DINO's weighted k-NN classifier.

    Args:
        train: (N, D) features of the labelled train fold.
        train_labels: (N,) class numbers.
        test: (M, D) features to classify.
        test_labels: (M,) their true classes.
        k: neighbours that vote (fewer when the train fold is smaller).
        temperature: votes are exp(cosine similarity / temperature).
        chunk: test rows per similarity block (bounds the memory to chunk x N).

    Returns:
        The share of test images whose vote is their class, in percent.
    """
    train = F.normalize(train.float(), dim=1)
    test = F.normalize(test.float(), dim=1)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, test.shape[0], chunk):
        similarity = test[start:start + chunk] @ train.T  # (m, N)
        top, nearest = similarity.topk(k, dim=1)  # (m, k)
        votes = torch.zeros(similarity.shape[0], num_classes, dtype=torch.float64, device=train.device)
        votes.scatter_add_(1, train_labels[nearest], (top.double() / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[start:start + chunk]).sum())
    return 100.0 * correct / test.shape[0]


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of an (N, D) feature matrix: exp(entropy of its normalised singular values) (RankMe)."""
    singular = torch.linalg.svdvals(features.double())
    p = singular / singular.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def feature_spread(features: torch.Tensor) -> float:
    """Mean per-dimension std of the L2-normalised features x sqrt(D): ~1 spread out, 0 collapsed to a point."""
    normed = F.normalize(features.double(), dim=1)
    return float(normed.std(dim=0).mean() * math.sqrt(features.shape[1]))


def prototype_signals(p: torch.Tensor) -> dict[str, float]:
    """Entropy of the teacher's (N, K) target distributions (centered and sharpened, as the loss sees them) and how
    the images spread over the prototypes."""
    entropy = float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())
    counts = torch.bincount(p.argmax(-1), minlength=p.shape[-1])
    return {"teacher_entropy": entropy, "entropy_max": math.log(p.shape[-1]),
            "prototypes_used": float((counts > 0).sum()), "top_prototype_share": float(counts.max()) / p.shape[0]}


def collapse_verdict(signals: dict[str, float]) -> str | None:
    """`uniform`, `one-hot` or None from the label-free signals of one evaluation."""
    if "teacher_entropy" not in signals:
        return None
    if signals["teacher_entropy"] >= UNIFORM_ENTROPY_SHARE * signals["entropy_max"]:
        return "uniform"
    if signals["top_prototype_share"] >= ONE_HOT_SHARE:
        return "one-hot"
    return None


COLLAPSE_ADVICE = {
    "uniform": "the teacher's output is flat (entropy {entropy:.2f} of ln K = {max:.2f}), so the features carry no "
               "information; lower --teacher-temp (e.g. 0.02) or --out-dim, or raise --learning-rate "
               "(README: Troubleshooting).",
    "one-hot": "one prototype takes {share:.0%} of the images, so every image gets the same answer; raise "
               "--teacher-momentum-base, lower --learning-rate, keep --norm-last-layer on (README: Troubleshooting).",
}


def collapse_message(verdict: str, signals: dict[str, float]) -> str:
    """One sentence saying which collapse was seen and what to change."""
    detail = COLLAPSE_ADVICE[verdict].format(entropy=signals.get("teacher_entropy", 0.0),
                                             max=signals.get("entropy_max", 0.0),
                                             share=signals.get("top_prototype_share", 0.0))
    return f"The run looks collapsed ({verdict}): {detail}"


# ============ images ============


def to_input(image: Image.Image, size: int) -> torch.Tensor:
    """An RGB image resized (bicubic) to size x size, as a (3, size, size) uint8 tensor."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_all(loaders: list[Callable[[], Image.Image]], size: int, threads: int = 4,
               advance: Callable[[int], None] | None = None) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """Decode images (in threads: Pillow releases the GIL) into one (N, 3, size, size) uint8 tensor.

    Args:
        loaders: one function per image that opens it.
        size: the side the images are resized to.
        threads: decoding threads.
        advance: called with 1 after each image (decoded or not), in this thread, for a progress display.

    Returns:
        The images that decoded, their positions in `loaders`, and (position, reason) of those that did not.
    """

    def one(load: Callable[[], Image.Image]) -> torch.Tensor | str:
        try:
            return to_input(load(), size)
        except BadImageError as exc:
            return str(exc)

    results: list[torch.Tensor | str] = []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for result in pool.map(one, loaders):  # in order, so the images keep their positions
            results.append(result)
            if advance is not None:
                advance(1)
    kept = [i for i, r in enumerate(results) if isinstance(r, torch.Tensor)]
    bad = [(i, r) for i, r in enumerate(results) if isinstance(r, str)]
    images = torch.stack([results[i] for i in kept]) if kept else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return images, kept, bad


@torch.no_grad()
def cls_features(backbone: torch.nn.Module, images: torch.Tensor, device: torch.device,
                 batch_size: int = FEATURE_BATCH, advance: Callable[[int], None] | None = None) -> torch.Tensor:
    """(N, D) fp32 CLS features of uint8 images, in eval mode and without autocast, on `device`.

    `advance`, if given, is called with the number of images of each batch once it is embedded.
    """
    was_training = backbone.training
    backbone.eval()
    out = []
    with torch.autocast(device.type, enabled=False):
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size].to(device, non_blocking=True).float().div_(255.0)
            out.append(backbone(normalize(batch, IMAGENET_MEAN, IMAGENET_STD)).float())
            if advance is not None:
                advance(batch.shape[0])
    backbone.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0, device=device)


# ============ the labelled folder ============


@dataclass(frozen=True)
class LabelledFolder:
    """A labelled probe: files and class numbers of its train and test folds."""

    classes: tuple[str, ...]
    train_files: tuple[Path, ...]
    train_labels: tuple[int, ...]
    test_files: tuple[Path, ...]
    test_labels: tuple[int, ...]
    split: str  # "folders" (train/ and test/ given) or "seeded" (split here)


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_images(folder: Path) -> list[Path]:
    """A class's images, blank crops left out (a class with only blank crops counts as empty)."""
    try:
        return usable_files([str(folder)])
    except DataError:
        return []


def scan_labelled(eval_dir: str | Path, seed: int, test_share: float) -> LabelledFolder:
    """Read a labelled folder: `train/CLASS/...` and `test/CLASS/...`, or `CLASS/...` split here.

    Without `train/` and `test/`, each class's images are split at random (seeded by `seed`, the same split every
    epoch and on resume): `test_share` of them, at least one, go to the test fold.

    Raises:
        DataError: the folder is missing, has fewer than two classes, or a fold is empty.
    """
    root = Path(eval_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--eval-dir '{eval_dir}' is not a folder; give a folder with one sub-folder of images per "
                        "class (or train/ and test/ sub-folders holding those).")
    folds = [fold for fold in ("train", "test") if (root / fold).is_dir()]
    if len(folds) == 1:  # not a class named `train`: half of a split
        other = "test" if folds == ["train"] else "train"
        raise DataError(f"--eval-dir '{eval_dir}' has a {folds[0]}/ folder but no {other}/; give both, each with one "
                        "sub-folder per class, or put the class sub-folders directly in it.")
    if folds:
        classes = tuple(p.name for p in _class_folders(root / "train"))
        folds = []
        for fold in ("train", "test"):
            files, labels = [], []
            for label, name in enumerate(classes):
                found = _class_images(root / fold / name) if (root / fold / name).is_dir() else []
                files += found
                labels += [label] * len(found)
            folds.append((tuple(files), tuple(labels)))
        extra = sorted({p.name for p in _class_folders(root / "test")} - set(classes))
        if extra:
            raise DataError(f"--eval-dir '{eval_dir}': test/ has classes that train/ lacks ({', '.join(extra)}); "
                            "give every class a train/ folder.")
        labelled = LabelledFolder(classes, *folds[0], *folds[1], split="folders")
    else:
        labelled = _split_classes(root, seed, test_share)
    if len(labelled.classes) < 2:
        raise DataError(f"--eval-dir '{eval_dir}' needs at least two class sub-folders of images, found "
                        f"{len(labelled.classes)}.")
    if not labelled.train_files or not labelled.test_files:
        fold = "train" if not labelled.train_files else "test"
        raise DataError(f"--eval-dir '{eval_dir}' has no images in its {fold}"
                        " fold; put images in one sub-folder per class.")
    return labelled


def _split_classes(root: Path, seed: int, test_share: float) -> LabelledFolder:
    classes, train, train_labels, test, test_labels = [], [], [], [], []
    for folder in _class_folders(root):
        files = _class_images(folder)
        if not files:
            continue
        label = len(classes)
        classes.append(folder.name)
        rng = np.random.default_rng([seed, label, _SPLIT_STREAM])
        order = rng.permutation(len(files))
        num_test = max(1, round(test_share * len(files))) if len(files) > 1 else 0
        test += [files[i] for i in sorted(order[:num_test])]
        train += [files[i] for i in sorted(order[num_test:])]
        test_labels += [label] * num_test
        train_labels += [label] * (len(files) - num_test)
    return LabelledFolder(tuple(classes), tuple(train), tuple(train_labels), tuple(test), tuple(test_labels),
                          split="seeded")


# ============ the evaluator of a run ============


@dataclass
class _Decoded:
    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64; empty for the monitor set


class Evaluator:
    """Decodes the probe images once and measures a teacher on them.

    Args:
        image_size: the backbone's input size.
        monitor: loaders of the monitored training images (a fixed seeded subset), or empty to skip the signals.
        labelled: the `--eval-dir` probe, or None.
        k: k-NN neighbours.
        temperature: k-NN vote temperature.
        threads: decoding threads.
        advance: called with 1 after each probe image is decoded (`decode_all`), for a progress display.
    """

    def __init__(self, image_size: int, monitor: list[Callable[[], Image.Image]], labelled: LabelledFolder | None,
                 *, k: int = 20, temperature: float = 0.07, threads: int = 4,
                 advance: Callable[[int], None] | None = None) -> None:
        self.k, self.temperature = k, temperature
        self.skipped: list[tuple[str, str]] = []  # (file, reason) of probe images that could not be decoded
        self.monitor = _Decoded(decode_all(monitor, image_size, threads)[0], torch.zeros(0, dtype=torch.long))
        self.train = self.test = None
        self.classes: tuple[str, ...] = ()
        if labelled is not None:
            self.classes = labelled.classes
            self.train = self._decode_fold(labelled.train_files, labelled.train_labels, image_size, threads, advance)
            self.test = self._decode_fold(labelled.test_files, labelled.test_labels, image_size, threads, advance)
            if not len(self.train.labels) or not len(self.test.labels):
                raise DataError("No image of the --eval-dir train or test fold could be decoded.")
            # A test image of a class without train images can never be classified right: it measures nothing.
            known = torch.isin(self.test.labels, self.train.labels)
            self.test = _Decoded(self.test.images[known], self.test.labels[known])

    def _decode_fold(self, files: tuple[Path, ...], labels: tuple[int, ...], size: int, threads: int,
                     advance: Callable[[int], None] | None) -> _Decoded:
        images, kept, bad = decode_all([lambda f=f: load_rgb(f) for f in files], size, threads, advance)
        self.skipped += [(str(files[i]), reason) for i, reason in bad]
        return _Decoded(images, torch.tensor([labels[i] for i in kept], dtype=torch.long))

    @property
    def has_knn(self) -> bool:
        return self.train is not None

    def knn(self, backbone: torch.nn.Module, device: torch.device) -> float:
        """k-NN top-1 accuracy (%) of the backbone's CLS features on the labelled probe."""
        return self.knn_of(*self.fold_features(backbone, device))

    def fold_features(self, backbone: torch.nn.Module, device: torch.device,
                      advance: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The backbone's CLS features of the train and the test fold (`cls_features`), on `device`."""
        assert self.train is not None and self.test is not None
        return (cls_features(backbone, self.train.images, device, advance=advance),
                cls_features(backbone, self.test.images, device, advance=advance))

    def knn_of(self, train: torch.Tensor, test: torch.Tensor) -> float:
        """k-NN top-1 accuracy (%) of given train and test fold features (`fold_features`)."""
        assert self.train is not None and self.test is not None
        return weighted_knn_accuracy(train, self.train.labels.to(train.device), test,
                                     self.test.labels.to(test.device), k=self.k, temperature=self.temperature)

    def signals(self, backbone: torch.nn.Module, head: torch.nn.Module,
                targets: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> dict[str, float]:
        """The label-free signals of the teacher on the monitored training images (empty without them).

        Args:
            backbone: the teacher backbone.
            head: the teacher's CLS head.
            targets: turns (N, K) head logits into the teacher's target distributions, as the loss does.
            device: where to run.
        """
        if self.monitor.images.shape[0] < 2:
            return {}
        features = cls_features(backbone, self.monitor.images, device)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            p = targets(head(features))
        return {"rankme": rankme(features), "feature_spread": feature_spread(features), **prototype_signals(p)}


def check_decoded_classes(evaluator: Evaluator, eval_dir: str | Path) -> None:
    """Refuse a probe with fewer than two classes whose train images decode: with one, every test image gets that
    class and the k-NN reports 100 % whatever the features (and `--best-by knn` would pick by it). Class folders
    are counted when found, before decoding: a class of broken files, or a train/CLASS folder that holds nothing,
    counts only here.

    Raises:
        DataError: one sentence, naming the classes without a train image that decodes.
    """
    assert evaluator.train is not None
    kept = set(evaluator.train.labels.tolist())
    if len(kept) >= 2:
        return
    lost = [repr(name) for label, name in enumerate(evaluator.classes) if label not in kept]
    raise DataError(f"--eval-dir '{eval_dir}' has train images of {len(kept)} class only; the k-NN needs images of at "
                    f"least two classes (none of {', '.join(lost[:5])}{' ...' if len(lost) > 5 else ''} decodes).")


def monitor_indices(num_images: int, count: int, seed: int) -> list[int]:
    """The fixed seeded subset of training images whose signals are logged every epoch (sorted)."""
    count = min(count, num_images)
    rng = np.random.default_rng([seed, _MONITOR_STREAM])
    return sorted(int(i) for i in rng.choice(num_images, count, replace=False))


def is_eval_epoch(config: PretrainConfig, completed: int) -> bool:
    """Whether the epoch that brings the run to `completed` epochs is one of the --eval-every epochs, which get the
    k-NN probe and the trackers' attention grid (the last epoch always is)."""
    return completed % config.eval.eval_every == 0 or completed == config.optim.epochs
