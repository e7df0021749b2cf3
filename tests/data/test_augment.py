"""Tests of the DINO multi-crop augmentation (dinopre.data.augment)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dinopre.data.augment import (
    GRAYSCALE_WEIGHTS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColorJitterSettings,
    MultiCropAugmentation,
    ViewParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    draw_jitter,
    gaussian_blur,
    gaussian_kernel1d,
    grayscale,
    normalize,
    random_resized_crop_box,
    solarize,
)

NUM_DRAWS = 4000
NUM_LOCAL = 2


def make_aug(**overrides: object) -> MultiCropAugmentation:
    settings: dict[str, object] = {
        "global_size": 32, "local_size": 16, "num_local_crops": 3,
        "global_scale": (0.4, 1.0), "local_scale": (0.05, 0.4),
    }
    settings.update(overrides)
    return MultiCropAugmentation(**settings)  # type: ignore[arg-type]


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A colourful gradient plus noise: asymmetric, so flips and crops are visible."""
    rng = np.random.default_rng(seed)
    xs = np.linspace(0, 1, width)[None, :, None]
    ys = np.linspace(0, 1, height)[:, None, None]
    pixels = 255 * np.concatenate([xs * np.ones_like(ys), ys * np.ones_like(xs), (xs * ys)], axis=2)
    pixels = pixels + rng.normal(0, 20, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def identity_params(width: int, height: int, **changes: object) -> ViewParams:
    params = {"box": (0, 0, width, height), "flip": False, "jitter_order": None, "jitter_factors": None,
              "grayscale": False, "blur_sigma": None, "solarize": False}
    params.update(changes)
    return ViewParams(**params)  # type: ignore[arg-type]


def assert_rate(hits: int, total: int, prob: float) -> None:
    """Empirical rate within 4 standard errors of ``prob`` (exact for p = 0 or 1)."""
    if prob in (0.0, 1.0):
        assert hits == prob * total
        return
    tolerance = 4 * math.sqrt(prob * (1 - prob) / total)
    assert abs(hits / total - prob) <= tolerance, f"rate {hits / total:.4f} vs p={prob} (tol {tolerance:.4f})"


@pytest.fixture(scope="module")
def draws() -> list[list[ViewParams]]:
    aug = make_aug(num_local_crops=NUM_LOCAL)
    rng = np.random.default_rng(1234)
    return [aug.draw(rng, 64, 48) for _ in range(NUM_DRAWS)]


# ----------------------------------------------------------------------------------- shapes, order, determinism


@pytest.mark.parametrize("width,height", [(64, 64), (20, 20), (97, 41), (30, 200)])
def test_output_count_shapes_and_dtype(width: int, height: int) -> None:
    globals_, locals_ = make_aug()(make_image(width, height), np.random.default_rng(0))
    assert [tuple(v.shape) for v in globals_] == [(3, 32, 32)] * 2
    assert [tuple(v.shape) for v in locals_] == [(3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in globals_ + locals_)


def test_no_local_crops_gives_empty_local_list() -> None:
    globals_, locals_ = make_aug(num_local_crops=0)(make_image(40, 40), np.random.default_rng(0))
    assert len(globals_) == 2 and locals_ == []


def test_call_renders_draws_in_output_order() -> None:
    aug, image = make_aug(), make_image(50, 40)
    params = aug.draw(np.random.default_rng(7), 50, 40)
    globals_, locals_ = aug(image, np.random.default_rng(7))
    expected = [aug.apply(image, p, s) for p, s in zip(params, [32, 32, 16, 16, 16], strict=True)]
    assert all(torch.equal(a, b) for a, b in zip(globals_ + locals_, expected, strict=True))


def test_globals_use_global_scale_and_locals_local_scale() -> None:
    aug = make_aug(global_scale=(0.6, 1.0), local_scale=(0.05, 0.2))
    for views in (aug.draw(np.random.default_rng(seed), 200, 200) for seed in range(50)):
        areas = [(b[2] - b[0]) * (b[3] - b[1]) / 200**2 for b in (v.box for v in views)]
        assert min(areas[:2]) > 0.55 and max(areas[2:]) < 0.25


def test_same_seed_same_views_different_seed_different_views() -> None:
    aug, image = make_aug(), make_image(60, 50)
    first = sum(aug(image, np.random.default_rng(3)), [])
    torch.manual_seed(99)  # global RNGs must not matter
    np.random.seed(99)
    second = sum(aug(image, np.random.default_rng(3)), [])
    other = sum(aug(image, np.random.default_rng(4)), [])
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))


# ----------------------------------------------------------------------------------- draw statistics


