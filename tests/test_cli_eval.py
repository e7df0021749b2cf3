"""`dinopre eval`: the k-NN a run logged is what `eval` gives for its checkpoint and its export, several backbones
come side by side, `--json` is one object per backbone, `--linear` adds a probe, and bad input is refused with one
sentence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from PIL import Image
from typer.testing import CliRunner

from dinopre.cli import app

runner = CliRunner()


def invoke(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args], prog_name="dinopre")


def _one_error_line(output: str) -> str:
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    return errors[0]


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes without train/ and test/ (a seeded share is held out): two of the same kind of synthetic
    face, which no backbone can tell apart, and hands, so the k-NN is neither 0 nor 100 %."""
    from dinopre.data.demo import write_synthetic_folder

    root = tmp_path_factory.mktemp("probe")
    write_synthetic_folder(root / "face_a", "face", 16, size=32)
    write_synthetic_folder(root / "face_b", "face", 16, size=32, start=100)
    write_synthetic_folder(root / "hands", "hands", 16, size=32)
    return root


@pytest.fixture(scope="module")
def easy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An easy, linearly separable folder: flat images, noisy ones and stripes, each of a random tint. (Not
    classes of tints alone: `auto`'s zero-mean patch filters make a backbone blind to a flat colour.)"""
    root = tmp_path_factory.mktemp("easy")
    rng = np.random.default_rng(0)
    rows = np.arange(32)[:, None, None]
    for name in ("flat", "noise", "stripes"):
        (root / name).mkdir()
        for i in range(16):
            pixels = rng.uniform(40, 215, 3) + rng.normal(0, 60 if name == "noise" else 3, (32, 32, 3))
            if name == "stripes":
                pixels = pixels + 60 * np.sign(np.sin(2 * np.pi * rows / 8 + rng.uniform(0, 2 * np.pi)))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, face_folder: Path, probe: Path) -> Path:
    """A tiny 2-epoch run trained with `--eval-dir probe` (seed 5), its checkpoint and its export."""
    folder = tmp_path_factory.mktemp("eval-run")
    config = folder / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = folder / "run"
    result = invoke("train", "face", "--config", config, "--train-dir", face_folder, "--eval-dir", probe,
                    "--seed", "5", "--output-dir", out, "--export-backbone", out / "bb.pt", "-q")
    assert result.exit_code == 0, result.output
    return out


def _logged_knn(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["type"] == "epoch"][-1]["knn"]


def test_the_knn_equals_what_training_logged_for_the_checkpoint_and_the_export(run: Path, probe: Path) -> None:
    result = invoke("eval", run / "checkpoint_last.pt", run / "bb.pt", "--eval-dir", probe, "--seed", "5", "--json")
    assert result.exit_code == 0, result.output
    checkpoint, export = json.loads(result.stdout)
    logged = _logged_knn(run)
    assert 0 < logged < 100  # a real classification, where a wrong fold or feature would show
    assert checkpoint["knn_top1"] == export["knn_top1"] == logged
    # Another seed holds out other images: the figure is that of other folds.
    other = json.loads(invoke("eval", run / "bb.pt", "--eval-dir", probe, "--seed", "6", "--json").stdout)
    assert other[0]["test_images"] == checkpoint["test_images"] == 12  # 4 of each 16


def test_two_backbones_give_two_rows_side_by_side(run: Path, probe: Path) -> None:
    result = invoke("eval", run / "checkpoint_last.pt", run / "bb.pt", "--eval-dir", probe, "--weights", "student")
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if " 32 px │" in line]  # a long path folds over lines
    assert len(rows) == 2 and "student" in rows[0] and "teacher" in rows[1]  # an export holds its teacher
    assert all(row.rstrip(" │").endswith("%") for row in rows)
    assert "weighted 20-NN" in result.output
    assert "at 32 px: 36 train and 12 test images of 3 classes" in result.output
    assert "decoding at 32 px: 48 images" in result.output  # progress, as plain lines off a terminal
    assert result.output.count("decoding at") == 1  # one input size, decoded once


def test_json_has_one_object_per_backbone_with_the_fields(run: Path, probe: Path) -> None:
    result = invoke("eval", run / "bb.pt", run / "bb.pt", "--eval-dir", probe, "--image-size", "48", "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)  # nothing but the JSON on stdout: no progress
    assert len(scores) == 2 and scores[0] == scores[1]
    assert set(scores[0]) == {"path", "weights", "image_size", "knn_top1", "train_images", "test_images", "classes",
                              "skipped_images"}
    assert scores[0]["path"] == str(run / "bb.pt") and scores[0]["image_size"] == 48
    assert (scores[0]["train_images"], scores[0]["test_images"], scores[0]["classes"]) == (36, 12, 3)
    assert 0.0 <= scores[0]["knn_top1"] <= 100.0


def test_linear_adds_a_probe_that_is_high_on_a_separable_folder(run: Path, easy: Path) -> None:
    result = invoke("eval", run / "bb.pt", "--eval-dir", easy, "--linear", "--json")
    assert result.exit_code == 0, result.output
    [score] = json.loads(result.stdout)
    assert 90.0 <= score["linear_top1"] <= 100.0
    table = invoke("eval", run / "bb.pt", "--eval-dir", easy, "--linear")
    assert "linear" in table.output and f"{score['linear_top1']:.1f}%" in table.output


@pytest.mark.parametrize(("args", "message"), [
    (["{bb}", "{tmp}/missing.pt"], "missing.pt' does not exist"),
    (["{tmp}/notes.txt"], "is not a readable checkpoint"),
    (["{bb}", "--image-size", "36"], "--image-size 36 is not a multiple of the patch size 8"),
    (["{bb}", "--image-size", "0"], "--image-size must be a positive number"),
    (["{bb}", "--test-share", "0"], "--test-share is the share"),
    (["{bb}", "--knn-k", "0"], "--knn-k must be a positive"),
    (["{bb}", "--device", "cuda:7"], "--device cuda:7"),
    (["{bb}", "--seed", "-1"], "--seed must be 0 or more"),
    (["{bb}", "--image-size", "1000000000"], "--image-size 1000000000 is beyond"),
    (["{bb}", "--knn-temperature", "nan"], "--knn-temperature must be positive"),
])
def test_bad_input_exits_2_with_one_sentence(run: Path, probe: Path, tmp_path: Path, args: list[str],
                                             message: str) -> None:
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    args = [a.replace("{bb}", str(run / "bb.pt")).replace("{tmp}", str(tmp_path)) for a in args]
    result = invoke("eval", *args, "--eval-dir", probe)
    assert result.exit_code == 2, result.output
    assert message in _one_error_line(result.output)


def test_a_folder_without_two_classes_of_images_is_refused(run: Path, tmp_path: Path) -> None:
    from dinopre.data.demo import write_synthetic_folder

    write_synthetic_folder(tmp_path / "one" / "face", "face", 8, size=32)
    (tmp_path / "one" / "empty").mkdir()
    result = invoke("eval", run / "bb.pt", "--eval-dir", tmp_path / "one")
    assert result.exit_code == 2
    assert "needs at least two class sub-folders of images, found 1" in _one_error_line(result.output)
    result = invoke("eval", run / "bb.pt", "--eval-dir", tmp_path / "nowhere")
    assert result.exit_code == 2 and "is not a folder" in _one_error_line(result.output)
    assert invoke("eval", run / "bb.pt").exit_code == 2  # --eval-dir is required (a usage error)
