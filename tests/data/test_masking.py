"""Tests of the iBOT patch masks (dinopre.data.masking) against ibot loader.py `ImageFolderMask` (BEiT block masking).

Observed on 3000 block masks per grid with targets U(0.1, 0.5) x N (seeded, see `test_block_ratio_*`): the realised
count never exceeds the target (the algorithm guarantees it); on average it reaches ~98 % of the target on a 14x14
grid (ViT-S/16 at 224 px, shortfall ~1.3 patches, at worst ~12) and ~96 % on the 7x7 grid of a 112 px face crop
(shortfall ~0.6 patches, at worst ~3), the shortfall being largest for small targets (~92 % at ratio 0.1-0.2 on
7x7). On the demo's 4x4 grid it is ~89 %, on 3x3 ~82 %, and a 2x2 grid (1x1 blocks only) masks nothing below a
ratio of 0.25.
"""

from __future__ import annotations

import copy
import math
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest

from dinopre.data import masking
from dinopre.data.masking import MaskSampler, block_mask, random_mask

ASPECT_LOG = (math.log(0.3), math.log(1 / 0.3))


@contextmanager
def hang_guard(seconds: int = 30) -> Iterator[None]:
    """Turn an endless loop into a test failure instead of a hung test run (not a timing assertion)."""

    def _raise(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"mask drawing did not finish within {seconds} s: endless loop?")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def draw_many(sampler: MaskSampler, n: int, seed: int) -> np.ndarray:
    """(n, grid*grid) masks drawn from one seeded generator."""
    rng = np.random.default_rng(seed)
    return np.stack([sampler(rng) for _ in range(n)])


