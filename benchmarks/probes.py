"""Labelled synthetic probe families for the learning benchmark (`benchmarks/learn.py`).

Each family has five classes and draws every image as a pure function of (family, split, index): the class comes
first, then everything that must not matter for it (colours, position, size, rotation, clutter). The families are
deliberately unlike each other and unlike `--demo`'s crops, so that a recipe tuned on them is not tuned to one kind
of data:

- `texture`:  the class is a repeated structure (stripes, checks, dots, rings, waves) over the whole image; it
              survives any large crop and is independent of colour, orientation, scale and phase.
- `shapes`:   one object (disc, triangle, square, star, cross), filled or outlined, anywhere, any size and angle,
              on a cluttered background.
- `count`:    how many parts (1-5) an image holds: a part configuration; the parts' look varies within an image
              only by size.
- `faces`:    a cartoon face with one of five attributes (glasses, moustache, open mouth, closed eyes, hat); skin,
              hair, pose and background vary.
- `hands`:    a hand in one of five handshapes (fist, index, V, three, open palm); skin, sleeve, rotation,
              mirroring and background vary.

Images are drawn at 4x and downsampled with a box filter for anti-aliasing, then get mild Gaussian noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dinopre.data.demo import colour_ramp

SUPERSAMPLE = 4
NUM_CLASSES = 5
Colour = tuple[int, int, int]
Painter = Callable[[np.random.Generator, int, int], Image.Image]  # (rng, label, canvas size) -> RGB canvas


# ============ shared drawing helpers ============


def _place(canvas: Image.Image, layer: Image.Image, rng: np.random.Generator, *, angle: float,
           scales: tuple[float, float], shift: float) -> Image.Image:
    """Paste a transparent drawing onto `canvas`, rotated by up to +-angle degrees, scaled within `scales` and moved
    by up to `shift` of the canvas side (3 draws, in that order)."""
    size = canvas.size[0]
    layer = layer.rotate(float(rng.uniform(-angle, angle)), resample=Image.Resampling.BILINEAR)
    scale = rng.uniform(*scales)
    scaled = layer.resize((int(size * scale),) * 2, Image.Resampling.BILINEAR)
    offset = rng.uniform(-shift, shift, 2) * size + (size - scaled.size[0]) / 2
    canvas.paste(scaled, (int(offset[0]), int(offset[1])), scaled)
    return canvas


def _colour(rng: np.random.Generator) -> Colour:
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _contrasting(rng: np.random.Generator, other: Colour, min_distance: float = 120.0) -> Colour:
    """A random colour at least `min_distance` away (RGB Euclidean) from `other`."""
    for _ in range(100):
        colour = _colour(rng)
        if math.dist(colour, other) >= min_distance:
            return colour
    return tuple(255 - v for v in other)  # type: ignore[return-value]


def _gradient(rng: np.random.Generator, size: int) -> Image.Image:
    """A background: a random colour ramp in a random direction (any colour, a wider spread than the demo's)."""
    return colour_ramp(rng, size, 0, 255, 110)[0]


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, count: int) -> None:
    """Thin random lines and small blobs that belong to no class."""
    for _ in range(count):
        if rng.random() < 0.5:
            x0, y0, x1, y1 = rng.uniform(0, size, 4).tolist()
            draw.line((x0, y0, x1, y1), fill=_colour(rng), width=max(1, int(size * rng.uniform(0.005, 0.015))))
        else:
            x, y = rng.uniform(0, size, 2).tolist()
            r = size * rng.uniform(0.01, 0.03)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=_colour(rng))


def _rotate(points: np.ndarray, angle: float, centre: tuple[float, float]) -> list[tuple[float, float]]:
    cos, sin = math.cos(angle), math.sin(angle)
    x, y = points[:, 0], points[:, 1]
    return list(zip((centre[0] + cos * x - sin * y).tolist(), (centre[1] + sin * x + cos * y).tolist()))


def _circle(n: int = 40) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _capsule(draw: ImageDraw.ImageDraw, start: tuple[float, float], end: tuple[float, float], width: float,
             fill: Colour) -> None:
    """A thick line with round ends (a finger, a moustache half)."""
    draw.line((*start, *end), fill=fill, width=max(1, int(width)))
    r = width / 2
    for x, y in (start, end):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


# ============ texture: a repeated structure ============


