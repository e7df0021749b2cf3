"""Tests of the on-device batch augmentation (data.batch_augment) against the per-image path (data.augment).

Both paths make the same draws from the same generator and resample with Pillow's arithmetic, so the tests compare
them view by view: pixel ops exactly (same input crops), whole views within a level of 255 or two, and the
statistics of many views. Everything runs on the CPU;
the same tensor code runs on CUDA (the GPU test at the end checks that when a GPU is present).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinopre.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ColorJitterSettings,
    MultiCropAugmentation,
    ViewParams,
    apply_pixel_ops,
    gaussian_blur,
)
from dinopre.data.batch_augment import (
    JITTER,
    NUM_COLUMNS,
    OPS_PER_GROUP,
    ORDER,
    SIGMA,
    BatchAugmentation,
    batch_gaussian_blur,
    batch_pixel_ops,
    encode_views,
    pad_sources,
    plan_rows,
    source_cap,
    to_source,
)
from dinopre.data.dataset import MultiCropDataset, RawBatch, SyntheticSource, collate_crops, sample_rng
from dinopre.data.demo import synthetic_image
from dinopre.data.masking import MaskSampler

STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def make_aug(**overrides: object) -> MultiCropAugmentation:
    settings: dict[str, object] = {"global_size": 64, "local_size": 32, "num_local_crops": 3,
                                   "global_scale": (0.4, 1.0), "local_scale": (0.05, 0.4)}
    settings.update(overrides)
    return MultiCropAugmentation(**settings)  # type: ignore[arg-type]


NO_PIXEL_OPS: dict[str, object] = {"jitter": ColorJitterSettings(prob=0.0), "grayscale_prob": 0.0,
                                   "global_blur_probs": (0.0, 0.0), "global_solarize_probs": (0.0, 0.0),
                                   "local_blur_prob": 0.0}


def both_paths(aug: MultiCropAugmentation, images: list[Image.Image], seed: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-image globals, per-image locals, batch globals, batch locals) of the same draws, crop-major, in [0, 1]."""
    per_image, raw, tables = [], [], []
    for index, image in enumerate(images):
        per_image.append(aug(image, sample_rng(seed, 0, index)))
        raw.append(to_source(image, source_cap(aug.global_size)))
        draws = aug.draw(sample_rng(seed, 0, index), *image.size)
        sent = (raw[-1].shape[2], raw[-1].shape[1])
        tables.append(torch.from_numpy(encode_views(draws, image.size, sent)))
    global_batch, local_batch = BatchAugmentation(aug)(pad_sources(raw), torch.stack(tables))
    global_ref = torch.stack([views[0][v] for v in range(2) for views in per_image])
    local_ref = torch.stack([views[1][v] for v in range(aug.num_local_crops) for views in per_image])
    unnormalise = lambda t: t * STD + MEAN  # noqa: E731
    return unnormalise(global_ref), unnormalise(local_ref), unnormalise(global_batch), unnormalise(local_batch)


def faces(count: int, size: int = 80) -> list[Image.Image]:
    """Synthetic face crops, every third one stretched to a different, non-square size (batches pad them)."""
    images = [synthetic_image("face", i, size) for i in range(count)]
    return [im.resize((size + 7 * (i % 5), size - 3 * (i % 4))) if i % 3 == 2 else im for i, im in enumerate(images)]


# ----------------------------------------------------------------------------------- encoding the draws


def test_sources_keep_their_size_up_to_the_cap() -> None:
    assert source_cap(224) == 896
    small = to_source(Image.new("L", (90, 40), 77), cap=128)  # any mode: converted to RGB, size kept
    assert small.shape == (3, 40, 90) and small.dtype == torch.uint8 and int(small.float().mean()) == 77
    assert to_source(Image.new("RGB", (400, 300)), cap=128).shape == (3, 128, 171)  # short side brought to the cap
    # a panorama keeps its short side (crop boxes are sized by it), unless its area is huge
    assert to_source(Image.new("RGB", (1000, 60)), cap=128).shape == (3, 60, 1000)
    assert to_source(Image.new("RGB", (4000, 100)), cap=128).shape == (3, 40, 1619)


def test_panoramas_give_the_per_image_views() -> None:
    """A long image (boxes limited by its short side) is not shrunk, so its views are still the per-image ones."""
    wide = Image.fromarray(np.asarray(synthetic_image("face", 3, 60).resize((600, 60))))
    g_ref, l_ref, g_out, l_out = both_paths(make_aug(global_size=32, local_size=16, **NO_PIXEL_OPS), [wide] * 2)
    for ref, out in ((g_ref, g_out), (l_ref, l_out)):
        assert (ref - out).abs().max() <= 2.01 / 255


