"""Decoding one image file: every PIL mode comes out as correct 8-bit RGB, broken files raise BadImageError.

Files are written with PIL exactly as a camera, an export script or a broken copy would leave them; the checks look
at pixel values a user would see in a training crop (the promise: grayscale, RGBA, palette, CMYK, 16-bit
and EXIF-rotated images are converted correctly; unreadable, truncated, zero-byte, non-image and
decompression-bomb files are reported, never crash).
"""

from __future__ import annotations

import builtins
import io
import os
import random
import struct
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dinopre.data.images
from dinopre.data.images import BACKGROUND, BadImageError, load_rgb, to_rgb

EXIF_ORIENTATION = 0x0112


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image, dtype=np.int64)


def _gradient_16bit(width: int = 256) -> np.ndarray:
    """A (4, width) 16-bit gradient 0..65535 with the exact value 32768 at column 1, row 0."""
    row = np.linspace(0, 65535, width).round().astype(np.uint16)
    grid = np.repeat(row[None, :], 4, axis=0)
    grid[0, 1] = 32768
    return grid


# ============ modes: every file comes out as 8-bit RGB with the right colours ============


def test_rgb_file_is_returned_unchanged(tmp_path: Path) -> None:
    """A plain RGB PNG loads pixel for pixel."""
    data = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(data, "RGB").save(tmp_path / "rgb.png")
    assert np.array_equal(_pixels(load_rgb(tmp_path / "rgb.png")), data)


def test_grayscale_l_becomes_gray_rgb(tmp_path: Path) -> None:
    """An L (8-bit grayscale) PNG gives R = G = B = the gray value."""
    data = np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)
    Image.fromarray(data, "L").save(tmp_path / "gray.png")
    out = _pixels(load_rgb(tmp_path / "gray.png"))
    assert out.shape == (4, 6, 3)
    for channel in range(3):
        assert np.array_equal(out[..., channel], data)


def test_bilevel_mode_1_becomes_black_and_white(tmp_path: Path) -> None:
    """A 1-bit PNG gives pure black and pure white pixels."""
    image = Image.new("1", (4, 2), 0)
    image.putpixel((1, 0), 1)
    image.save(tmp_path / "bits.png")
    out = _pixels(load_rgb(tmp_path / "bits.png"))
    assert tuple(out[0, 1]) == (255, 255, 255) and tuple(out[0, 0]) == (0, 0, 0)


def test_rgba_transparent_pixels_become_the_mean_colour_not_their_hidden_rgb(tmp_path: Path) -> None:
    """Fully transparent pure-red pixels come out as the ImageNet mean (124,116,104); opaque ones are unchanged."""
    data = np.zeros((4, 4, 4), dtype=np.uint8)
    data[..., :] = (255, 0, 0, 0)  # hidden red under full transparency
    data[0, 0] = (10, 200, 30, 255)  # opaque
    data[1, 1] = (255, 255, 255, 128)  # half transparent white
    Image.fromarray(data, "RGBA").save(tmp_path / "rgba.png")
    out = _pixels(load_rgb(tmp_path / "rgba.png"))
    assert BACKGROUND == (124, 116, 104)
    assert tuple(out[3, 3]) == BACKGROUND and tuple(out[2, 0]) == BACKGROUND
    assert tuple(out[0, 0]) == (10, 200, 30)
    alpha = 128 / 255
    expected = [255 * alpha + c * (1 - alpha) for c in BACKGROUND]
    assert np.allclose(out[1, 1], expected, atol=2)


def test_la_transparent_pixels_become_the_mean_colour(tmp_path: Path) -> None:
    """An LA (gray + alpha) PNG: transparent pixels become the mean colour, opaque ones stay gray."""
    data = np.zeros((3, 3, 2), dtype=np.uint8)
    data[..., 0] = 250
    data[0, 0] = (200, 255)
    Image.fromarray(data, "LA").save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    out = _pixels(load_rgb(tmp_path / "la.png"))
    assert tuple(out[0, 0]) == (200, 200, 200)
    assert tuple(out[2, 2]) == BACKGROUND


def _palette_image() -> Image.Image:
    image = Image.new("P", (4, 2), 0)
    palette = [0, 0, 0] * 256
    palette[3 * 1 : 3 * 1 + 3] = (250, 20, 20)
    palette[3 * 2 : 3 * 2 + 3] = (20, 250, 20)
    palette[3 * 3 : 3 * 3 + 3] = (255, 0, 255)  # the colour hidden under the transparent index
    image.putpalette(palette)
    for x, index in enumerate((1, 2, 3, 3)):
        image.putpixel((x, 0), index)
        image.putpixel((x, 1), index)
    return image