def test_flip_jitter_grayscale_rates(draws: list[list[ViewParams]]) -> None:
    views = [v for image in draws for v in image]
    assert_rate(sum(v.flip for v in views), len(views), 0.5)
    assert_rate(sum(v.jitter_order is not None for v in views), len(views), 0.8)
    assert_rate(sum(v.grayscale for v in views), len(views), 0.2)
    assert all((v.jitter_order is None) == (v.jitter_factors is None) for v in views)


def test_blur_and_solarize_rates_per_view(draws: list[list[ViewParams]]) -> None:
    global1, global2 = [d[0] for d in draws], [d[1] for d in draws]
    local = [v for d in draws for v in d[2:]]
    assert_rate(sum(v.blur_sigma is not None for v in global1), NUM_DRAWS, 1.0)
    assert_rate(sum(v.blur_sigma is not None for v in global2), NUM_DRAWS, 0.1)
    assert_rate(sum(v.blur_sigma is not None for v in local), NUM_DRAWS * NUM_LOCAL, 0.5)
    assert_rate(sum(v.solarize for v in global2), NUM_DRAWS, 0.2)
    assert not any(v.solarize for v in global1 + local)
    sigmas = [v.blur_sigma for v in global1]
    assert 0.1 <= min(sigmas) < 0.15 and 1.95 < max(sigmas) <= 2.0


def test_probability_settings_are_respected() -> None:
    aug = make_aug(flip_prob=0.0, jitter=ColorJitterSettings(prob=1.0), grayscale_prob=1.0,
                   global_blur_probs=(0.0, 1.0), global_solarize_probs=(1.0, 0.0), local_blur_prob=0.0)
    views = aug.draw(np.random.default_rng(0), 30, 30)
    assert not any(v.flip for v in views) and all(v.grayscale and v.jitter_order for v in views)
    assert [v.blur_sigma is not None for v in views] == [False, True, False, False, False]
    assert [v.solarize for v in views] == [True, False, False, False, False]


def test_crop_boxes_respect_scale_and_aspect_ratio() -> None:
    rng, width, height = np.random.default_rng(5), 100, 80
    for _ in range(2000):
        left, top, right, bottom = random_resized_crop_box(rng, width, height, (0.3, 0.6))
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        w, h = right - left, bottom - top
        # w and h are rounded to whole pixels, so allow half a pixel on each side.
        assert 0.3 * width * height <= (w + 0.5) * (h + 0.5) and (w - 0.5) * (h - 0.5) <= 0.6 * width * height
        assert 3 / 4 <= (w + 0.5) / (h - 0.5) and (w - 0.5) / (h + 0.5) <= 4 / 3


@pytest.mark.parametrize("width,height,expected", [
    (200, 50, (66, 0, 133, 50)),   # too wide: height kept, width clamped to 4/3, centred
    (50, 200, (0, 66, 50, 133)),   # too tall: width kept, height clamped to 3/4, centred
    (60, 60, (0, 0, 60, 60)),      # whole image
])
def test_crop_falls_back_to_centre_crop(width: int, height: int, expected: tuple[int, int, int, int]) -> None:
    rng = np.random.default_rng(0)
    assert all(random_resized_crop_box(rng, width, height, (1.0, 1.0)) == expected for _ in range(20))


def test_jitter_factor_ranges_and_orders() -> None:
    rng, settings = np.random.default_rng(11), ColorJitterSettings(prob=1.0)
    orders, factors = zip(*(draw_jitter(rng, settings) for _ in range(2000)), strict=True)
    assert len(set(orders)) == 24 and all(sorted(o) == [0, 1, 2, 3] for o in orders)
    table = np.array(factors)
    for column, (low, high) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
        spread = 0.02 * (high - low)
        assert low <= table[:, column].min() < low + spread and high - spread < table[:, column].max() <= high
    strong = np.array([draw_jitter(rng, ColorJitterSettings(brightness=1.5, prob=1.0))[1] for _ in range(200)])
    assert strong[:, 0].min() >= 0.0  # lower bound clamps at max(0, 1 - x)


# ----------------------------------------------------------------------------------- pixel ops


def test_solarize_inverts_only_values_at_or_above_half() -> None:
    x = torch.tensor([0.0, 0.25, 0.49, 0.5, 0.75, 1.0])
    assert torch.allclose(solarize(x), torch.tensor([0.0, 0.25, 0.49, 0.5, 0.25, 0.0]))


def test_grayscale_makes_channels_equal_luma() -> None:
    x = torch.rand(3, 5, 6)
    gray = grayscale(x)
    expected = sum(w * c for w, c in zip(GRAYSCALE_WEIGHTS, x, strict=True))
    assert gray.shape == x.shape and all(torch.allclose(c, expected, atol=1e-6) for c in gray)