def test_sources_of_different_sizes_are_padded_into_one_batch() -> None:
    batch = pad_sources([torch.full((3, 4, 6), 9, dtype=torch.uint8), torch.full((3, 5, 2), 7, dtype=torch.uint8)])
    assert batch.shape == (2, 3, 5, 6)
    assert batch[0, :, :4, :6].eq(9).all() and batch[0, :, 4:].eq(0).all()
    assert batch[1, :, :5, :2].eq(7).all() and batch[1, :, :, 2:].eq(0).all()


def test_encoded_draws_keep_every_decision() -> None:
    views = [
        ViewParams((10, 20, 60, 100), True, (2, 0, 3, 1), (1.2, 0.7, 0.9, -0.05), True, 1.5, True),
        ViewParams((0, 0, 100, 200), False, None, None, False, None, False),
    ]
    table = encode_views(views, (100, 200), (100, 200))
    assert table.shape == (2, NUM_COLUMNS) and table.dtype == np.float32
    np.testing.assert_allclose(
        table[0], [10, 20, 60, 100, 100, 200, 1, 1, 2, 0, 3, 1, 1.2, 0.7, 0.9, -0.05, 1, 1.5, 1], rtol=1e-6)
    # no jitter: identity order and neutral factors, so applying them would change nothing either
    np.testing.assert_allclose(table[1], [0, 0, 100, 200, 100, 200, 0, 0, 0, 1, 2, 3, 1, 1, 1, 0, 0, 0, 0])
    # a source sent shrunk: the boxes cover the same region of the smaller image
    np.testing.assert_allclose(encode_views(views[:1], (100, 200), (50, 100))[0, :6], [5, 10, 30, 50, 50, 100])


# ----------------------------------------------------------------------------------- pixel ops, exactly


