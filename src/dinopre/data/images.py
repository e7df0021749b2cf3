"""Decoding one image file to RGB, correctly for every mode, and telling a broken file from a good one.

Conversions (a training crop must look like the photo a user sees): EXIF orientation is applied; L, P, CMYK, YCbCr
and friends go through PIL's RGB conversion; images with transparency (LA, RGBA, PA, P with a transparent colour)
are composited over the ImageNet mean colour, which normalises to zero, instead of keeping whatever colour hides
under transparent pixels; 16-bit images (I;16, and I holding 16-bit values) are scaled by 65535, and wider integer
or float images (I, F) by their own range, instead of being clipped at 255 (PIL's `convert("RGB")` turns most of a
16-bit image white). A file that cannot be decoded — unreadable, truncated, empty, not an image, or a decompression
bomb — raises `BadImageError` with a short reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Face and hand crops are small; a file above this many pixels is treated as a decompression bomb. PIL warns at
# its own limit (89 MP) and raises at twice that; we raise at ours.
MAX_PIXELS = 64_000_000
BACKGROUND = (124, 116, 104)  # the ImageNet mean colour, 0 after normalisation


class BadImageError(Exception):
    """A file that cannot be used as a training image; the message is a short reason."""


def load_rgb(path: Path | BinaryIO) -> Image.Image:
    """Decode an image file (a path, or a file object such as a tar member's bytes) to an 8-bit RGB image.

    Raises:
        BadImageError: the file cannot be read or decoded, or is too large (decompression bomb).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > MAX_PIXELS:
                    raise BadImageError(f"{width}x{height} pixels is over the {MAX_PIXELS:,} limit "
                                        "(decompression bomb?)")
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except BadImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImageError("too many pixels (decompression bomb)") from None
    except UnidentifiedImageError:
        raise BadImageError("not an image PIL can read") from None
    except FileNotFoundError:
        raise BadImageError("file disappeared") from None
    except PermissionError:
        raise BadImageError("permission denied") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated data, broken headers, bad EXIF
        raise BadImageError(f"cannot decode: {_reason(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - any other decoder failure is this file's problem, not the run's
        raise BadImageError(f"the decoder failed ({type(exc).__name__}: {_reason(exc)})") from None


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see the module docstring for the rules)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return _high_depth_to_rgb(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    if image.mode != "F" and low >= 0 and high <= 65535:
        scaled = values / 65535.0  # 16-bit data (PIL also opens some 16-bit files as 32-bit "I")
    else:  # floats, and integers beyond 16 bits: stretch the image's own range
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    gray = Image.fromarray(np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8), mode="L")
    return gray.convert("RGB")
