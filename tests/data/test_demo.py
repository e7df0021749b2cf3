"""Tests of the synthetic demo images (dinopre.data.demo)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinopre.data.demo import DEMO_KINDS, synthetic_image, write_synthetic_folder


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("kind", DEMO_KINDS)
def test_same_index_gives_identical_pixels(kind: str) -> None:
    assert np.array_equal(pixels(synthetic_image(kind, 17)), pixels(synthetic_image(kind, 17)))


@pytest.mark.parametrize("kind", DEMO_KINDS)
def test_different_indices_give_clearly_different_images(kind: str) -> None:
    images = [pixels(synthetic_image(kind, index)) for index in range(8)]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i] - images[j]).mean() > 5


def test_faces_and_hands_differ() -> None:
    for index in range(4):
        assert np.abs(pixels(synthetic_image("face", index)) - pixels(synthetic_image("hands", index))).mean() > 5


@pytest.mark.parametrize("kind", DEMO_KINDS)
@pytest.mark.parametrize("size", [16, 32, 64, 100])
def test_size_and_mode(kind: str, size: int) -> None:
    image = synthetic_image(kind, 3, size)
    assert image.size == (size, size) and image.mode == "RGB"
    assert pixels(image).std() > 10  # real content, not a flat fill


def test_folder_is_written_in_sorted_index_order(tmp_path: Path) -> None:
    root = tmp_path / "nested" / "faces"
    paths = write_synthetic_folder(root, "face", 12, 32, start=5)
    assert [p.name for p in paths] == [f"face_{i:06d}.jpg" for i in range(5, 17)]
    assert sorted(root.iterdir()) == paths
    for index, path in zip(range(5, 17), paths, strict=True):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (32, 32)
            # JPEG is lossy (and chroma-subsampled) but must still show the same picture, not a neighbouring one.
            loaded = pixels(image.convert("RGB"))
            own_error = np.abs(loaded - pixels(synthetic_image("face", index, 32))).mean()
            neighbour_error = np.abs(loaded - pixels(synthetic_image("face", index + 1, 32))).mean()
            assert own_error < 12 and own_error < 0.5 * neighbour_error


def test_png_folder_is_lossless(tmp_path: Path) -> None:
    paths = write_synthetic_folder(tmp_path, "hands", 3, 24, image_format="png")
    assert [p.suffix for p in paths] == [".png"] * 3
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            assert np.array_equal(pixels(image), pixels(synthetic_image("hands", index, 24)))


def test_unknown_kind_or_format_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="face, hands"):
        synthetic_image("cats", 0)
    with pytest.raises(ValueError, match="face, hands"):
        write_synthetic_folder(tmp_path / "x", "cats", 2)
    with pytest.raises(ValueError, match="jpg, png"):
        write_synthetic_folder(tmp_path / "x", "face", 2, image_format="gif")
    assert not (tmp_path / "x").exists()


def test_generation_is_fast() -> None:
    start = time.perf_counter()
    for index in range(64):
        synthetic_image("face" if index % 2 else "hands", index)
    # Budget is ~1-2 ms per image; 15x headroom keeps this stable on a loaded CI machine.
    assert time.perf_counter() - start < 2.0
