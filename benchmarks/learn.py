"""Learning benchmark: does pretraining beat random weights on a k-NN probe, at the original tool's budget?

    python benchmarks/learn.py                                  # every family, random init / reference / auto
    python benchmarks/learn.py --families texture hands --recipes random auto --budget 2
    python benchmarks/learn.py --try lowtemp="--teacher-temp 0.02"   # any extra `dinopre train` flags as a recipe

For each probe family of `benchmarks/probes.py` it writes 2,000 unlabelled pretraining images and 1,000 + 500
labelled k-NN images (64 px, five classes), then for each recipe:
- pretrains exactly as a user of the original tool would (the budget of the recipe issue: 10 epochs of batch 64,
  310 steps, a ViT of width 128, depth 4, 4 heads, patch 8 at 64 px, 4 local crops of 32 px, 2 workers), in a
  subprocess, and exports the teacher backbone;
- loads the export through `dinopre.load_dinov2_backbone` and scores a weighted 20-NN of its CLS features
  (cosine similarity, votes weighted by exp(similarity / 0.07): the DINO protocol), written here independently of
  dinopre's own in-training evaluation.
`random` scores the untrained backbone of the same shape and seed, `pixels` the raw pixels, `supervised` the same
backbone trained on the 1,000 labels (the ceiling, as the recipe issue measured it).

Continued pretraining (`train --init-from`): public weights cannot be downloaded here, so `build_source` makes a
stand-in, `auto` pretrained at 4x the budget on the texture and count families mixed; on the other families it is
off-domain. `source` scores it as it is, `init` continues it under `auto` (head warm-up, layer decay, a smaller
lr, DINO's slow teacher), `naive` continues it with a random start's lr and teacher and neither (the dinov2#204
setting):

    python benchmarks/learn.py --families shapes faces hands --recipes source init auto naive

The table gives top-1 accuracy (chance 20 %) and the wall time of each pretraining. `--budget N` multiplies the
epochs.

Results are cached per (family, command) in `benchmarks/results/learn/`, so a table can be printed again or
extended without training twice; `--fresh` ignores the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import _checkout  # first: puts the checkout's src/ on sys.path when dinopre is not installed
import numpy as np
import torch
from PIL import Image
from probes import FAMILIES, write_family

# The command of the recipe issue: the original tool's flags, face preset defaults for everything else.
BASE_FLAGS = ("--epochs 10 --batch-size 64 --image-size 64 --patch-size 8 --vit-embed-dim 128 --vit-depth 4 "
              "--vit-num-heads 4 --num-local-crops 4 --local-crop-size 32 --num-workers 2")
# Continued pretraining from the stand-in for public weights (`build_source`): `{source}` is its export.
AUTO_LR = 5e-4 * 64 / 256 * (384 / 128) ** 0.5 * 4  # what `auto` derives for a random start at this shape
AUTO_MOMENTUM = 0.99  # and its teacher momentum at 310 steps (a half-life of 31 steps, kept at 0.99 or above)
RECIPES: dict[str, str | None] = {
    "random": None,  # the untrained backbone
    "pixels": None,  # raw pixels
    "supervised": None,  # the ceiling: the same backbone trained on the 1,000 labels
    "source": None,  # (a) the source as it is
    "reference": "--recipe reference",
    "auto": "",  # (c) from random weights
    "init": "--init-from {source}",  # (b) continued under auto: head warm-up, layer decay, a smaller lr
    # (d) naive continuation: a random start's lr and teacher, no head warm-up, no layer decay (dinov2#204)
    "naive": f"--init-from {{source}} --head-warmup-epochs 0 --layer-decay 1 --learning-rate {AUTO_LR:.4g} "
             f"--teacher-momentum-base {AUTO_MOMENTUM}",
}
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
DATA_DIR = Path(__file__).resolve().parent / ".data" / "learn"
CACHE_DIR = Path(__file__).resolve().parent / "results" / "learn"


# ============ the k-NN probe (independent of dinopre's evaluation) ============


def load_split(folder: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images of `folder/CLASS/*.png` as (N, 3, size, size) normalised float32 and (N,) class numbers."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).iterdir()):
            image = Image.open(path).convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BICUBIC)
            images.append((np.asarray(image, np.float32) / 255.0 - MEAN) / STD)
            labels.append(label)
    return np.stack(images).transpose(0, 3, 1, 2).copy(), np.array(labels)


def weighted_knn(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Top-1 accuracy (%) of a weighted k-NN: cosine similarity, votes exp(similarity / temperature)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True).clip(1e-12)
    test = test / np.linalg.norm(test, axis=1, keepdims=True).clip(1e-12)
    similarity = test @ train.T
    nearest = np.argsort(-similarity, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
    votes = np.zeros((len(test), int(train_labels.max()) + 1))
    np.add.at(votes, (np.arange(len(test))[:, None], train_labels[nearest]), weights)
    return float((votes.argmax(1) == test_labels).mean() * 100)


@torch.no_grad()
def cls_features(model: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    """(N, D) CLS features, in batches."""
    model.eval()
    return np.concatenate([model(torch.from_numpy(images[i:i + 250])).numpy() for i in range(0, len(images), 250)])


def probe(model: torch.nn.Module | None, eval_dir: Path, size: int) -> float:
    """k-NN accuracy of a backbone's CLS features (or of raw pixels when `model` is None)."""
    train, train_labels = load_split(eval_dir / "train", size)
    test, test_labels = load_split(eval_dir / "test", size)
    if model is None:
        return weighted_knn(train.reshape(len(train), -1), train_labels, test.reshape(len(test), -1), test_labels)
    return weighted_knn(cls_features(model, train), train_labels, cls_features(model, test), test_labels)