def _texture(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    # Drawn on a larger canvas, then rotated and centre-cropped, so any orientation fills the image.
    big = int(size * 1.5)
    background = _colour(rng)
    ink = _contrasting(rng, background)
    canvas = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(canvas)
    period = size * rng.uniform(0.12, 0.24)
    phase = rng.uniform(0, period, 2)
    line = max(2, int(period * rng.uniform(0.25, 0.45)))
    steps = np.arange(-period, big + period, period)
    if label == 0:  # parallel stripes
        for x in steps + phase[0]:
            draw.rectangle((x, 0, x + line, big), fill=ink)
    elif label == 1:  # checkerboard
        cell = period / 2
        for i, x in enumerate(np.arange(-cell, big + cell, cell) + phase[0] % cell):
            for j, y in enumerate(np.arange(-cell, big + cell, cell) + phase[1] % cell):
                if (i + j) % 2 == 0:
                    draw.rectangle((x, y, x + cell, y + cell), fill=ink)
    elif label == 2:  # a lattice of dots
        radius = period * rng.uniform(0.18, 0.3)
        for x in steps + phase[0]:
            for y in steps + phase[1]:
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=ink)
    elif label == 3:  # concentric rings around a random centre
        cx, cy = rng.uniform(0.2, 0.8, 2) * big
        for radius in np.arange(big * 1.2, 0, -period):
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=ink)
            inner = radius - line
            if inner > 0:
                draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=background)
    else:  # waves: sinusoidal lines
        amplitude = period * rng.uniform(0.25, 0.5)
        wavelength = period * rng.uniform(1.5, 3.0)
        xs = np.linspace(0, big, 120)
        for y0 in steps + phase[1]:
            ys = y0 + amplitude * np.sin(2 * math.pi * xs / wavelength + phase[0])
            draw.line(list(zip(xs.tolist(), ys.tolist())), fill=ink, width=max(2, line // 2))
    canvas = canvas.rotate(float(rng.uniform(0, 360)), resample=Image.Resampling.BILINEAR)
    offset = (big - size) // 2
    return canvas.crop((offset, offset, offset + size, offset + size))


# ============ shapes: one object on clutter ============


def _star(points: int, inner: float) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 2 * points, endpoint=False) - math.pi / 2
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


_SHAPES = (
    _circle(),
    np.array([[0.0, -1.0], [0.87, 0.5], [-0.87, 0.5]]),  # triangle
    np.array([[-0.75, -0.75], [0.75, -0.75], [0.75, 0.75], [-0.75, 0.75]]),  # square
    _star(5, 0.42),
    np.array([[-0.3, -1], [0.3, -1], [0.3, -0.3], [1, -0.3], [1, 0.3], [0.3, 0.3], [0.3, 1], [-0.3, 1],
              [-0.3, 0.3], [-1, 0.3], [-1, -0.3], [-0.3, -0.3]]),  # cross
)


def _shapes(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    canvas = _gradient(rng, size)
    draw = ImageDraw.Draw(canvas)
    _clutter(draw, rng, size, int(rng.integers(2, 7)))
    radius = size * rng.uniform(0.18, 0.36)
    centre = tuple(rng.uniform(radius, size - radius, 2).tolist())
    stretch = np.array([1.0, rng.uniform(0.8, 1.2)])
    outline = _rotate(_SHAPES[label] * radius * stretch, rng.uniform(0, 2 * math.pi), centre)
    ink = _contrasting(rng, tuple(int(v) for v in canvas.getpixel((int(centre[0]), int(centre[1])))))
    if rng.random() < 0.7:
        draw.polygon(outline, fill=ink)
    else:
        draw.line(outline + outline[:1], fill=ink, width=max(2, int(size * 0.03)), joint="curve")
    return canvas


# ============ count: how many parts ============


def _count(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    canvas = _gradient(rng, size)
    draw = ImageDraw.Draw(canvas)
    ink = _contrasting(rng, tuple(int(v) for v in canvas.getpixel((size // 2, size // 2))), 100.0)
    square = rng.random() < 0.5
    placed: list[tuple[float, float, float]] = []
    while len(placed) < label + 1:
        radius = size * rng.uniform(0.06, 0.11)
        x, y = rng.uniform(radius, size - radius, 2).tolist()
        if all(math.dist((x, y), (px, py)) > radius + pr + size * 0.03 for px, py, pr in placed):
            placed.append((x, y, radius))
    for x, y, radius in placed:
        box = (x - radius, y - radius, x + radius, y + radius)
        (draw.rectangle if square else draw.ellipse)(box, fill=ink)
    return canvas


# ============ faces: one attribute each ============

_SKIN: tuple[Colour, ...] = ((250, 220, 190), (235, 190, 130), (200, 140, 90), (150, 95, 60), (95, 60, 40))
_ATTRIBUTE_NAMES = ("glasses", "moustache", "open mouth", "closed eyes", "hat")


def _jitter(rng: np.random.Generator, colour: Colour, spread: float = 15.0) -> Colour:
    return tuple(int(v) for v in np.clip(np.asarray(colour) + rng.uniform(-spread, spread, 3), 0, 255))  # type: ignore


def _faces(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    canvas = _gradient(rng, size)
    # The face is drawn upright on its own layer, then rotated and pasted: pose varies, the attribute stays.
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    skin = _jitter(rng, _SKIN[int(rng.integers(len(_SKIN)))])
    hair, dark = _colour(rng), (30, 25, 25)
    c = size / 2
    w, h = size * rng.uniform(0.22, 0.28), size * rng.uniform(0.28, 0.34)
    if rng.random() < 0.8:  # hair behind the head
        draw.ellipse((c - w * 1.1, c - h * 1.1, c + w * 1.1, c + h * 0.6), fill=hair)
    draw.ellipse((c - w, c - h, c + w, c + h), fill=skin)
    eye_y, eye_dx = c - h * 0.2, w * 0.42
    eye_r = w * 0.13
    for side in (-1, 1):
        x = c + side * eye_dx
        if label == 3:  # closed eyes: arcs
            draw.arc((x - eye_r * 1.3, eye_y - eye_r, x + eye_r * 1.3, eye_y + eye_r), 20, 160, fill=dark,
                     width=max(2, int(eye_r * 0.5)))
        else:
            draw.ellipse((x - eye_r * 1.3, eye_y - eye_r, x + eye_r * 1.3, eye_y + eye_r), fill=(245, 245, 245))
            draw.ellipse((x - eye_r * 0.6, eye_y - eye_r * 0.6, x + eye_r * 0.6, eye_y + eye_r * 0.6), fill=dark)
    draw.line((c, c - h * 0.05, c - w * 0.08, c + h * 0.2), fill=dark, width=max(1, int(size * 0.01)))
    mouth_y, mouth_w = c + h * 0.5, w * rng.uniform(0.3, 0.45)
    if label == 2:  # open mouth
        draw.ellipse((c - mouth_w * 0.7, mouth_y - h * 0.12, c + mouth_w * 0.7, mouth_y + h * 0.16), fill=(90, 20, 30))
    else:
        draw.arc((c - mouth_w, mouth_y - h * 0.15, c + mouth_w, mouth_y + h * 0.05), 20, 160, fill=(150, 50, 60),
                 width=max(2, int(size * 0.015)))
    if label == 0:  # glasses
        frame = _colour(rng)
        for side in (-1, 1):
            x = c + side * eye_dx
            draw.ellipse((x - eye_r * 2.2, eye_y - eye_r * 1.9, x + eye_r * 2.2, eye_y + eye_r * 1.9),
                         outline=frame, width=max(2, int(size * 0.018)))
        draw.line((c - eye_dx + eye_r * 2.2, eye_y, c + eye_dx - eye_r * 2.2, eye_y), fill=frame,
                  width=max(2, int(size * 0.015)))
    elif label == 1:  # moustache
        for side in (-1, 1):
            _capsule(draw, (c, mouth_y - h * 0.2), (c + side * mouth_w * 1.1, mouth_y - h * 0.08), h * 0.09, hair)
    elif label == 4:  # hat
        hat = _colour(rng)
        draw.rectangle((c - w * 1.4, c - h * 0.85, c + w * 1.4, c - h * 0.7), fill=hat)
        draw.rectangle((c - w * 0.85, c - h * 1.5, c + w * 0.85, c - h * 0.75), fill=hat)
    return _place(canvas, layer, rng, angle=30, scales=(0.8, 1.15), shift=0.12)


# ============ hands: one handshape each ============

# Which of (thumb, index, middle, ring, little) are extended, per handshape.
_HANDSHAPES = (
    (False, False, False, False, False),  # fist
    (False, True, False, False, False),  # index
    (False, True, True, False, False),  # V
    (False, True, True, True, False),  # three
    (True, True, True, True, True),  # open palm
)


def _hands(rng: np.random.Generator, label: int, size: int) -> Image.Image:
    canvas = _gradient(rng, size)
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    skin = _jitter(rng, _SKIN[int(rng.integers(len(_SKIN)))])
    c = size / 2
    palm_w, palm_h = size * 0.17, size * 0.16
    palm_y = c + size * 0.1
    draw.rectangle((c - palm_w * 0.8, palm_y + palm_h * 0.5, c + palm_w * 0.8, size), fill=_colour(rng))  # sleeve
    draw.rounded_rectangle((c - palm_w, palm_y - palm_h, c + palm_w, palm_y + palm_h), radius=palm_w * 0.5,
                           fill=skin)
    finger_w = palm_w * 0.42
    spread = rng.uniform(0.05, 0.2)
    extended = _HANDSHAPES[label]
    for k, up in enumerate(extended[1:]):
        base_x = c - palm_w * 0.75 + k * palm_w * 0.5
        base = (base_x, palm_y - palm_h * 0.8)
        if up:
            length = size * rng.uniform(0.16, 0.22) * (0.85 if k == 3 else 1.0)
            angle = -math.pi / 2 + (k - 1.5) * spread
            tip = (base[0] + length * math.cos(angle), base[1] + length * math.sin(angle))
        else:  # folded: a knuckle bump over the palm
            tip = (base[0], base[1] + palm_h * 0.35)
        _capsule(draw, base, tip, finger_w, _jitter(rng, skin, 6))
    thumb_base = (c - palm_w * 0.9, palm_y + palm_h * 0.2)
    if extended[0]:
        thumb_tip = (thumb_base[0] - size * 0.15, thumb_base[1] - size * 0.1)
    else:
        thumb_tip = (c - palm_w * 0.1, palm_y - palm_h * 0.1)
    _capsule(draw, thumb_base, thumb_tip, finger_w * 1.1, _jitter(rng, skin, 6))
    if rng.random() < 0.5:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _place(canvas, layer, rng, angle=60, scales=(0.85, 1.2), shift=0.1)


FAMILIES: dict[str, Painter] = {
    "texture": _texture,
    "shapes": _shapes,
    "count": _count,
    "faces": _faces,
    "hands": _hands,
}
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "texture": ("stripes", "checks", "dots", "rings", "waves"),
    "shapes": ("disc", "triangle", "square", "star", "cross"),
    "count": ("one", "two", "three", "four", "five"),
    "faces": _ATTRIBUTE_NAMES,
    "hands": ("fist", "index", "v", "three", "open"),
}
_FAMILY_IDS = {name: i for i, name in enumerate(FAMILIES)}
_SPLIT_IDS = {"pretrain": 0, "train": 1, "test": 2}


def probe_image(family: str, split: str, index: int, size: int = 64) -> tuple[Image.Image, int]:
    """One image of a family and its class, a pure function of (family, split, index, size).

    Args:
        family: a key of `FAMILIES`.
        split: `pretrain` (unlabelled set), `train` or `test` (the k-NN folds).
        index: the image's number within the split.
        size: side in pixels.

    Returns:
        The RGB image and its class (0-4); classes cycle with the index, so every split is balanced.
    """
    rng = np.random.default_rng([_FAMILY_IDS[family], _SPLIT_IDS[split], index])
    label = index % NUM_CLASSES
    canvas = FAMILIES[family](rng, label, size * SUPERSAMPLE)
    image = canvas.resize((size, size), Image.Resampling.BOX)
    noise = rng.normal(0.0, rng.uniform(2.0, 8.0), (size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), label


def write_family(root: Path, family: str, *, pretrain: int = 2000, train: int = 1000, test: int = 500,
                 size: int = 64) -> Path:
    """Write a family as `root/family/pretrain/*.png` and `root/family/eval/{train,test}/CLASS/*.png`.

    Nothing is rewritten when the folder is complete already (the images are a pure function of their name).

    Returns:
        The family's folder.
    """
    folder = root / family
    marker = folder / f".complete-{pretrain}-{train}-{test}-{size}"
    if marker.exists():
        return folder
    names = CLASS_NAMES[family]
    for split, count in (("pretrain", pretrain), ("train", train), ("test", test)):
        for index in range(count):
            image, label = probe_image(family, split, index, size)
            target = folder / "pretrain" if split == "pretrain" else folder / "eval" / split / names[label]
            target.mkdir(parents=True, exist_ok=True)
            image.save(target / f"{index:05d}.png", compress_level=1)
    marker.touch()
    return folder