def min_block(height: int, width: int) -> int:
    """BEiT's minimum block area (min(H, W) // 3)^2."""
    return (min(height, width) // 3) ** 2


def rounding_admissible(h: int, w: int, area_low: float, area_high: float = math.inf) -> bool:
    """Could h = round(sqrt(A a)), w = round(sqrt(A / a)) with A in [area_low, area_high], a in [0.3, 1/0.3]?

    With x = sqrt(A a) in [h - 1/2, h + 1/2] and y = sqrt(A / a) in [w - 1/2, w + 1/2]: A = x y and a = x / y. In
    log space (u, v) = (ln x, ln y) the conditions are a box, |u - v| <= ln(1/0.3) and ln A_low <= u + v <= ln A_high,
    a convex set; it is non-empty iff the range of u + v over box and aspect band meets [ln A_low, ln A_high].
    """
    c = -ASPECT_LOG[0]
    u_lo, u_hi = math.log(h - 0.5), math.log(h + 0.5)
    v_lo, v_hi = math.log(w - 0.5), math.log(w + 0.5)
    if u_lo > v_hi + c + 1e-12 or v_lo > u_hi + c + 1e-12:
        return False  # no point of the box inside the aspect band

    def extreme(u_end: float, v_end: float) -> float:
        # u + v at the box corner (u_end, v_end) pulled back into the band along the other coordinate.
        if u_end - v_end > c:
            return 2 * v_end + c
        if v_end - u_end > c:
            return 2 * u_end + c
        return u_end + v_end

    high = extreme(u_hi, v_hi)
    low = -extreme(-u_lo, -v_lo)  # the same at the lower corner, by symmetry (u, v) -> (-u, -v)
    return high >= math.log(area_low) - 1e-9 and low <= math.log(area_high) + 1e-9


@dataclass
class BlockRecord:
    """One call of `_add_block`: the mask before and after, the budget, the count returned, the replayed rectangle."""

    before: np.ndarray
    after: np.ndarray
    budget: float
    added: int
    rect: tuple[int, int, int, int] | None  # (top, left, h, w) of ibot's accepted attempt, None if all 10 failed


def ibot_one_block(rng: np.random.Generator, mask: np.ndarray, budget: float) -> tuple[int, int, int, int] | None:
    """ibot loader.py's 10-attempt inner loop, as Python's random calls map to numpy: the rectangle it accepts.

    random.uniform(low, max) = low + (max - low) * random(); random.randint(0, H - h) = integers(0, H - h + 1).
    Attempts whose rounded h or w is 0 mask nothing in ibot either; they draw no position here.
    """
    height, width = mask.shape
    low = min_block(height, width)
    for _ in range(10):
        area = low + (budget - low) * rng.random()
        aspect = math.exp(rng.uniform(*ASPECT_LOG))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < h < height and 0 < w < width:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            if 0 < h * w - int(mask[top : top + h, left : left + w].sum()) <= budget:
                return top, left, h, w
    return None


@pytest.fixture
def recorded_blocks(monkeypatch: pytest.MonkeyPatch) -> list[BlockRecord]:
    """Wrap `dinopre.data.masking._add_block`: record each call and replay ibot's loop on a copy of its generator."""
    records: list[BlockRecord] = []
    original: Callable[[np.random.Generator, np.ndarray, float], int] = masking._add_block

    def wrapper(rng: np.random.Generator, mask: np.ndarray, budget: float) -> int:
        before, replay_rng = mask.copy(), copy.deepcopy(rng)
        added = original(rng, mask, budget)
        rect = ibot_one_block(replay_rng, before, budget)
        # The replay consumed exactly the draws the real call did: the same algorithm, draw for draw.
        assert replay_rng.bit_generator.state == rng.bit_generator.state
        records.append(BlockRecord(before, mask.copy(), budget, added, rect))
        return added

    monkeypatch.setattr(masking, "_add_block", wrapper)
    return records


# ----------------------------------------------------------------------------------- masked or not


@pytest.mark.parametrize("shape", ["block", "rand"])
@pytest.mark.parametrize("probability", [0.5, 0.3])
def test_share_of_unmasked_views_is_one_minus_probability(probability: float, shape: str) -> None:
    """Over 3000 views the share left unmasked is 1 - probability within 4 standard errors (14x14, ratio >= 0.1)."""
    n = 3000
    masks = draw_many(MaskSampler(14, probability, (0.1, 0.5), shape), n, seed=int(probability * 10))
    unmasked = (~masks.any(axis=1)).mean()
    standard_error = math.sqrt(probability * (1 - probability) / n)
    assert abs(unmasked - (1 - probability)) < 4 * standard_error


@pytest.mark.parametrize("shape", ["block", "rand"])
def test_probability_zero_never_masks_and_one_always_masks(shape: str) -> None:
    """probability 0: every view unmasked; probability 1: every view masked (7x7 face grid, ratio >= 0.1)."""
    assert not draw_many(MaskSampler(7, 0.0, (0.1, 0.5), shape), 500, seed=1).any()
    always = draw_many(MaskSampler(7, 1.0, (0.1, 0.5), shape), 500, seed=2)
    assert always.any(axis=1).all()


def test_unmasked_views_make_one_draw_only() -> None:
    """An unmasked view draws only its masked-or-not coin: the next view's draws are not shifted by a ratio draw."""
    rng, reference = np.random.default_rng(5), np.random.default_rng(5)
    MaskSampler(7, 0.0)(rng)
    reference.random()
    assert rng.bit_generator.state == reference.bit_generator.state


# ----------------------------------------------------------------------------------- rand masks


def exact_rand_pmf(n_patches: int, low: float, high: float) -> dict[int, float]:
    """P(count = k) when count = int(r N) and r ~ U(low, high): the length of r's interval mapping to k."""
    pmf: dict[int, float] = {}
    for k in range(int(low * n_patches), int(high * n_patches) + 1):
        length = min(high, (k + 1) / n_patches) - max(low, k / n_patches)
        if length > 0:
            pmf[k] = length / (high - low)
    return pmf


@pytest.mark.parametrize("grid", [7, 14])
def test_rand_count_is_floor_of_uniform_ratio(grid: int) -> None:
    """rand: count = int(r N) with r ~ U(0.1, 0.5): chi-square against the exact pmf, mean, and both ends reached."""
    n, n_patches = 4000, grid * grid
    masks = draw_many(MaskSampler(grid, 1.0, (0.1, 0.5), "rand"), n, seed=grid)
    counts = masks.sum(axis=1)
    pmf = exact_rand_pmf(n_patches, 0.1, 0.5)
    assert set(counts.tolist()) <= set(pmf)  # int(0.1 N) .. int(0.5 N - eps): never more, never fewer
    observed = np.array([(counts == k).sum() for k in pmf])
    expected = n * np.array(list(pmf.values()))
    chi2 = ((observed - expected) ** 2 / expected).sum()
    dof = len(pmf) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof)  # ~ p < 1e-4 for a correct sampler
    mean_expected = sum(k * p for k, p in pmf.items()) / n_patches  # ~ 0.3 - 1 / (2N)
    assert abs(counts.mean() / n_patches - mean_expected) < 4 * (counts / n_patches).std() / math.sqrt(n)
    assert counts.min() == int(0.1 * n_patches) and counts.max() == max(pmf)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.37, 0.99])