def test_palette_without_transparency_gives_the_palette_colours(tmp_path: Path) -> None:
    """A P (palette) PNG without transparency: every pixel is its palette colour."""
    _palette_image().save(tmp_path / "pal.png")
    out = _pixels(load_rgb(tmp_path / "pal.png"))
    assert [tuple(p) for p in out[0]] == [(250, 20, 20), (20, 250, 20), (255, 0, 255), (255, 0, 255)]


def test_palette_with_a_transparent_index_gives_the_mean_colour_there(tmp_path: Path) -> None:
    """A P PNG whose index 3 is transparent: those pixels are the mean colour, the others their palette colour."""
    _palette_image().save(tmp_path / "pal_t.png", transparency=3)
    with Image.open(tmp_path / "pal_t.png") as check:
        assert check.mode == "P" and check.info.get("transparency") == 3
    out = _pixels(load_rgb(tmp_path / "pal_t.png"))
    assert [tuple(p) for p in out[1]] == [(250, 20, 20), (20, 250, 20), BACKGROUND, BACKGROUND]


@pytest.mark.parametrize("suffix", ["jpg", "tiff"])
def test_cmyk_becomes_the_right_rgb_colour(tmp_path: Path, suffix: str) -> None:
    """CMYK JPEG and TIFF files: C=0 M=Y=100% comes out red, not with inverted or swapped channels."""
    path = tmp_path / f"cmyk.{suffix}"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    out = _pixels(load_rgb(path))
    assert np.abs(out[8, 8] - (255, 0, 0)).max() <= 6


@pytest.mark.parametrize("suffix", ["png", "tiff"])
def test_16_bit_gradient_is_scaled_not_clipped_to_white(tmp_path: Path, suffix: str) -> None:
    """An I;16 gradient 0..65535 maps monotonically onto 0..255 (32768 -> ~128), not mostly white."""
    grid = _gradient_16bit()
    path = tmp_path / f"g16.{suffix}"
    Image.fromarray(grid).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # really a high-depth file
    out = _pixels(load_rgb(path))
    gray = out[2, :, 0]
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    assert gray[0] == 0 and gray[-1] == 255
    assert np.all(np.diff(gray) >= 0)
    assert abs(int(out[0, 1, 0]) - 128) <= 1  # the value 32768
    assert (gray == 255).mean() < 0.05  # PIL's plain convert("RGB") would make nearly all of it white


def test_32_bit_integer_tiff_with_16_bit_values(tmp_path: Path) -> None:
    """A 32-bit integer (mode I) TIFF holding 16-bit data maps like the 16-bit file (32768 -> ~128)."""
    grid = _gradient_16bit().astype(np.int32)
    Image.fromarray(grid, "I").save(tmp_path / "i32.tiff")
    with Image.open(tmp_path / "i32.tiff") as check:
        assert check.mode == "I"
    out = _pixels(load_rgb(tmp_path / "i32.tiff"))
    assert out[2, 0, 0] == 0 and out[2, -1, 0] == 255 and abs(int(out[0, 1, 0]) - 128) <= 1
    assert np.all(np.diff(out[2, :, 0]) >= 0)


def test_32_bit_integer_tiff_using_its_full_range_is_not_clipped(tmp_path: Path) -> None:
    """A full-range 32-bit integer TIFF gradient (0..2^31-1) maps monotonically without saturating at white."""
    row = np.linspace(0, 2**31 - 1, 256).astype(np.int32)
    Image.fromarray(np.repeat(row[None, :], 4, axis=0), "I").save(tmp_path / "i32_full.tiff")
    gray = _pixels(load_rgb(tmp_path / "i32_full.tiff"))[2, :, 0]
    assert np.all(np.diff(gray) >= 0)
    assert (gray == 255).mean() < 0.05, f"{(gray == 255).mean():.0%} of the gradient is white"
    assert 100 <= gray[128] <= 156


def test_float_tiff_gradient_maps_onto_0_255(tmp_path: Path) -> None:
    """A float (mode F) TIFF gradient 0.0..1.0 maps monotonically onto 0..255 (0.5 -> ~128)."""
    row = np.linspace(0.0, 1.0, 257, dtype=np.float32)
    Image.fromarray(np.repeat(row[None, :], 3, axis=0), "F").save(tmp_path / "f.tiff")
    with Image.open(tmp_path / "f.tiff") as check:
        assert check.mode == "F"
    gray = _pixels(load_rgb(tmp_path / "f.tiff"))[1, :, 0]
    assert gray[0] == 0 and gray[-1] == 255 and abs(int(gray[128]) - 128) <= 1
    assert np.all(np.diff(gray) >= 0)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "HSV", "I", "I;16",
                                  "I;16B", "F", "PA"])
