"""`dinopre preview` and a run's views.png: the views exactly as training renders them, iBOT masks shaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dinopre.cli import app
from dinopre.config.loading import build_config
from dinopre.config.recipe import resolve
from dinopre.data.dataset import EpochBatchSampler
from dinopre.data.pipeline import build_data_loader, build_source, device_batches
from dinopre.viz.preview import first_images, render_views, shade_mask

runner = CliRunner()


@pytest.mark.parametrize(("augment_on", "algorithm"), [("device", "ibot"), ("workers", "dino")])
def test_the_preview_shows_the_first_batch_training_gets(face_folder: Path, tmp_path: Path, augment_on: str,
                                                         algorithm: str) -> None:
    config = build_config("face", cli_settings={"train_dir": [str(face_folder)], "image_size": 32, "patch_size": 8,
                                                "local_crop_size": 16, "num_local_crops": 2, "batch_size": 8,
                                                "augment_on": augment_on, "algorithm": algorithm,
                                                "output_dir": str(tmp_path)})
    data = build_source(config)
    config = resolve(config, len(data.source)).config
    sampler = EpochBatchSampler(len(data.source), 8, config.run.seed, 0, 1)
    loader, render = build_data_loader(config, data.source, torch.device("cpu"), sampler, 0)
    trained_on = next(device_batches(iter(loader), torch.device("cpu"), render))
    shown = render_views(config, data.source, first_images(config, 3, 0, len(data.source)))
    assert shown.indices.tolist() == trained_on.indices[:3].tolist()
    rows = [v * 8 + i for v in range(2) for i in range(3)]
    assert torch.equal(shown.global_crops, trained_on.global_crops[rows])
    assert torch.equal(shown.local_crops, trained_on.local_crops[rows])  # 2 local views too
    if algorithm == "ibot":
        assert torch.equal(shown.masks, trained_on.masks[rows])


def test_masked_patches_are_tinted_and_the_others_untouched() -> None:
    view = np.full((16, 16, 3), 200, dtype=np.uint8)
    mask = np.array([True, False, False, False])
    shaded = shade_mask(view, mask, 8)
    assert (shaded[:8, :8] != 200).any() and (shaded[8:, :] == 200).all() and (shaded[:8, 8:] == 200).all()


def test_the_command_draws_a_row_per_image_and_a_column_per_view(tmp_path: Path) -> None:
    out = tmp_path / "views.png"
    result = runner.invoke(app, ["preview", "face", "--demo", "--images", "3", "--num-local-crops", "2",
                                 "--cell-size", "64", "-o", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(out) as grid:
        width, height = grid.size
    result = runner.invoke(app, ["preview", "face", "--demo", "--images", "2", "--num-local-crops", "4",
                                 "--cell-size", "64", "-o", str(out), "--force"])
    with Image.open(out) as grid:
        wider, lower = grid.size
    assert wider - width == 2 * (64 + 4) and height - lower == 64 + 4


@pytest.mark.parametrize(("args", "words"), [
    (["hands"], "--train-dir"),
    (["face", "--demo", "--local-crop-scale", "0.5", "0.2"], "local-crop-scale"),
    (["face", "--demo", "--images", "0"], "--images"),
])
def test_the_command_refuses_bad_settings_in_one_sentence(tmp_path: Path, args: list[str], words: str) -> None:
    result = runner.invoke(app, ["preview", *args, "-o", str(tmp_path / "v.png")])
    assert result.exit_code == 2 and words in result.output and "Traceback" not in result.output
    assert not (tmp_path / "v.png").exists()


def test_preview_takes_every_augmentation_option_of_train() -> None:
    import typer.main

    def options(name: str) -> set[str]:
        command = next(c for c in typer.main.get_command(app).commands.values() if c.name == name)
        return {p.name for p in command.params}

    augmentation = {"train_dir", "demo", "config", "num_local_crops", "local_crop_size", "global_crop_scale",
                    "local_crop_scale", "flip_prob", "augment_on", "image_size", "patch_size", "algorithm",
                    "patch_mask_ratio", "mask_probability", "mask_shape", "seed", "device", "recipe"}
    assert augmentation <= options("train") and augmentation <= options("preview")


@pytest.mark.parametrize(("args", "message"), [
    (["--cell-size", "100000"], "Error: --cell-size must be between 16 and 1024 pixels, got 100000."),
    (["--images", "100000"], "Error: --images must be between 1 and 256, got 100000."),
    (["--images", "256", "--cell-size", "1024"], "Error: 256 rows of 6 pictures of 1024 px make a 6372 x 263248 "
                                                  "picture, over 100,000,000 pixels; lower --cell-size or --images."),
    (["--image-size", "4096", "--patch-size", "16", "--local-crop-size", "96"],
     "Error: 4 images of 6 views at --image-size 4096 and --local-crop-size 96 are 134,365,184 pixels to render, "
     "over 100,000,000; lower --images or the sizes."),
])
def test_sizes_beyond_any_use_are_refused_in_one_sentence_before_drawing(tmp_path: Path, args: list[str],
                                                                         message: str) -> None:
    result = runner.invoke(app, ["preview", "face", "--demo", *args, "-o", str(tmp_path / "v.png")])
    assert result.exit_code == 2 and result.output.strip() == message, result.output
    assert not (tmp_path / "v.png").exists()


def test_the_picture_is_written_in_the_format_its_suffix_names(tmp_path: Path) -> None:
    common = ["preview", "face", "--demo", "--images", "1", "--cell-size", "32"]
    assert runner.invoke(app, [*common, "-o", str(tmp_path / "v.jpg")]).exit_code == 0
    with Image.open(tmp_path / "v.jpg") as picture:
        assert picture.format == "JPEG"
    result = runner.invoke(app, [*common, "-o", str(tmp_path / "v.gif")])
    assert result.exit_code == 2 and result.output.strip() == (
        f"Error: --output '{tmp_path / 'v.gif'}' must end in .png, .jpg, .jpeg: those are the formats written.")