def test_random_mask_count_is_exact(ratio: float) -> None:
    """random_mask masks exactly int(ratio x H x W) patches, uniformly: every patch is hit about equally often."""
    rng = np.random.default_rng(3)
    masks = np.stack([random_mask(rng, 7, 7, ratio) for _ in range(400)])
    assert (masks.reshape(400, -1).sum(axis=1) == int(ratio * 49)).all()
    if 0 < ratio < 0.99:
        per_patch = masks.mean(axis=0)  # each patch is masked with probability int(ratio N) / N
        p = int(ratio * 49) / 49
        assert np.abs(per_patch - p).max() < 5 * math.sqrt(p * (1 - p) / 400)


# ----------------------------------------------------------------------------------- block masks


@pytest.mark.parametrize("grid", [2, 3, 4, 7, 14])
def test_block_count_never_exceeds_target(grid: int) -> None:
    """Each added block masks at most the remaining budget, so the total never exceeds ratio x N (floor of it)."""
    rng = np.random.default_rng(grid)
    for ratio in rng.uniform(0.0, 0.95, size=300):
        mask = block_mask(rng, grid, grid, float(ratio))
        assert mask.shape == (grid, grid) and mask.dtype == np.bool_
        assert mask.sum() <= math.floor(ratio * grid * grid)


@pytest.mark.parametrize(("grid", "min_share", "max_shortfall"), [(14, 0.95, 16), (7, 0.93, 4)])
def test_block_ratio_close_to_target_on_average(grid: int, min_share: float, max_shortfall: int) -> None:
    """Realised / target count is >= 95 % (14x14) and >= 93 % (7x7) on average; observed ~98 % and ~96 %."""
    rng = np.random.default_rng(100 + grid)
    targets = rng.uniform(0.1, 0.5, size=1500) * grid * grid
    counts = np.array([block_mask(rng, grid, grid, t / grid**2).sum() for t in targets])
    assert (counts <= targets).all()
    assert min_share <= counts.sum() / targets.sum() <= 1.0
    # Shortfalls come from 10 failed attempts in a row: below one minimum block plus rounding on these grids.
    assert (targets - counts).max() < max_shortfall


def test_block_sampler_ratio_follows_ratio_range() -> None:
    """Through MaskSampler (7x7, U(0.1, 0.5)): masked views average ~0.29 of the patches, none above 0.5."""
    masks = draw_many(MaskSampler(7, 1.0, (0.1, 0.5), "block"), 2000, seed=9)
    ratios = masks.sum(axis=1) / 49
    assert ratios.max() < 0.5 and ratios.min() > 0  # every masked view masks something (observed)
    assert 0.3 * 0.93 <= ratios.mean() <= 0.3


@pytest.mark.parametrize("grid", [7, 14])
def test_every_added_block_is_an_admissible_rectangle(grid: int, recorded_blocks: list[BlockRecord]) -> None:
    """Replaying ibot's loop on each `_add_block` call's generator: the mask grows by exactly that rectangle.

    The rectangle has 0 < h < H, 0 < w < W; its (h, w) are the roundings of sqrt(A a), sqrt(A / a) for some area A
    in [low, budget] (or [budget, low] when the budget is below the minimum block) and aspect a in [0.3, 1/0.3];
    it masks between 1 and `budget` new patches and `_add_block` returns that number.
    """
    rng = np.random.default_rng(grid)
    for ratio in rng.uniform(0.05, 0.6, size=150):
        block_mask(rng, grid, grid, float(ratio))
    low = min_block(grid, grid)
    accepted = [r for r in recorded_blocks if r.rect is not None]
    assert len(accepted) > 150 and any(r.budget < low for r in accepted)  # both regimes were exercised
    for record in recorded_blocks:
        new = int(record.after.sum() - record.before.sum())
        assert record.added == new and (record.after >= record.before).all()
        if record.rect is None:
            assert new == 0
            continue
        top, left, h, w = record.rect
        expected = record.before.copy()
        expected[top : top + h, left : left + w] = True
        assert np.array_equal(record.after, expected)
        assert 0 < h < grid and 0 < w < grid and 0 < new <= record.budget
        area_low, area_high = sorted((low, record.budget))
        assert rounding_admissible(h, w, area_low, area_high), (h, w, record.budget)