def test_brightness_scales_and_clamps() -> None:
    x = torch.tensor([0.1, 0.4, 0.8]).view(3, 1, 1)
    assert torch.allclose(adjust_brightness(x, 0.5), x * 0.5)
    assert torch.allclose(adjust_brightness(x, 2.0), torch.tensor([0.2, 0.8, 1.0]).view(3, 1, 1))


def test_contrast_and_saturation_blend_towards_gray() -> None:
    x = torch.rand(3, 4, 4)
    gray_mean = grayscale(x).mean()
    assert torch.allclose(adjust_contrast(x, 0.0), gray_mean.expand_as(x), atol=1e-6)
    assert torch.allclose(adjust_saturation(x, 0.0), grayscale(x), atol=1e-6)
    assert torch.allclose(adjust_contrast(x, 1.0), x) and torch.allclose(adjust_saturation(x, 1.0), x)


def test_hue_shift_rotates_colours_and_whole_turns_are_identity() -> None:
    x = torch.rand(3, 6, 7)
    for shift in (0.0, 1.0, -2.0):
        assert torch.allclose(adjust_hue(x, shift), x, atol=1e-5)
    primaries = torch.eye(3).view(3, 3, 1)  # red, green, blue pixels along H
    assert torch.allclose(adjust_hue(primaries, 1 / 3), primaries.roll(1, dims=0), atol=1e-5)
    gray = torch.full((3, 2, 2), 0.4)
    assert torch.allclose(adjust_hue(gray, 0.37), gray)


def test_blur_keeps_constants_and_smooths_noise() -> None:
    constant = torch.full((3, 20, 20), 0.3)
    assert torch.allclose(gaussian_blur(constant, 2.0), constant, atol=1e-6)
    noise = torch.rand(3, 40, 40)
    blurred = gaussian_blur(noise, 1.5)
    assert blurred.var() < 0.3 * noise.var() and abs(blurred.mean() - noise.mean()) < 0.01
    for tiny in (torch.rand(3, 2, 2), torch.rand(3, 1, 1), torch.rand(3, 3, 17)):
        assert gaussian_blur(tiny, 2.0).shape == tiny.shape


def test_blur_is_a_true_gaussian() -> None:
    kernel = gaussian_kernel1d(1.5, 5)
    assert math.isclose(float(kernel.sum()), 1.0, rel_tol=1e-6) and torch.allclose(kernel, kernel.flip(0))
    impulse = torch.zeros(1, 41, 41)
    impulse[0, 20, 20] = 1.0
    response = gaussian_blur(impulse, 1.5)[0]
    offsets = torch.arange(-20, 21, dtype=torch.float32)
    variance = float((response.sum(0) * offsets**2).sum())
    assert abs(variance - 1.5**2) < 0.05  # second moment of the impulse response is sigma^2


def test_flip_mirrors_the_view() -> None:
    aug, image = make_aug(), make_image(30, 20)
    plain = aug.apply(image, identity_params(30, 20), 24)
    flipped = aug.apply(image, identity_params(30, 20, flip=True), 24)
    assert torch.allclose(flipped, plain.flip(-1)) and not torch.allclose(flipped, plain)


def test_identity_view_is_the_normalised_image() -> None:
    aug, image = make_aug(), make_image(24, 24)
    view = aug.apply(image, identity_params(24, 24), 24)
    raw = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    assert torch.allclose(view, normalize(raw, IMAGENET_MEAN, IMAGENET_STD), atol=1e-5)


def test_imagenet_mean_image_normalises_to_zero() -> None:
    colour = tuple(round(255 * m) for m in IMAGENET_MEAN)
    image = Image.new("RGB", (20, 20), colour)
    view = make_aug().apply(image, identity_params(20, 20), 16)
    # uint8 quantisation leaves at most half a grey level of error, divided by std.
    assert view.abs().max() < 0.5 / 255 / min(IMAGENET_STD) + 1e-6


def test_pixel_ops_follow_params() -> None:
    aug, image = make_aug(), make_image(20, 20)
    gray_view = aug.apply(image, identity_params(20, 20, grayscale=True), 20)
    unnormalised = gray_view * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(unnormalised[0], unnormalised[1], atol=1e-5)
    solar = aug.apply(image, identity_params(20, 20, solarize=True), 20)
    restored = solar * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert restored.max() <= 0.5 + 1e-5


def test_invalid_settings_raise() -> None:
    with pytest.raises(ValueError, match="flip_prob"):
        make_aug(flip_prob=1.5)
    with pytest.raises(ValueError, match="local_scale"):
        make_aug(local_scale=(0.5, 0.1))
    with pytest.raises(ValueError, match="num_local_crops"):
        make_aug(num_local_crops=-1)
