"""Blank crops: images of one flat colour, found when a folder is scanned and left out of training.

The pipeline's extractor writes an all-black 224 x 224 crop whenever it finds no face or hand, so that frame
numbers stay aligned. Trained on, those crops all map to one point: KoLeo reads about -log(1e-8) on every pair of
them and a third of the compute goes to images with nothing in them. Skipping them when they are decoded would not
save that cost (a bad slot tries its neighbours again every epoch, and blanks come in runs of consecutive frames),
so they are found at scan time and left out of the index before the sampler is built.

Only files small enough to be flat are decoded at scan time (`SCAN_SIZE_BOUND`). Measured on 224 px JPEGs
(`python benchmarks/data.py bound`): a flat colour is 1,409-2,003 bytes in colour (4:2:0 or 4:4:4 chroma, any
quality from 50 to 100) and 918-922 bytes in grayscale, a flat PNG 226 bytes; 200 crops of a real photograph are
at least 3,235 bytes in colour or grayscale at quality 75 (medians 8.8-23 KB), and blurred with a sigma of 4 or 8 px
at least 1,651 bytes (medians 3.8-8.0 KB). 4,096 bytes keeps a 2x margin over every flat JPEG (room for EXIF or an
ICC profile) and leaves every sharp crop undecoded; about half of the heavily blurred ones at quality 75 fall under
it, which costs them one decode at the first scan, never a wrong verdict. A flat image above the bound (a large or
uncompressed one) is still caught when it is decoded for training (`BlankImageError`) and skipped like a broken
file.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from dinopre.data.images import BadImageError

SCAN_SIZE_BOUND = 4096  # bytes: files up to this size are decoded at scan time to see whether they are flat
TOO_SMALL = 32  # bytes: below this no supported format holds an image (a BMP header alone is 54)
FLAT_RANGE = 4  # an image is flat when max - min is at most this in every channel (JPEG of zeros: 0)
# What the scan found about each file (FileIndex.verdicts).
NOT_CHECKED, NOT_FLAT, FLAT, UNDECODABLE = 0, 1, 2, 3
BLANK_REASON = "one flat colour (a blank crop)"
SCANNED, DECODED = f"{BLANK_REASON}, found at scan time", f"{BLANK_REASON}, found when decoded"
BLANK_FILES = "blank_files.json"  # where a run lists the blank crops it left out (dinopre.files.rundir)


class BlankImageError(BadImageError):
    """A decoded image that is one flat colour; the message is a short reason that starts with BLANK_REASON."""


def is_flat(image: Image.Image) -> bool:
    """Whether every channel of an image spans at most FLAT_RANGE levels."""
    extrema = image.getextrema()
    if not isinstance(extrema[0], tuple):  # a single-band image
        extrema = (extrema,)
    return all(high - low <= FLAT_RANGE for low, high in extrema)


def reject_flat(image: Image.Image) -> Image.Image:
    """The image itself, unless it is flat.

    Raises:
        BlankImageError: the image is one flat colour (found at decode time: the file was above SCAN_SIZE_BOUND).
    """
    if is_flat(image):
        raise BlankImageError(DECODED)
    return image


def is_blank_reason(reason: str) -> bool:
    """Whether a skipped file's reason says it was blank (rather than broken)."""
    return reason.startswith(BLANK_REASON)


def verdict_of(load: Callable[[], Image.Image]) -> int:
    """FLAT, NOT_FLAT, or UNDECODABLE (left for training to report as a broken file) for one image."""
    try:
        return FLAT if is_flat(load()) else NOT_FLAT
    except BadImageError:
        return UNDECODABLE


def check_small(sizes: np.ndarray, verdicts: np.ndarray, load: Callable[[int], Image.Image],
                threads: int | None = None) -> int:
    """Decode every file not checked yet whose size is at most SCAN_SIZE_BOUND and record its verdict in place.

    Args:
        sizes: each file's size in bytes.
        verdicts: each file's verdict (NOT_CHECKED entries are checked if small); updated in place.
        load: decodes file `i` to RGB (raises BadImageError).
        threads: decoding threads (Pillow releases the GIL while it decodes); default: one per CPU.

    Returns:
        The number of files decoded.
    """
    unchecked = verdicts == NOT_CHECKED
    verdicts[unchecked & (sizes < TOO_SMALL)] = UNDECODABLE  # no image format fits: not worth a decode
    todo = np.flatnonzero(unchecked & (sizes >= TOO_SMALL) & (sizes <= SCAN_SIZE_BOUND))
    if not len(todo):
        return 0
    with ThreadPoolExecutor(threads or len(_cpus())) as pool:
        for start in range(0, len(todo), 4096):  # bounded: futures for 10^6 files at once would cost memory
            chunk = todo[start:start + 4096].tolist()
            verdicts[chunk] = list(pool.map(lambda i: verdict_of(lambda: load(i)), chunk))
    return len(todo)


def _cpus() -> set[int] | range:
    import os

    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return range(os.cpu_count() or 1)


def reused_verdicts(fresh_sizes: np.ndarray, fresh_mtimes: np.ndarray, old_sizes: np.ndarray,
                    old_mtimes: np.ndarray, old_verdicts: np.ndarray) -> np.ndarray:
    """The verdicts of a listing of the same files as an earlier one: the earlier verdict where the size and the
    modification time are unchanged (the same assumption a resume makes), NOT_CHECKED elsewhere."""
    same = (fresh_sizes == old_sizes) & (fresh_mtimes == old_mtimes)
    return np.where(same, old_verdicts, NOT_CHECKED).astype(np.uint8)