# ============ pretraining ============


def _flag_value(flags: list[str], name: str, default: str) -> str:
    return flags[flags.index(name) + 1] if name in flags else default


def random_backbone(flags: list[str]) -> torch.nn.Module:
    """The untrained backbone of this shape, drawn as a plain ViT is (the reference recipe: no constraint on the
    patch filters, which `auto` would apply at the start)."""
    from dinopre.config.loading import build_config
    from dinopre.config.recipe import resolve
    from dinopre.model.method import build_method

    settings = {"train_dir": ["unused"], "image_size": int(_flag_value(flags, "--image-size", "64")),
                "patch_size": int(_flag_value(flags, "--patch-size", "8")),
                "vit_embed_dim": int(_flag_value(flags, "--vit-embed-dim", "128")),
                "vit_depth": int(_flag_value(flags, "--vit-depth", "4")),
                "vit_num_heads": int(_flag_value(flags, "--vit-num-heads", "4")),
                "local_crop_size": int(_flag_value(flags, "--local-crop-size", "32")), "recipe": "reference"}
    config = resolve(build_config("face", cli_settings=settings), num_images=2000).config
    torch.manual_seed(int(_flag_value(flags, "--seed", "0")))  # as `dinopre.train.runtime.setup` seeds a run
    return build_method(config).teacher["backbone"]