def test_to_rgb_handles_every_common_mode(mode: str) -> None:
    """`to_rgb` turns an in-memory image of each common PIL mode into an 8-bit RGB image of the same size."""
    out = to_rgb(Image.new(mode, (5, 3)))
    assert out.mode == "RGB" and out.size == (5, 3)


# ============ EXIF orientation ============


def _marked_jpeg(path: Path, orientation: int) -> None:
    """A 32x16 (W x H) JPEG whose stored top-left 8x8 block is red, the rest blue, with an EXIF orientation."""
    data = np.zeros((16, 32, 3), dtype=np.uint8)
    data[...] = (0, 0, 230)
    data[:8, :8] = (230, 0, 0)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    Image.fromarray(data, "RGB").save(path, quality=95, exif=exif.tobytes())


def _is_red(pixel: np.ndarray) -> bool:
    return pixel[0] > 180 and pixel[2] < 60


@pytest.mark.parametrize(("orientation", "size", "red_at"), [
    (1, (32, 16), (3, 3)),  # as stored: top-left
    (3, (32, 16), (28, 12)),  # rotated 180: bottom-right
    (6, (16, 32), (12, 3)),  # displayed rotated 90 clockwise: top-right
    (8, (16, 32), (3, 28)),  # displayed rotated 90 counter-clockwise: bottom-left
])
def test_exif_orientation_rotates_the_pixels(tmp_path: Path, orientation: int, size: tuple[int, int],
                                             red_at: tuple[int, int]) -> None:
    """EXIF orientations 3, 6 and 8 are applied: the marked corner lands where a photo viewer shows it."""
    path = tmp_path / f"o{orientation}.jpg"
    _marked_jpeg(path, orientation)
    image = load_rgb(path)
    assert image.size == size
    out = _pixels(image)
    x, y = red_at
    assert _is_red(out[y, x]), out[y, x]
    red_corners = [(cx, cy) for cx in (3, size[0] - 4) for cy in (3, size[1] - 4) if _is_red(out[cy, cx])]
    assert red_corners == [red_at]  # exactly one corner is red


# ============ sizes ============


@pytest.mark.parametrize("size", [(1, 1), (5, 3), (3, 5), (1, 300)])
def test_tiny_and_odd_sizes_load(tmp_path: Path, size: tuple[int, int]) -> None:
    """1x1, 5x3 and 1x300 images load with their size and colour."""
    path = tmp_path / f"s{size[0]}x{size[1]}.png"
    Image.new("RGB", size, (9, 99, 199)).save(path)
    image = load_rgb(path)
    assert image.size == size and image.getpixel((0, 0)) == (9, 99, 199)


# ============ broken files: BadImageError with a reason ============


def _real_jpeg(size: int = 96) -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise, "RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _real_png(size: int = 96) -> bytes:
    noise = np.random.default_rng(2).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise, "RGB").save(buffer, "PNG")
    return buffer.getvalue()