def test_batch_pixel_ops_equal_the_per_view_ops_for_every_draw() -> None:
    """Jitter in each view's own order, grayscale, blur with each view's sigma, solarization: same as per view."""
    aug = make_aug(jitter=ColorJitterSettings(prob=0.9), grayscale_prob=0.3, global_solarize_probs=(0.5, 0.5),
                   global_blur_probs=(0.6, 0.6))
    generator = torch.Generator().manual_seed(0)
    crops = torch.rand(48, 3, 20, 20, generator=generator)
    draws = [view for i in range(24) for view in aug.draw(np.random.default_rng(i), 50, 50)[:2]]
    table = torch.from_numpy(encode_views(draws, (50, 50), (50, 50)))
    assert len({d.jitter_order for d in draws if d.jitter_order}) > 10 and any(d.blur_sigma is None for d in draws)
    batched = batch_pixel_ops(crops.clone(), table, max_sigma=aug.blur_sigma[1])  # works in place
    for row, params in enumerate(draws):
        expected = apply_pixel_ops(crops[row].clone(), params)
        torch.testing.assert_close(batched[row], expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("side", [4, 9, 30])
def test_batch_blur_equals_the_per_view_blur_including_tiny_views(side: int) -> None:
    """Per-view radius ceil(3 sigma), clamped to side - 1 on tiny views; sigma 0 leaves a view untouched."""
    img = torch.rand(5, 3, side, side, generator=torch.Generator().manual_seed(side))
    sigma = torch.tensor([0.1, 0.0, 0.7, 1.3, 2.0])
    out = batch_gaussian_blur(img, sigma, max_sigma=2.0)
    assert torch.equal(out[1], img[1])
    for row in (0, 2, 3, 4):
        torch.testing.assert_close(out[row], gaussian_blur(img[row], float(sigma[row])), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------- crops


def test_views_without_pixel_ops_are_the_per_image_crops() -> None:
    """Same draws, only crop + resize + flip: the views are Pillow's, within one level of 255 per pixel."""
    g_ref, l_ref, g_out, l_out = both_paths(make_aug(**NO_PIXEL_OPS), faces(12))
    for ref, out in ((g_ref, g_out), (l_ref, l_out)):
        assert ref.shape == out.shape
        assert (ref - out).abs().max() <= 1.01 / 255
        assert (ref - out).abs().mean() < 1e-4


def test_fully_augmented_views_match_the_per_image_path_view_by_view() -> None:
    """Every op on, DINO's probabilities: each view is its per-image twin up to rounding (same draws)."""
    g_ref, l_ref, g_out, l_out = both_paths(make_aug(), faces(16))
    for ref, out in ((g_ref, g_out), (l_ref, l_out)):
        assert (ref - out).abs().mean() < 1e-4 and (ref - out).abs().max() < 3 / 255


def test_both_paths_draw_views_with_the_same_statistics() -> None:
    """Over many views: the mean, spread and colourfulness of the views agree between the paths."""
    g_ref, l_ref, g_out, l_out = both_paths(make_aug(local_size=16, global_size=32), faces(48, size=48), seed=3)
    for ref, out in ((g_ref, g_out), (l_ref, l_out)):
        stats = []
        for views in (ref, out):
            means, stds = views.mean(dim=(1, 2, 3)), views.std(dim=(1, 2, 3))
            colour = (views - views.mean(dim=1, keepdim=True)).abs().mean(dim=(1, 2, 3))  # 0 for gray views
            stats.append(torch.stack([means.mean(), means.std(), stds.mean(), colour.mean(), (colour < 1e-4).float()
                                      .mean()]))
        torch.testing.assert_close(stats[0], stats[1], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------- through the data pipeline


def test_dataset_sends_images_and_the_same_draws_and_masks() -> None:
    """With a source cap the workers send uint8 images and encoded draws; views and masks are the per-image path's."""
    aug, sampler = make_aug(global_size=32, local_size=16), MaskSampler(4, probability=1.0)
    source = SyntheticSource("face", 8)
    rendered = MultiCropDataset(source, aug, seed=5, mask_sampler=sampler)
    raw = MultiCropDataset(source, aug, seed=5, mask_sampler=sampler, source_cap=source_cap(32))
    keys = [(1, i) for i in range(4)]
    crops, batch = collate_crops([rendered[k] for k in keys]), collate_crops([raw[k] for k in keys])
    assert isinstance(batch, RawBatch) and batch.images.dtype == torch.uint8 and batch.images.shape == (4, 3, 64, 64)
    assert torch.equal(batch.masks, crops.masks) and torch.equal(batch.indices, crops.indices)
    assert torch.equal(batch.mask_index.flat, crops.mask_index.flat)
    ready = batch.to(torch.device("cpu")).render(BatchAugmentation(aug))
    assert ready.global_crops.shape == crops.global_crops.shape and ready.local_crops.shape == crops.local_crops.shape
    assert ((ready.global_crops - crops.global_crops) * STD).abs().max() < 3 / 255


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_render_equals_cpu_render_without_waiting_for_the_host() -> None:
    aug = make_aug()
    images = pad_sources([to_source(im, source_cap(64)) for im in faces(8)])
    tables = torch.stack([torch.from_numpy(encode_views(aug.draw(np.random.default_rng(i), 80, 80), (80, 80), (80, 80)))
                          for i in range(8)])
    cpu = BatchAugmentation(aug)(images, tables)
    images, tables = images.cuda(), tables.cuda()
    BatchAugmentation(aug)(images, tables)  # warm-up: kernel loading may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = BatchAugmentation(aug)(images, tables)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(cpu, gpu, strict=True):
        torch.testing.assert_close(b.cpu(), a, atol=0.02, rtol=0)  # TF32 products may round a level differently


def test_the_plan_sends_each_view_to_exactly_the_ops_it_drew() -> None:
    """Per resolution, view row r is in segment (position p, op k) iff it is jittered with op k at position p,
    and in the blur segment iff it drew a blur: no view pays for an op it did not draw, none misses one."""
    aug = make_aug()
    views = torch.stack([torch.from_numpy(encode_views(aug.draw(np.random.default_rng(i), 60, 60), (60, 60), (60, 60)))
                         for i in range(10)])  # (B=10, V=5, C)
    indices, sizes = plan_rows(views)
    assert len(sizes) == 2 * OPS_PER_GROUP and sum(sizes) == indices.shape[0]
    segments = torch.split(indices, list(sizes))
    for group, table in enumerate([views[:, :2].transpose(0, 1).reshape(-1, NUM_COLUMNS),
                                   views[:, 2:].transpose(0, 1).reshape(-1, NUM_COLUMNS)]):
        mine = segments[group * OPS_PER_GROUP : (group + 1) * OPS_PER_GROUP]
        for row, draw in enumerate(table):
            for position in range(4):
                for op in range(4):
                    expected = bool(draw[JITTER]) and int(draw[ORDER][position]) == op
                    assert (row in mine[position * 4 + op].tolist()) == expected
            assert (row in mine[16].tolist()) == bool(draw[SIGMA] > 0)


def test_a_vanishing_blur_sigma_leaves_the_view_unchanged_instead_of_nan() -> None:
    img = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = batch_gaussian_blur(img.clone(), torch.tensor([1e-30, 1e-30]), max_sigma=1e-30)
    assert torch.equal(out, img)