def supervised_backbone(flags: list[str], eval_dir: Path, size: int, epochs: int = 15) -> torch.nn.Module:
    """The random-init backbone trained with labels: a linear classifier on its CLS features, cross-entropy on the
    1,000 labelled training images (random flips), AdamW at lr 1e-3, batch 64, `epochs` epochs. Its k-NN score is
    what the recipe issue calls the supervised ceiling: how much of a family this backbone can learn at all."""
    images, labels = load_split(eval_dir / "train", size)
    backbone = random_backbone(flags).requires_grad_(True)  # the teacher's copy, built frozen
    backbone.train()
    classifier = torch.nn.Linear(int(_flag_value(flags, "--vit-embed-dim", "128")), int(labels.max()) + 1)
    optimizer = torch.optim.AdamW([*backbone.parameters(), *classifier.parameters()], lr=1e-3, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(order), 64):
            index = order[start:start + 64]
            x = x_all[index]
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = torch.nn.functional.cross_entropy(classifier(backbone(x)), y_all[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return backbone


def pretrain(family_dir: Path, flags: list[str], work: Path, *, evaluate: bool = True) -> tuple[Path, float]:
    """Train with `dinopre train face` and these flags, exporting the backbone; returns (export, seconds)."""
    export = work / "backbone.pt"
    command = [sys.executable, "-m", "dinopre", "train", "face", "--train-dir", str(family_dir / "pretrain"),
               "--output-dir", str(work), "--export-backbone", str(export), "--overwrite", "--quiet", *flags]
    if evaluate:
        command += ["--eval-dir", str(family_dir / "eval")]
    env = {**os.environ, "PYTHONPATH": f"{_checkout.SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return export, seconds


# ============ the stand-in for public weights ============

SOURCE_FAMILIES = ("texture", "count")


def build_source(budget: int = 4) -> Path:
    """The backbone that stands in for public weights, which this machine cannot download: `auto` pretrained on
    the texture and count families mixed (their 2 x 2,000 pretraining images), for `budget` times the original
    number of steps (twice the images, so `budget` / 2 times the epochs). Cached; returns the export."""
    flags = shlex.split(BASE_FLAGS)
    flags[flags.index("--epochs") + 1] = str(10 * budget // len(SOURCE_FAMILIES))
    key = hashlib.sha256(json.dumps(["source", SOURCE_FAMILIES, flags]).encode()).hexdigest()[:16]
    work = CACHE_DIR / "runs" / f"source-{key}"
    if (work / "backbone.pt").exists():
        return work / "backbone.pt"
    mixed = DATA_DIR / f"source-{'-'.join(SOURCE_FAMILIES)}"
    (mixed / "pretrain").mkdir(parents=True, exist_ok=True)
    for family in SOURCE_FAMILIES:
        for image in sorted((write_family(DATA_DIR, family) / "pretrain").iterdir()):
            target = mixed / "pretrain" / f"{family}-{image.name}"
            if not target.exists():
                target.write_bytes(image.read_bytes())
    export, seconds = pretrain(mixed, flags, work, evaluate=False)
    (work / "seconds.json").write_text(json.dumps({"seconds": seconds, "flags": shlex.join(flags)}))
    return export


def run_recipe(family: str, recipe: str, extra: str | None, budget: int, fresh: bool) -> dict:
    """One cell of the table: accuracy and pretraining time of a recipe on a family (cached)."""
    if extra and "{source}" in extra:
        extra = extra.replace("{source}", shlex.quote(str(build_source())))
    flags = shlex.split(BASE_FLAGS) + shlex.split(extra or "")
    epochs = int(_flag_value(flags, "--epochs", "10")) * budget
    flags[flags.index("--epochs") + 1] = str(epochs)
    key = hashlib.sha256(json.dumps([family, recipe if extra is None else "", flags]).encode()).hexdigest()[:16]
    if recipe == "source":  # a new source is another row
        key = hashlib.sha256((key + str(build_source())).encode()).hexdigest()[:16]
    cache = CACHE_DIR / f"{family}-{recipe}-{key}.json"
    if cache.exists() and not fresh:
        return json.loads(cache.read_text())
    family_dir = write_family(DATA_DIR, family)
    size = int(_flag_value(flags, "--image-size", "64"))
    if recipe == "pixels":
        result = {"knn": probe(None, family_dir / "eval", size), "seconds": 0.0}
    elif recipe == "source":
        from dinopre import load_dinov2_backbone

        export = build_source()
        result = {"knn": probe(load_dinov2_backbone(f"file::{export}"), family_dir / "eval", size), "seconds": 0.0,
                  "source": str(export)}
    elif recipe == "random":
        result = {"knn": probe(random_backbone(flags), family_dir / "eval", size), "seconds": 0.0}
    elif recipe == "supervised":
        start = time.perf_counter()
        model = supervised_backbone(flags, family_dir / "eval", size)
        result = {"knn": probe(model, family_dir / "eval", size), "seconds": time.perf_counter() - start}
    else:
        from dinopre import load_dinov2_backbone

        work = CACHE_DIR / "runs" / f"{family}-{recipe}-{key}"
        export, seconds = pretrain(family_dir, flags, work)
        result = {"knn": probe(load_dinov2_backbone(f"file::{export}"), family_dir / "eval", size),
                  "seconds": seconds, "curve": knn_curve(work)}
    result.update(family=family, recipe=recipe, flags=shlex.join(flags), budget=budget)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=2))
    return result


def knn_curve(run_dir: Path) -> list[float]:
    """The k-NN accuracy dinopre measured at the end of each epoch (its own `--eval-dir` evaluation)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [round(r["knn"], 1) for r in records if r.get("type") == "epoch" and "knn" in r]


def table(results: list[dict], families: list[str], recipes: list[str]) -> str:
    """Markdown table: one row per recipe, k-NN top-1 per family, the mean gain over random init, wall time."""
    cell = {(r["family"], r["recipe"]): r for r in results}
    header = "| recipe | " + " | ".join(families) + " | mean gain over random | pretraining time |"
    lines = [header, "|" + "---|" * (len(families) + 3)]
    for recipe in recipes:
        accs = [cell[(f, recipe)]["knn"] for f in families]
        gains = [cell[(f, recipe)]["knn"] - cell[(f, "random")]["knn"] for f in families
                 if (f, "random") in cell]
        gain = f"{np.mean(gains):+.1f}" if gains and recipe != "random" else ""
        seconds = [cell[(f, recipe)]["seconds"] for f in families]
        timing = f"{np.mean(seconds):.0f} s" if max(seconds) > 0 else "-"
        lines.append(f"| {recipe} | " + " | ".join(f"{a:.1f}" for a in accs) + f" | {gain} | {timing} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--recipes", nargs="+", default=["random", "pixels", "reference", "auto"],
                        help=f"Recipes to run, from {', '.join(RECIPES)} and the --try names.")
    parser.add_argument("--try", dest="tries", action="append", default=[], metavar="NAME=FLAGS",
                        help="An extra recipe: a name and the `dinopre train` flags it adds (repeatable).")
    parser.add_argument("--budget", type=int, default=1, help="Multiply the epochs (the original budget is 10).")
    parser.add_argument("--fresh", action="store_true", help="Train again even when a result is cached.")
    parser.add_argument("--json", type=Path, help="Also write every result to this file.")
    args = parser.parse_args(argv)
    recipes = dict(RECIPES)
    for entry in args.tries:
        name, _, flags = entry.partition("=")
        recipes[name] = flags
        if name not in args.recipes:
            args.recipes.append(name)
    unknown = [r for r in args.recipes if r not in recipes]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; give them with --try NAME=FLAGS")
    results = []
    for family in args.families:
        for recipe in args.recipes:
            result = run_recipe(family, recipe, recipes[recipe], args.budget, args.fresh)
            results.append(result)
            curve = " ".join(f"{v:.0f}" for v in result.get("curve", []))
            line = f"{family:8s} {recipe:12s} knn {result['knn']:5.1f}  {result['seconds']:6.0f} s  per epoch: {curve}"
            print(line, flush=True)  # noqa: T201 - a benchmark script's output is its result
    print("\n" + table(results, args.families, args.recipes))  # noqa: T201
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
