"""Picture grids with Pillow alone: titled columns, labelled rows, heat maps with a colour bar, a PNG written safely.

`dinopre attention` and `dinopre preview` (and the `views.png` of a run) draw with these; no plotting library is
needed for them (matplotlib stays an optional extra for `dinopre plot`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dinopre.base.errors import ConfigError
from dinopre.files.checkpoint import TMP_MARK
from dinopre.files.outputs import write_error

# A perceptually ordered dark-to-bright ramp (the anchor colours of matplotlib's "inferno"), so that a map reads
# the same in grayscale print and for colour-blind readers.
_RAMP = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                  (250, 193, 39), (252, 255, 164)], dtype=np.float32)
PAD, TITLE_HEIGHT, LABEL_WIDTH = 4, 16, 0
# Bounds of a grid, checked before anything is decoded or drawn: a cell larger than a screen, 10^8 pixels (300 MB
# of RGB) in all, a few hundred images (every one is decoded and kept at the model's size first).
MIN_CELL, MAX_CELL, MAX_PIXELS, MAX_IMAGES = 16, 1024, 10**8, 256
LABEL_ALLOWANCE = 200  # pixels of row labels, at most (they are cut to about 22 characters)
# The picture formats `save_picture` writes, by suffix (Pillow's names).
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours of the ramp (linear between its anchors)."""
    x = np.clip(values, 0.0, 1.0) * (len(_RAMP) - 1)
    low = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    t = (x - low)[..., None]
    return (_RAMP[low] * (1 - t) + _RAMP[low + 1] * t).round().astype(np.uint8)


def normalized(values: np.ndarray) -> np.ndarray:
    """Values scaled to [0, 1] by their own minimum and maximum (a constant map becomes 0)."""
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """An RGB image with a colourised [0, 1] map blended over it."""
    return (image.astype(np.float32) * (1 - alpha) + colorize(heat).astype(np.float32) * alpha).round().astype(
        np.uint8)


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


@dataclass
class Grid:
    """A table of equally sized cells with a title above each column and an optional label left of each row.

    Args:
        cell: side of a square cell in pixels (every picture is resized to it).
        titles: one title per column.
    """

    cell: int
    titles: list[str]
    rows: list[tuple[str, list[np.ndarray]]] = field(default_factory=list)
    footer: str = ""
    colour_bar: bool = False

    def add_row(self, label: str, pictures: list[np.ndarray]) -> None:
        """One row: (H, W, 3) uint8 pictures, as many as there are columns (or fewer)."""
        self.rows.append((label, pictures))

    def render(self) -> Image.Image:
        """The grid as one RGB image."""
        font = _font()
        draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_width = max([int(draw_probe.textlength(label, font=font)) + 2 * PAD for label, _ in self.rows] + [0])
        columns = max([len(self.titles)] + [len(p) for _, p in self.rows])
        width = label_width + columns * (self.cell + PAD) + PAD
        footer_lines = ([self.footer] if self.footer else []) + (["low  -  attention  -  high"] if self.colour_bar
                                                                   else [])
        height = TITLE_HEIGHT + len(self.rows) * (self.cell + PAD) + PAD + len(footer_lines) * (TITLE_HEIGHT + PAD) \
            + (TITLE_HEIGHT if self.colour_bar else 0)
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(canvas)
        for j, title in enumerate(self.titles):
            x = label_width + PAD + j * (self.cell + PAD)
            draw.text((x, 2), _fit(draw, title, self.cell, font), fill=(0, 0, 0), font=font)
        for i, (label, pictures) in enumerate(self.rows):
            y = TITLE_HEIGHT + i * (self.cell + PAD)
            draw.text((PAD, y + self.cell // 2 - 5), label, fill=(0, 0, 0), font=font)
            for j, picture in enumerate(pictures):
                tile = Image.fromarray(picture).resize((self.cell, self.cell), Image.Resampling.NEAREST)
                canvas.paste(tile, (label_width + PAD + j * (self.cell + PAD), y))
        y = TITLE_HEIGHT + len(self.rows) * (self.cell + PAD) + PAD
        if self.colour_bar:
            bar_width = min(width - 2 * PAD, 256)
            ramp = colorize(np.tile(np.linspace(0, 1, bar_width, dtype=np.float32), (TITLE_HEIGHT - 4, 1)))
            canvas.paste(Image.fromarray(ramp), (PAD, y))
            y += TITLE_HEIGHT
        for line in footer_lines:
            draw.text((PAD, y), line, fill=(60, 60, 60), font=font)
            y += TITLE_HEIGHT + PAD
        return canvas


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: ImageFont.ImageFont) -> str:
    """The text, shortened with an ellipsis to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def check_grid(rows: int, columns: int, cell: int, *, images_flag: str) -> None:
    """Refuse, before anything is drawn, a grid whose cells or whole picture would be too large to be useful.

    Args:
        rows: rows of pictures (one per image).
        columns: pictures per row.
        cell: side of a picture in pixels (`--cell-size`).
        images_flag: the option that sets the rows, for the message.

    Raises:
        ConfigError: one sentence naming the option to lower.
    """
    check_cells(rows, cell, images_flag=images_flag)
    width = LABEL_ALLOWANCE + columns * (cell + PAD) + PAD
    height = TITLE_HEIGHT + rows * (cell + PAD) + PAD + 3 * (TITLE_HEIGHT + PAD)
    if width * height > MAX_PIXELS:
        raise ConfigError(f"{rows} rows of {columns} pictures of {cell} px make a {width} x {height} picture, over "
                          f"{MAX_PIXELS:,} pixels; lower --cell-size or {images_flag}.")


def check_cells(rows: int, cell: int, *, images_flag: str) -> None:
    """Refuse a cell side or a number of images (rows) out of bounds (`check_grid` without the columns).

    Raises:
        ConfigError: one sentence naming the option.
    """
    if not MIN_CELL <= cell <= MAX_CELL:
        raise ConfigError(f"--cell-size must be between {MIN_CELL} and {MAX_CELL} pixels, got {cell}.")
    if not 1 <= rows <= MAX_IMAGES:
        raise ConfigError(f"{images_flag} must be between 1 and {MAX_IMAGES}, got {rows}.")


def check_picture_path(path: Path) -> str:
    """The format a picture's suffix asks for.

    Raises:
        ConfigError: a suffix of another format.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"--output '{path}' must end in {', '.join(FORMATS)}: those are the formats written.")
    return FORMATS[suffix]


def save_picture(image: Image.Image, path: Path) -> Path:
    """Write a picture atomically in the format its suffix names (`check_picture_path`).

    Raises:
        ConfigError: a suffix of another format.
        RunDirError: the folder cannot be written (one sentence, by errno).
    """
    return save_png(image, path, check_picture_path(path))


def save_png(image: Image.Image, path: Path, picture_format: str = "PNG") -> Path:
    """Write a PNG (or `picture_format`) atomically (a reader never sees half a file; an existing file is replaced only
    when complete).

    Raises:
        RunDirError: the folder cannot be written (one sentence, by errno).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(tmp, format=picture_format, **({"quality": 95} if picture_format == "JPEG" else {}))
        os.replace(tmp, path)
    except OSError as exc:
        raise write_error(path, exc, "the picture") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def to_rgb_array(image: Image.Image, size: int) -> np.ndarray:
    """An image as (size, size, 3) uint8, resized like the model's input (bicubic)."""
    return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
