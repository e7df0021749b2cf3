"""Deterministic synthetic face-like and hand-like crops for demos, tests and benchmarks.

No image files ship with the package: ``dinopre train face --demo`` / ``hands --demo`` generate them at run time.
Each image is a pure function of ``(kind, index, size)``: parameters come from ``np.random.default_rng([kind_id,
index])``, shapes are drawn with ``PIL.ImageDraw`` on a supersampled canvas, downsampled with LANCZOS for
anti-aliasing, and finished with light Gaussian noise. The images vary in pose, colour and expression / finger
configuration, so there is real structure for self-supervision to learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEMO_KINDS: tuple[str, ...] = ("face", "hands")

# Fixed seed prefix per kind, so faces and hands with the same index come from unrelated streams.
_KIND_IDS: dict[str, int] = {"face": 1, "hands": 2}
_IMAGE_FORMATS: dict[str, tuple[str, dict[str, int]]] = {
    "jpg": ("JPEG", {"quality": 92}),
    # Fast zlib level: benchmark folders are written often and their size does not matter.
    "png": ("PNG", {"compress_level": 1}),
}

Colour = tuple[int, int, int]
_SKIN_TONES: tuple[Colour, ...] = (
    (255, 224, 196), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 58, 40),
)
_HAIR_COLOURS: tuple[Colour, ...] = ((28, 20, 16), (70, 45, 25), (125, 85, 45), (205, 175, 110), (150, 65, 30),
                                     (165, 165, 160))
_EYE_COLOURS: tuple[Colour, ...] = ((75, 50, 28), (45, 95, 150), (60, 115, 65), (115, 85, 45), (35, 28, 22))
_LIP_COLOUR: Colour = (165, 70, 75)
_MOUTH_INSIDE: Colour = (60, 20, 25)
_SEGMENTS = 36  # polygon vertices per ellipse: smooth after the supersampled downsample


def _pick(rng: np.random.Generator, palette: tuple[Colour, ...], spread: float = 12.0) -> Colour:
    base = np.asarray(palette[int(rng.integers(len(palette)))], dtype=np.float64)
    return _clip_colour(base + rng.uniform(-spread, spread, 3))


def _clip_colour(values: np.ndarray) -> Colour:
    r, g, b = np.clip(np.rint(values), 0, 255).astype(int).tolist()
    return r, g, b


def _shade(colour: Colour, factor: float) -> Colour:
    return _clip_colour(np.asarray(colour, dtype=np.float64) * factor)


_CIRCLE = np.stack([np.cos(np.linspace(0, 2 * math.pi, _SEGMENTS, endpoint=False)),
                    np.sin(np.linspace(0, 2 * math.pi, _SEGMENTS, endpoint=False))], axis=1)


@dataclass(frozen=True)
class _Frame:
    """Local coordinates of a rotated, mirrored, anisotropically scaled object (face or palm) on the canvas."""

    cx: float
    cy: float
    ax: float  # pixels per local unit along u
    ay: float  # pixels per local unit along v
    angle: float
    mirror: float = 1.0

    def points(self, uv: np.ndarray) -> list[float]:
        """Maps local ``(N, 2)`` points to a flat ``[x0, y0, x1, y1, ...]`` list as ImageDraw accepts it."""
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        x = uv[:, 0] * self.ax * self.mirror
        y = uv[:, 1] * self.ay
        return np.stack([self.cx + cos * x - sin * y, self.cy + sin * x + cos * y], axis=1).ravel().tolist()

    def ellipse(self, u: float, v: float, ru: float, rv: float) -> list[float]:
        return self.points(_CIRCLE * (ru, rv) + (u, v))

    def width(self, w: float) -> int:
        return max(1, round(w * self.ax))


def colour_ramp(rng: np.random.Generator, canvas: int, low: float, high: float,
                spread: float) -> tuple[Image.Image, np.ndarray]:
    """A square RGB background: a linear colour gradient in a random direction.

    Args:
        rng: the generator to draw from (3 + 3 + 1 draws, in that order).
        canvas: the side in pixels.
        low, high: the range of the start colour's channels.
        spread: how far (per channel) the end colour may lie from the start colour.

    Returns:
        The image and its start colour (float RGB).
    """
    start = rng.uniform(low, high, 3)
    end = np.clip(start + rng.uniform(-spread, spread, 3), 0, 255)
    phi = rng.uniform(0, 2 * math.pi)
    lin = np.linspace(0.0, 1.0, canvas, dtype=np.float32)
    ramp = lin[None, :] * math.cos(phi) + lin[:, None] * math.sin(phi)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    pixels = start.astype(np.float32) + ramp[..., None] * (end - start).astype(np.float32)
    return Image.fromarray(pixels.astype(np.uint8), "RGB"), start


def _background(rng: np.random.Generator, canvas: int) -> Image.Image:
    # Random colour plus a linear gradient in a random direction, then a few soft distractor blobs.
    image, start = colour_ramp(rng, canvas, 20, 235, 90)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 3))):
        x, y, r = rng.uniform(0, canvas, 2).tolist() + [float(rng.uniform(0.05, 0.2) * canvas)]
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_clip_colour(start + rng.uniform(-50, 50, 3)))
    return image


def _mouth(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    # Lip outline as a polygon: a parabola (positive smile bends down in image coordinates) plus openness.
    centre_v, half_w = rng.uniform(0.46, 0.54), rng.uniform(0.2, 0.32)
    smile = rng.uniform(-0.1, 0.16)
    openness = rng.uniform(0.04, 0.22) if rng.random() < 0.5 else 0.0
    u = np.linspace(-half_w, half_w, 11)
    bend = 1.0 - (u / half_w) ** 2
    middle = centre_v + smile * bend
    upper = np.stack([u, middle - (0.035 + 0.2 * openness) * bend], axis=1)
    lower = np.stack([u, middle + (0.045 + openness) * bend], axis=1)
    lips = np.concatenate([upper, lower[::-1]])
    if openness == 0.0:
        return lips, None
    inner = np.concatenate([np.stack([u, middle - 0.1 * openness * bend], 1),
                            np.stack([u, middle + 0.8 * openness * bend], 1)[::-1]])
    return lips, inner


def _draw_head_back(draw: ImageDraw.ImageDraw, frame: _Frame, rng: np.random.Generator, skin: Colour,
                    hair: Colour) -> bool:
    # Shoulders/clothes, neck, hair mass and ears: everything that sits behind the face ellipse.
    draw.polygon(frame.ellipse(0.0, 2.2, 2.0, 0.95), fill=_clip_colour(rng.uniform(20, 235, 3)))
    draw.polygon(frame.points(np.array([[-0.42, 0.6], [0.42, 0.6], [0.5, 1.6], [-0.5, 1.6]])), fill=_shade(skin, 0.85))
    bald = rng.random() < 0.1
    if not bald:
        draw.polygon(frame.ellipse(0.0, -0.18, 1.13, 1.0), fill=hair)
        if rng.random() < 0.4:  # long hair falling to the shoulders
            draw.polygon(frame.points(np.array([[-1.13, -0.2], [1.13, -0.2], [1.25, 1.1], [-1.25, 1.1]])), fill=hair)
    for side in (-1.0, 1.0):
        draw.polygon(frame.ellipse(side * 0.98, 0.05, 0.14, 0.22), fill=_shade(skin, 0.9))
    return bald


def _draw_eyes(draw: ImageDraw.ImageDraw, frame: _Frame, rng: np.random.Generator, yaw: float, hair: Colour) -> None:
    eye_v = rng.uniform(-0.17, -0.07)
    openness = 0.12 if rng.random() < 0.1 else rng.uniform(0.55, 1.1)  # occasional blink
    gaze = rng.uniform(-0.06, 0.06), rng.uniform(-0.025, 0.025)
    iris = _pick(rng, _EYE_COLOURS, 10)
    brow_raise, brow_tilt = rng.uniform(-0.04, 0.06), rng.uniform(-0.06, 0.06)
    glasses = rng.random() < 0.15
    for side in (-1.0, 1.0):
        # Head turn: features slide towards the yaw side and the far eye narrows.
        eye_u, eye_w = side * 0.36 + 0.14 * yaw, 0.17 * (1.0 - 0.3 * max(0.0, side * yaw))
        height = 0.09 * openness
        draw.polygon(frame.ellipse(eye_u, eye_v, eye_w, height), fill=(245, 245, 240))
        if openness > 0.3:
            radius = min(0.075, height)
            draw.polygon(frame.ellipse(eye_u + gaze[0], eye_v + gaze[1], radius, radius), fill=iris)
            draw.polygon(frame.ellipse(eye_u + gaze[0], eye_v + gaze[1], 0.035, 0.035), fill=(15, 12, 12))
        brow_v = eye_v - 0.17 - brow_raise
        brow = np.array([[eye_u - side * 0.15, brow_v], [eye_u + side * 0.16, brow_v - side * brow_tilt - 0.02]])
        draw.line(frame.points(brow), fill=hair, width=frame.width(0.05))
        if glasses:
            draw.line(frame.ellipse(eye_u, eye_v, 0.24, 0.17) + frame.points(np.array([[eye_u + 0.24, eye_v]])),
                      fill=(25, 25, 25), width=frame.width(0.025))


def _draw_face(image: Image.Image, rng: np.random.Generator) -> None:
    canvas = image.width
    skin, hair = _pick(rng, _SKIN_TONES), _pick(rng, _HAIR_COLOURS, 8)
    half_w = rng.uniform(0.24, 0.31) * canvas
    frame = _Frame(cx=(0.5 + rng.uniform(-0.08, 0.08)) * canvas, cy=(0.5 + rng.uniform(-0.06, 0.06)) * canvas,
                   ax=half_w, ay=half_w * rng.uniform(1.15, 1.35), angle=rng.uniform(-0.3, 0.3))
    yaw = rng.uniform(-1.0, 1.0)
    draw = ImageDraw.Draw(image)
    bald = _draw_head_back(draw, frame, rng, skin, hair)
    draw.polygon(frame.ellipse(0.0, 0.0, 1.0, 1.0), fill=skin)
    if not bald and rng.random() < 0.6:  # fringe over the forehead
        draw.polygon(frame.ellipse(0.1 * yaw, -0.82, 0.92, 0.32), fill=hair)
    _draw_eyes(draw, frame, rng, yaw, hair)
    nose_u = 0.18 * yaw
    draw.polygon(frame.points(np.array([[nose_u, -0.02], [nose_u - 0.1, 0.26], [nose_u + 0.1, 0.26]])),
                 fill=_shade(skin, 0.82))
    lips, inner = _mouth(rng)
    lips[:, 0] += 0.14 * yaw
    draw.polygon(frame.points(lips), fill=_pick(rng, (_LIP_COLOUR,), 20))
    if inner is not None:
        inner[:, 0] += 0.14 * yaw
        draw.polygon(frame.points(inner), fill=_MOUTH_INSIDE)


def _draw_digit(draw: ImageDraw.ImageDraw, frame: _Frame, base: np.ndarray, direction: float, length: float,
                width: float, skin: Colour) -> None:
    # A finger is a thick line with round caps (ImageDraw lines have square ends) plus a lighter nail near the tip.
    tip = base + length * np.array([math.sin(direction), -math.cos(direction)])
    px = frame.points(np.stack([base, tip]))
    radius = frame.width(width) / 2.0
    draw.line(px, fill=skin, width=frame.width(width))
    for x, y in (px[0:2], px[2:4]):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=skin)
    if length > 0.5:
        nail = base + (length - 0.12) * np.array([math.sin(direction), -math.cos(direction)])
        draw.polygon(frame.ellipse(nail[0], nail[1], width * 0.28, 0.1), fill=_shade(skin, 1.12))


def _draw_hand(image: Image.Image, rng: np.random.Generator) -> None:
    canvas = image.width
    skin = _pick(rng, _SKIN_TONES)
    half_w = rng.uniform(0.14, 0.19) * canvas
    frame = _Frame(cx=(0.5 + rng.uniform(-0.06, 0.06)) * canvas, cy=(0.58 + rng.uniform(-0.06, 0.06)) * canvas,
                   ax=half_w, ay=half_w * rng.uniform(1.0, 1.2), angle=rng.uniform(-0.7, 0.7),
                   mirror=1.0 if rng.random() < 0.5 else -1.0)
    draw = ImageDraw.Draw(image)
    sleeve = _pick(rng, _HAIR_COLOURS, 70)
    draw.line(frame.points(np.array([[0.0, 0.6], [0.0, 1.5]])), fill=_shade(skin, 0.92), width=frame.width(1.5))
    draw.line(frame.points(np.array([[0.0, 1.5], [0.0, 3.5]])), fill=sleeve, width=frame.width(1.9))
    # Palm as a superellipse (|u|^3 + |v|^3 = 1): boxier than an ellipse, like a real palm.
    palm = np.sign(_CIRCLE) * np.abs(_CIRCLE) ** (2.0 / 3.0)
    draw.polygon(frame.points(palm * (1.0, 0.95)), fill=skin)
    extended = set(rng.permutation(5)[: int(rng.integers(0, 6))].tolist())
    spread, length = rng.uniform(0.04, 0.22), rng.uniform(0.95, 1.3)
    for finger, (base_u, rel) in enumerate(zip((-0.66, -0.22, 0.22, 0.66), (0.8, 1.0, 0.95, 0.72), strict=True)):
        direction = (finger - 1.5) * spread + rng.uniform(-0.08, 0.08)
        full = rel * length if finger in extended else 0.28
        _draw_digit(draw, frame, np.array([base_u, -0.78]), direction, full, 0.38, skin)
    # Thumb (digit 4) leaves the side of the palm; folded, it lies across the palm.
    thumb_dir = -rng.uniform(0.5, 1.2) if 4 in extended else rng.uniform(0.9, 1.3)
    thumb_len = rng.uniform(0.65, 0.85) if 4 in extended else 0.7
    _draw_digit(draw, frame, np.array([-0.82, 0.15]), thumb_dir, thumb_len, 0.42, _shade(skin, 0.97))
    crease = np.array([[-0.6, -0.25], [0.0, -0.1], [0.65, -0.35]])
    draw.line(frame.points(crease), fill=_shade(skin, 0.8), width=frame.width(0.05), joint="curve")


def _check_kind(kind: str) -> int:
    if kind not in _KIND_IDS:
        raise ValueError(f"unknown demo kind {kind!r}; valid kinds: {', '.join(DEMO_KINDS)}")
    return _KIND_IDS[kind]


def synthetic_image(kind: str, index: int, size: int = 64) -> Image.Image:
    """Renders one synthetic face-like or hand-like crop.

    Args:
        kind: One of :data:`DEMO_KINDS` (``"face"`` or ``"hands"``).
        index: Non-negative image index; the image is a pure function of ``(kind, index, size)``.
        size: Output side length in pixels (>= 8).

    Returns:
        A ``size x size`` RGB image.

    Raises:
        ValueError: For an unknown kind, a negative index or a size below 8.
    """
    kind_id = _check_kind(kind)
    if index < 0 or size < 8:
        raise ValueError(f"index must be >= 0 and size >= 8, got index={index}, size={size}")
    rng = np.random.default_rng([kind_id, index])
    supersample = 4 if size < 64 else 2  # small outputs need more subsamples for smooth edges
    image = _background(rng, size * supersample)
    (_draw_face if kind == "face" else _draw_hand)(image, rng)
    pixels = np.asarray(image.resize((size, size), Image.Resampling.LANCZOS), dtype=np.float32)
    noise = rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(rng.uniform(1.0, 4.0))
    return Image.fromarray(np.clip(pixels + noise + 0.5, 0, 255).astype(np.uint8), "RGB")


def write_synthetic_folder(
    root: Path, kind: str, count: int, size: int = 64, *, image_format: str = "jpg", start: int = 0
) -> list[Path]:
    """Writes ``count`` synthetic images named ``{kind}_{index:06d}.{image_format}`` into ``root``.

    Indices run from ``start`` to ``start + count - 1``; zero padding keeps the sorted file order equal to the
    index order (the padding widens beyond 6 digits only for indices >= 1,000,000).

    Args:
        root: Output folder, created with its parents if needed.
        kind: One of :data:`DEMO_KINDS`.
        count: Number of images to write (>= 0).
        size: Side length in pixels.
        image_format: ``"jpg"`` or ``"png"``.
        start: Index of the first image.

    Returns:
        The written paths, in index order.

    Raises:
        ValueError: For an unknown kind or format, or a negative count or start.
    """
    _check_kind(kind)
    if image_format not in _IMAGE_FORMATS:
        raise ValueError(f"unknown image_format {image_format!r}; valid formats: {', '.join(_IMAGE_FORMATS)}")
    if count < 0 or start < 0:
        raise ValueError(f"count and start must be >= 0, got count={count}, start={start}")
    pil_format, options = _IMAGE_FORMATS[image_format]
    digits = max(6, len(str(start + count - 1)))
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        path = root / f"{kind}_{index:0{digits}d}.{image_format}"
        synthetic_image(kind, index, size).save(path, pil_format, **options)
        paths.append(path)
    return paths
