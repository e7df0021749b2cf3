"""`dinopre attention`: last-block CLS maps per head, the same for our ViT and the pipeline's, drawn as a grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from consumer import ConsumerViT
from PIL import Image
from typer.testing import CliRunner

from dinopre.base.events import NullReporter
from dinopre.cli import app
from dinopre.config.loading import build_config
from dinopre.files.checkpoint import slt_state_dict
from dinopre.model.vit import VisionTransformer
from dinopre.train.engine import fit
from dinopre.viz.attention import attention_maps, keep_mass, last_cls_attention

runner = CliRunner()


def _vit(heads: int = 4) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=heads).eval()


def test_the_pipelines_vit_gives_the_same_maps_on_the_same_weights() -> None:
    ours = _vit()
    consumer = ConsumerViT(image_size=32, patch_size=8, in_channels=3, embed_dim=32, depth=2, num_heads=4,
                           mlp_ratio=4.0)
    consumer.load_state_dict(slt_state_dict(ours.state_dict()), strict=True)
    images = torch.randn(3, 3, 32, 32)
    a, b = attention_maps(ours, images, 8), attention_maps(consumer, images, 8)
    assert a.shape == (3, 4, 4, 4)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a[:, 0], a[:, 1])  # one map per head, not their mean
    with torch.no_grad():  # reading the maps leaves the model's output unchanged
        assert torch.allclose(consumer(images), ours(images), atol=1e-5)


def test_each_map_is_the_cls_querys_share_of_attention_over_the_patches() -> None:
    weights = last_cls_attention(_vit(), torch.randn(2, 3, 32, 32))
    assert weights.shape == (2, 4, 16)
    assert (weights >= 0).all() and (weights.sum(-1) < 1).all()  # the CLS key's own share is left out


def test_keep_mass_keeps_the_strongest_patches_up_to_the_share() -> None:
    attention = torch.tensor([0.1, 0.5, 0.1, 0.3])
    assert keep_mass(attention, 0.5).tolist() == [False, True, False, False]
    assert keep_mass(attention, 0.6).tolist() == [False, True, False, True]
    assert keep_mass(attention, 1.0).all()


def test_other_sizes_interpolate_the_position_embedding() -> None:
    maps = attention_maps(_vit(), torch.randn(1, 3, 48, 64), 8)
    assert maps.shape == (1, 4, 6, 8)


@pytest.fixture(scope="module")
def run_and_images(tmp_path_factory: pytest.TempPathFactory, face_folder: Path) -> tuple[Path, Path]:
    from conftest import TINY

    out = tmp_path_factory.mktemp("attention") / "run"
    fit(build_config("face", cli_settings={**TINY, "epochs": 1, "train_dir": [str(face_folder)],
                                            "output_dir": str(out), "export_backbone": str(out / "bb.pt")}),
        NullReporter())
    return out, face_folder


@pytest.mark.parametrize("model", ["checkpoint_last.pt", "bb.pt"])
def test_the_command_draws_one_row_per_image_and_one_column_per_head(run_and_images: tuple[Path, Path],
                                                                     tmp_path: Path, model: str) -> None:
    run, images = run_and_images
    output = tmp_path / "grid.png"
    args = ["attention", str(run / model), str(images), "-o", str(output), "--max-images", "3", "--cell-size", "64"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with Image.open(output) as grid:
        plain = grid.size
    assert runner.invoke(app, [*args, "--no-mean", "--keep-mass", "0", "--force"]).exit_code == 0
    with Image.open(output) as grid:
        fewer = grid.size
    heads = torch.load(run / "checkpoint_last.pt", weights_only=True)["config"]["model"]["vit_num_heads"]
    assert plain[0] - fewer[0] == 2 * (64 + 4)  # the mean and the kept-mass columns
    assert plain[1] == fewer[1] > 3 * 64  # three rows
    assert fewer[0] > (1 + heads) * 64


def test_the_command_refuses_bad_input_in_one_sentence(run_and_images: tuple[Path, Path], tmp_path: Path) -> None:
    run, images = run_and_images
    ckpt = str(run / "checkpoint_last.pt")
    existing = tmp_path / "exists.png"
    existing.write_bytes(b"x")
    cases = [
        ([ckpt, str(tmp_path / "missing")], "does not exist"),
        ([ckpt, str(images), "-o", str(existing)], "--force"),
        ([ckpt, str(images), "--image-size", "30", "-o", str(tmp_path / "a.png")], "multiple of"),
        ([str(images / "signer_a"), str(images), "-o", str(tmp_path / "b.png")], ""),
        ([ckpt, str(images), "--keep-mass", "1.5", "-o", str(tmp_path / "c.png")], "--keep-mass"),
    ]
    for args, words in cases:
        result = runner.invoke(app, ["attention", *args])
        assert result.exit_code == 2, (args, result.output)
        assert words in result.output and "Traceback" not in result.output
    assert existing.read_bytes() == b"x"


def test_another_input_size_says_the_position_embedding_is_interpolated(run_and_images: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    run, images = run_and_images
    result = runner.invoke(app, ["attention", str(run / "checkpoint_last.pt"), str(images), "--image-size", "64",
                                 "-o", str(tmp_path / "g.png")])
    assert result.exit_code == 0 and "interpolated" in result.output


def test_sizes_beyond_any_use_and_unknown_formats_are_one_sentence(run_and_images: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    run, images = run_and_images
    ckpt, heads = str(run / "checkpoint_last.pt"), 2
    cases = [
        (["--cell-size", "5000"], "Error: --cell-size must be between 16 and 1024 pixels, got 5000."),
        (["--max-images", "1000000"], "Error: --max-images must be between 1 and 256, got 1000000."),
        (["--max-images", "256", "--cell-size", "1024"], f"Error: 256 rows of {3 + heads} pictures of 1024 px make a "
                                                         f"{200 + (3 + heads) * 1028 + 4} x 263248 picture, over "
                                                         "100,000,000 pixels; lower --cell-size or --max-images."),
        (["--image-size", "100000"], "Error: --image-size 100000 gives a 12500 x 12500 patch grid; the maps take at "
                                     "most 64 x 64 (--image-size 512 for this backbone's 8 px patches)."),
        (["-o", str(tmp_path / "a.bmp")], f"Error: --output '{tmp_path / 'a.bmp'}' must end in .png, .jpg, .jpeg: "
                                          "those are the formats written."),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["attention", ckpt, str(images), "-o", str(tmp_path / "a.png"), *args])
        assert result.exit_code == 2 and result.output.strip() == message, (args, result.output)
    assert not list(tmp_path.iterdir())
    result = runner.invoke(app, ["attention", ckpt, str(images), "--max-images", "2", "-o", str(tmp_path / "a.jpg")])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "a.jpg") as picture:
        assert picture.format == "JPEG"