@pytest.mark.parametrize("grid", [7, 14])
def test_final_mask_is_covered_by_admissible_blocks(grid: int) -> None:
    """From the final mask alone: all but < low masked cells lie in an all-True rectangle of admissible size.

    A block added while the budget is >= low has area A >= low, so it is a rectangle h < H, w < W whose rounding is
    consistent with A >= low and an aspect in [0.3, 1/0.3], all True in the final mask (cells are never unmasked).
    Blocks added once the budget is < low are smaller but together mask fewer than `low` cells (their budget is).
    """
    low = min_block(grid, grid)
    shapes = [(h, w) for h in range(1, grid) for w in range(1, grid) if rounding_admissible(h, w, low)]
    assert (1, grid - 1) not in shapes and (grid - 1, 1) not in shapes  # thin strips are never drawn
    rng = np.random.default_rng(50 + grid)
    for ratio in rng.uniform(0.1, 0.5, size=40):
        mask = block_mask(rng, grid, grid, float(ratio))
        covered = np.zeros_like(mask)
        for h, w in shapes:
            windows = np.lib.stride_tricks.sliding_window_view(mask, (h, w)).all(axis=(2, 3))
            for top, left in np.argwhere(windows):
                covered[top : top + h, left : left + w] = True
        assert (mask & ~covered).sum() < low


def test_rounding_admissible_matches_sampled_draws() -> None:
    """The admissibility test used above accepts every (h, w) the area/aspect formula produces and rejects others."""
    rng = np.random.default_rng(0)
    drawn = set()
    for _ in range(20000):
        area = 16 + (60 - 16) * rng.random()
        aspect = math.exp(rng.uniform(*ASPECT_LOG))
        drawn.add((int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))))
    assert all(rounding_admissible(h, w, 16, 60) for h, w in drawn)
    assert not rounding_admissible(1, 13, 16) and not rounding_admissible(2, 2, 16)
    assert not rounding_admissible(9, 9, 16, 60) and rounding_admissible(4, 4, 16, 60)


# ----------------------------------------------------------------------------------- layout and determinism


@pytest.mark.parametrize("shape", ["block", "rand"])
def test_same_seed_same_mask_shape_and_dtype(shape: str) -> None:
    """The same generator seed gives the same masks; a mask is (grid*grid,) bool; other seeds give other masks."""
    sampler = MaskSampler(7, 1.0, (0.1, 0.5), shape)
    first, again = draw_many(sampler, 20, seed=42), draw_many(sampler, 20, seed=42)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, draw_many(sampler, 20, seed=43))
    one = sampler(np.random.default_rng(0))
    assert one.shape == (49,) and one.dtype == np.bool_
    assert MaskSampler(7, 0.0)(np.random.default_rng(0)).shape == (49,)