def _assert_bad(path: Path, reason: str) -> str:
    with pytest.raises(BadImageError) as info:
        load_rgb(path)
    message = str(info.value)
    assert message and "\n" not in message, repr(message)
    assert reason in message, message
    return message


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("empty.jpg", b"", "not an image"),
    ("random.jpg", bytes(random.Random(0).randrange(256) for _ in range(4096)), "not an image"),
    ("notes.png", b"these are my notes, not a picture\n" * 20, "not an image"),
    ("page.jpg", b"<html><body>404 Not Found</body></html>", "not an image"),
    ("truncated.jpg", _real_jpeg()[: len(_real_jpeg()) // 2], "cannot decode"),
    ("truncated.png", _real_png()[: len(_real_png()) // 2], "cannot decode"),
    ("header_only.png", _real_png()[:40], ""),
], ids=["empty", "random", "text", "html", "truncated_jpeg", "truncated_png", "header_only_png"])
def test_broken_files_raise_bad_image_error_with_a_reason(tmp_path: Path, name: str, content: bytes,
                                                          reason: str) -> None:
    """Zero-byte, random, text, HTML and truncated files raise BadImageError with a short one-line reason."""
    path = tmp_path / name
    path.write_bytes(content)
    _assert_bad(path, reason)


def test_a_directory_named_like_an_image_is_a_bad_image(tmp_path: Path) -> None:
    """A folder called x.png raises BadImageError, not IsADirectoryError."""
    (tmp_path / "x.png").mkdir()
    _assert_bad(tmp_path / "x.png", "cannot decode")


def test_a_file_that_disappeared_is_a_bad_image(tmp_path: Path) -> None:
    """A path deleted after the scan raises BadImageError('file disappeared')."""
    _assert_bad(tmp_path / "gone.jpg", "file disappeared")


def test_a_file_without_read_permission_is_a_bad_image(tmp_path: Path) -> None:
    """chmod 000 on a real JPEG gives BadImageError('permission denied') (skipped where root reads anyway)."""
    path = tmp_path / "locked.jpg"
    path.write_bytes(_real_jpeg(16))
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user (root) whom chmod 000 does not stop from reading")
        _assert_bad(path, "permission denied")
    finally:
        path.chmod(0o644)


def test_permission_denied_while_opening_is_a_bad_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When opening the file fails with EACCES (simulated, so it also runs as root), load_rgb says so."""
    path = tmp_path / "locked.jpg"
    path.write_bytes(_real_jpeg(16))
    real_open = builtins.open

    def deny(file, mode="r", *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(Image, "builtins", types.SimpleNamespace(open=deny))
    _assert_bad(path, "permission denied")


def _png_claiming(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR is patched (CRC fixed) to claim width x height pixels."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8), 7).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (9000, 9000)])
def test_decompression_bomb_header_is_refused_before_decoding(tmp_path: Path, width: int, height: int) -> None:
    """A PNG whose header claims 400 MP (over PIL's own limit) or 81 MP (over dinopre's 64 MP) is a bad image."""
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(width, height))
    with pytest.MonkeyPatch.context() as patch:  # the patched header really is read back as that size
        patch.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(path) as check:
            assert check.size == (width, height)
    _assert_bad(path, "decompression bomb")


def test_max_pixels_limit_applies_to_normal_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With MAX_PIXELS lowered to 100, a normal 20x20 JPEG is refused as a bomb and a 10x10 one loads."""
    monkeypatch.setattr(dinopre.data.images, "MAX_PIXELS", 100)
    Image.new("RGB", (20, 20), (1, 2, 3)).save(tmp_path / "big.jpg")
    Image.new("RGB", (10, 10), (1, 2, 3)).save(tmp_path / "ok.jpg")
    message = _assert_bad(tmp_path / "big.jpg", "decompression bomb")
    assert "20x20" in message
    assert load_rgb(tmp_path / "ok.jpg").size == (10, 10)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the corrupt TIFF tags it skips
def test_randomly_corrupted_files_never_escape_as_other_exceptions(tmp_path: Path) -> None:
    """Fuzzing: 400 seeded byte-corruptions of JPEG (with EXIF), PNG, TIFF and BMP files either load as RGB or raise
    BadImageError, never another exception (which would kill a data-loader worker and the run)."""
    base = Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 24, 3), dtype=np.uint8), "RGB")
    originals = {}
    for fmt, suffix in (("JPEG", "jpg"), ("PNG", "png"), ("TIFF", "tiff"), ("BMP", "bmp")):
        buffer = io.BytesIO()
        options = {}
        if fmt == "JPEG":
            exif = Image.Exif()
            exif[EXIF_ORIENTATION] = 6
            options["exif"] = exif.tobytes()
        base.save(buffer, fmt, **options)
        originals[suffix] = buffer.getvalue()
    rng = random.Random(1234)
    outcomes = {"loaded": 0, "bad": 0}
    for suffix, original in originals.items():
        for i in range(100):
            data = bytearray(original)
            for _ in range(rng.randint(1, 6)):
                limit = 300 if rng.random() < 0.7 else len(data)  # headers mostly: that is where parsers break
                data[rng.randrange(min(limit, len(data)))] = rng.randrange(256)
            path = tmp_path / f"fuzz_{i}.{suffix}"
            path.write_bytes(bytes(data))
            try:
                image = load_rgb(path)
            except BadImageError:
                outcomes["bad"] += 1
            else:
                assert image.mode == "RGB" and min(image.size) >= 1
                outcomes["loaded"] += 1
    assert outcomes["bad"] > 0 and outcomes["loaded"] > 0  # the corruptions hit both ways
