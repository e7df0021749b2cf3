"""Data: recursive scanning, deterministic order and draws, the resumable sampler, crop-major batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinopre.base.errors import DataError
from dinopre.data.augment import MultiCropAugmentation
from dinopre.data.dataset import (
    EpochBatchSampler,
    FolderSource,
    MultiCropDataset,
    SyntheticSource,
    check_dataset_size,
    collate_crops,
    epoch_permutation,
    scan_image_files,
)
from dinopre.data.images import load_rgb
from dinopre.data.masking import MaskSampler


def _augmentation(num_local: int = 2) -> MultiCropAugmentation:
    return MultiCropAugmentation(global_size=32, local_size=16, num_local_crops=num_local,
                                 global_scale=(0.4, 1.0), local_scale=(0.05, 0.4))


def test_scan_is_recursive_case_insensitive_and_sorted(tmp_path: Path) -> None:
    for rel in ["b/2.JPG", "a/1.png", "a/deep/3.TiFf", "c.bmp", "notes.txt", "a/x.jpeg.bak"]:
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in scan_image_files([str(tmp_path)])]
    assert found == ["a/1.png", "a/deep/3.TiFf", "b/2.JPG", "c.bmp"]


def test_several_roots_keep_their_order(face_folder: Path) -> None:
    files = scan_image_files([str(face_folder / "signer_b"), str(face_folder / "signer_a")])
    assert len(files) == 48
    assert files[0].parent.name == "signer_b" and files[-1].parent.name == "signer_a"


def test_symlink_loops_do_not_hang(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "loop").symlink_to(tmp_path / "imgs", target_is_directory=True)
    assert len(scan_image_files([str(tmp_path / "imgs")])) == 1


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "file.png").write_bytes(b"") or p / "file.png", "is not a folder"),
    (lambda p: p, "No images found"),
])
def test_bad_folders_are_clear_errors(tmp_path: Path, make, message: str) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=message) as info:
        scan_image_files([str(make(tmp_path))])
    if message == "No images found":
        assert ".png .jpg .jpeg .bmp .tif .tiff" in str(info.value)


def test_images_are_converted_to_rgb_with_exif_orientation(tmp_path: Path) -> None:
    gray = tmp_path / "gray.png"
    Image.new("L", (10, 6), 128).save(gray)
    assert load_rgb(gray).mode == "RGB"
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (10, 6)).save(rotated, exif=exif)
    assert load_rgb(rotated).size == (6, 10)


def test_epoch_permutations_are_seeded_per_epoch() -> None:
    a0, a1 = epoch_permutation(0, 0, 100), epoch_permutation(0, 1, 100)
    assert sorted(a0) == list(range(100))
    assert not np.array_equal(a0, a1)
    assert np.array_equal(a0, epoch_permutation(0, 0, 100))
    assert not np.array_equal(a0, epoch_permutation(1, 0, 100))


def test_sampler_drops_the_last_partial_batch_and_spans_epochs() -> None:
    sampler = EpochBatchSampler(num_samples=10, batch_size=4, seed=0, start_epoch=0, end_epoch=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6  # 2 full batches per epoch
    assert [b[0][0] for b in batches] == [0, 0, 1, 1, 2, 2]
    first_epoch = [i for _, i in batches[0] + batches[1]]
    assert len(set(first_epoch)) == 8


def test_sampler_resumes_mid_epoch_with_the_same_keys() -> None:
    full = list(EpochBatchSampler(20, 4, seed=3, start_epoch=0, end_epoch=3))
    resumed = list(EpochBatchSampler(20, 4, seed=3, start_epoch=1, end_epoch=3, start_step=2))
    assert resumed == full[5 + 2:]


def test_dataset_is_a_pure_function_of_seed_epoch_and_index() -> None:
    dataset = MultiCropDataset(SyntheticSource("face", 8), _augmentation(), seed=0)
    g1, l1, index, masks, bad = dataset[(0, 3)]
    g2, l2, _, _, _ = dataset[(0, 3)]
    assert bad == []
    assert masks is None  # DINO draws no masks
    assert index == 3 and len(g1) == 2 and len(l1) == 2
    assert all(torch.equal(a, b) for a, b in zip(g1 + l1, g2 + l2))
    other_epoch, _, _, _, _ = dataset[(1, 3)]
    assert not torch.equal(g1[0], other_epoch[0])
    other_seed, _, _, _, _ = MultiCropDataset(SyntheticSource("face", 8), _augmentation(), seed=1)[(0, 3)]
    assert not torch.equal(g1[0], other_seed[0])


def test_collate_is_crop_major(face_folder: Path) -> None:
    dataset = MultiCropDataset(FolderSource(tuple(scan_image_files([str(face_folder)]))), _augmentation(3), seed=0)
    samples = [dataset[(0, i)] for i in (5, 9)]
    batch = collate_crops(samples)
    assert batch.global_crops.shape == (4, 3, 32, 32) and batch.local_crops.shape == (6, 3, 16, 16)
    assert batch.indices.tolist() == [5, 9]
    # rows: [view0 of img5, view0 of img9, view1 of img5, view1 of img9]
    assert torch.equal(batch.global_crops[1], samples[1][0][0])
    assert torch.equal(batch.global_crops[2], samples[0][0][1])
    assert torch.equal(batch.local_crops[5], samples[1][1][2])


def test_no_local_crops_gives_none() -> None:
    dataset = MultiCropDataset(SyntheticSource("hands", 4), _augmentation(0), seed=0)
    assert collate_crops([dataset[(0, 0)], dataset[(0, 1)]]).local_crops is None


def test_dataset_smaller_than_a_batch_is_refused() -> None:
    assert check_dataset_size(10, 4) == 2
    with pytest.raises(DataError, match="lower --batch-size to at most 3"):
        check_dataset_size(3, 8)


def test_ibot_masks_come_with_the_global_views_crop_major() -> None:
    sampler = MaskSampler(grid=4, probability=1.0, ratio_range=(0.3, 0.5), shape="rand")
    dataset = MultiCropDataset(SyntheticSource("face", 8), _augmentation(), seed=0, mask_sampler=sampler)
    samples = [dataset[(0, i)] for i in (1, 6)]
    assert len(samples[0][3]) == 2 and samples[0][3][0].shape == (16,)
    plain_views = MultiCropDataset(SyntheticSource("face", 8), _augmentation(), seed=0)[(0, 1)][0]
    assert all(torch.equal(a, b) for a, b in zip(samples[0][0], plain_views))  # masks are drawn after the views
    batch = collate_crops(samples)
    assert batch.masks.shape == (4, 16) and batch.masks.dtype == torch.bool
    assert np.array_equal(batch.masks[1].numpy(), samples[1][3][0])  # view 0 of the second image
    assert np.array_equal(batch.masks[2].numpy(), samples[0][3][1])  # view 1 of the first image
    moved = batch.to(torch.device("cpu"))
    assert torch.equal(moved.masks, batch.masks)


def test_each_sample_carries_a_drop_path_key_drawn_last_from_its_own_generator() -> None:
    dataset = MultiCropDataset(SyntheticSource("face", 8), _augmentation(), seed=0)
    sample = dataset[(0, 3)]
    assert len(sample) == 5 and sample.drop_key == dataset[(0, 3)].drop_key  # five parts, as before
    assert sample.drop_key != dataset[(1, 3)].drop_key and sample.drop_key != dataset[(0, 4)].drop_key
    batch = collate_crops([dataset[(0, i)] for i in (3, 5)])
    assert batch.drop_keys.tolist() == [sample.drop_key, dataset[(0, 5)].drop_key]
    assert torch.equal(batch.to(torch.device("cpu")).drop_keys, batch.drop_keys)
    assert collate_crops([tuple(dataset[(0, i)]) for i in (3, 5)]).drop_keys is None  # plain tuples: no keys