@pytest.mark.parametrize(("shape", "function"), [("block", "block_mask"), ("rand", "random_mask")])
def test_sampler_flattens_row_major(shape: str, function: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Patch (row r, column c) of the grid is entry r * grid + c, the backbone's token order; the ratio is in range."""
    calls: list[tuple[int, int, float]] = []

    def fake(_rng: np.random.Generator, height: int, width: int, ratio: float) -> np.ndarray:
        calls.append((height, width, ratio))
        grid = np.zeros((height, width), dtype=bool)
        grid[0, 1] = grid[2, 0] = True  # asymmetric: column-major order would put them at 7 and 2
        return grid

    monkeypatch.setattr(masking, function, fake)
    mask = MaskSampler(5, 1.0, (0.2, 0.4), shape)(np.random.default_rng(0))
    assert np.flatnonzero(mask).tolist() == [1, 10]
    assert len(calls) == 1 and calls[0][:2] == (5, 5) and 0.2 <= calls[0][2] <= 0.4


def test_block_mask_matches_ibot_replay_end_to_end() -> None:
    """block_mask equals ibot's whole while-loop (blocks until the target or 10 failures) on the same generator."""
    for seed in range(30):
        rng, reference_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        ratio = 0.1 + 0.4 * seed / 30
        mask = block_mask(rng, 14, 14, ratio)
        reference = np.zeros((14, 14), dtype=bool)
        target, count = ratio * 196, 0
        while count < target:
            rect = ibot_one_block(reference_rng, reference, target - count)
            if rect is None:
                break
            top, left, h, w = rect
            count += h * w - int(reference[top : top + h, left : left + w].sum())
            reference[top : top + h, left : left + w] = True
        assert np.array_equal(mask, reference), seed


# ----------------------------------------------------------------------------------- tiny grids


@pytest.mark.parametrize("grid", [1, 2, 3, 4])
@pytest.mark.parametrize("shape", ["block", "rand"])
def test_tiny_grids_terminate_with_valid_masks(grid: int, shape: str) -> None:
    """Grids of 1-4 patches a side (4x4 = the demo's 32 px / patch 8) always finish with a valid, in-budget mask."""
    rng = np.random.default_rng(grid)
    with hang_guard():
        for ratio_range in [(0.1, 0.5), (0.0, 0.0), (0.5, 0.99)]:
            sampler = MaskSampler(grid, 1.0, ratio_range, shape)
            masks = np.stack([sampler(rng) for _ in range(300)])
            assert masks.shape == (300, grid * grid) and masks.dtype == np.bool_
            assert (masks.sum(axis=1) <= math.floor(ratio_range[1] * grid * grid)).all()
            if ratio_range == (0.0, 0.0):
                assert not masks.any()


def test_two_by_two_grid_blocks_are_single_patches() -> None:
    """On a 2x2 grid only 1x1 blocks fit (h < 2, w < 2): below ratio 0.25 nothing is masked, at 0.8 ~2.7 of 3.

    The minimum block is (2 // 3)^2 = 0, so the drawn area can round to an empty block; 10 such attempts in a row
    end the mask early (observed: ~5 % of the masks at ratio 0.8 stay empty, as in ibot).
    """
    rng = np.random.default_rng(0)
    with hang_guard():
        small = [block_mask(rng, 2, 2, 0.2).sum() for _ in range(100)]
        large = [block_mask(rng, 2, 2, 0.8).sum() for _ in range(100)]
    assert max(small) == 0
    assert max(large) <= 3 and 2.4 <= np.mean(large) <= 3.0 and np.mean(np.array(large) == 3) > 0.7


# ----------------------------------------------------------------------------------- index tensors of a batch


def test_mask_index_gathers_the_masked_tokens_in_boolean_order() -> None:
    """Gathering with the index gives exactly `tokens[masks]`, and the weights are 1 / count / images."""
    import torch

    from dinopre.data.masking import MaskIndex

    masks = torch.zeros(4, 6, dtype=torch.bool)
    masks[0, [1, 4]] = True
    masks[2, [0, 2, 5]] = True  # rows 1 and 3 unmasked
    tokens = torch.randn(4, 6, 3)
    index = MaskIndex.from_masks(masks)
    assert index.count == 5 and index.flat.dtype == torch.int64
    assert torch.equal(tokens.flatten(0, 1).index_select(0, index.flat), tokens[masks])
    expected = torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3]) / 4
    assert torch.allclose(index.weights, expected)
    assert index.weights.sum().item() == pytest.approx(2 / 4)  # two masked images of four


def test_batches_carry_the_index_of_their_masks_through_device_copies() -> None:
    """A batch builds its mask index on the host, and `to()` / pinning move it along with the crops."""
    import torch

    from dinopre.data.dataset import CropBatch

    masks = torch.rand(4, 9, generator=torch.Generator().manual_seed(0)) < 0.5
    batch = CropBatch(torch.zeros(4, 3, 8, 8), None, torch.arange(2), masks)
    moved = batch.to(torch.device("cpu"))
    assert moved.mask_index is not None
    assert torch.equal(moved.mask_index.flat, masks.reshape(-1).nonzero().squeeze(1))
    assert CropBatch(torch.zeros(4, 3, 8, 8), None, torch.arange(2)).mask_index is None  # DINO batches
