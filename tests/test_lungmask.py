"""Lung masks against synthetic chests with known lungs: vessels, a nodule, noise, table, outside air."""

from __future__ import annotations

import numpy as np
import pytest

from inference.lungmask import anatomy_mask, ct_lung_mask, fill_z_gaps, radiograph_lung_mask
from tests.dicomgen import chest_slice_hu


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def true_lungs(rows: int, cols: int, z: float) -> np.ndarray:
    """The analytic lungs of chest_slice_hu (HU -850 there, nowhere else)."""
    return chest_slice_hu(rows, cols, z) == -850.0


def synthetic_chest_ct(n_slices: int = 12, size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Chest slices with vessels (inside and touching the lung border), a nodule, a table, bowel gas, noise."""
    rng = np.random.default_rng(seed)
    vol = np.empty((n_slices, size, size), np.float32)
    truth = np.empty((n_slices, size, size), bool)
    yy, xx = np.mgrid[0:size, 0:size]
    for k in range(n_slices):
        z = 2 * k / (n_slices - 1) - 1
        hu = chest_slice_hu(size, size, z)
        lungs = true_lungs(size, size, z)
        truth[k] = lungs
        ys, xs = np.nonzero(lungs)
        for _ in range(12):  # vessels: small soft-tissue discs centred in the lung, some reach the border
            i = rng.integers(len(ys))
            r = rng.uniform(0.8, 2.0)
            hu[((yy - ys[i]) ** 2 + (xx - xs[i]) ** 2 <= r * r) & lungs] = 40.0
        if k == n_slices // 2:  # a 4-pixel nodule inside the right lung
            cy, cx = int(ys.mean()), int(xs[xs > size / 2].mean())
            hu[((yy - cy) ** 2 + (xx - cx) ** 2 <= 16) & lungs] = 30.0
        hu[int(0.9 * size) : int(0.93 * size), 5:-5] = 200.0  # table below the patient
        body = ((yy - size / 2) / (0.38 * size)) ** 2 + ((xx - size / 2) / (0.46 * size)) ** 2 <= 1
        if k < 2:  # bowel gas in the lowest slices, inside the body, outside the lungs
            gas = ((yy - 0.75 * size) ** 2 + (xx - 0.3 * size) ** 2 <= 9) & body & ~lungs
            hu[gas] = -900.0
        vol[k] = hu + rng.normal(0, 25, hu.shape).astype(np.float32)
    return vol, truth


def test_ct_lung_mask_dice_on_synthetic_chest() -> None:
    vol, truth = synthetic_chest_ct()
    mask = ct_lung_mask(vol, (0.8, 0.8))
    assert dice(mask, truth) >= 0.95
    # The border air, table surroundings and bowel gas stay out; the nodule (inside the lung) is in.
    assert not mask[:, 0, :].any() and not mask[:, :, 0].any()
    assert mask.sum() <= truth.sum() * 1.1


def test_ct_lung_mask_per_slice_dice() -> None:
    vol, truth = synthetic_chest_ct(n_slices=8, size=64, seed=3)
    mask = ct_lung_mask(vol, (1.0, 1.0))
    for k in range(len(vol)):
        assert dice(mask[k], truth[k]) >= 0.9, k


def test_ct_lung_mask_empty_without_lungs() -> None:
    hu = np.full((3, 32, 32), -1000.0, np.float32)
    hu[:, 4:28, 4:28] = 40.0  # a body with no air inside
    assert not ct_lung_mask(hu).any()


def test_ct_lung_mask_selects_components_in_3d() -> None:
    """A gas pocket as large as the lungs on its one slice, but small as a 3D component, is not lung."""
    vol, truth = synthetic_chest_ct(n_slices=6, size=64, seed=1)
    yy, xx = np.mgrid[0:64, 0:64]
    gas = ((yy - 44) ** 2 + (xx - 32) ** 2 <= 36) & ~truth[0]
    vol[0][gas] = -950.0
    mask = ct_lung_mask(vol)
    assert not (mask[0] & gas).any()
    assert (mask.sum(axis=(1, 2)) > 0).all()  # lungs found on every slice
    assert dice(mask, truth) >= 0.9


@pytest.mark.parametrize("monochrome_seed", [0, 1])
def test_radiograph_lung_field_estimate(monochrome_seed: int) -> None:
    rng = np.random.default_rng(monochrome_seed)
    size = 128
    hu = chest_slice_hu(size, size)
    image = np.clip((hu + 1000) / 1700, 0, 1) * 0.75 + 0.12 + rng.normal(0, 0.01, hu.shape)
    mask = radiograph_lung_mask(image.astype(np.float32), (0.5, 0.5))
    assert dice(mask[0], true_lungs(size, size, 0.0)) >= 0.9


def test_anatomy_mask_dispatches_by_modality() -> None:
    vol, truth = synthetic_chest_ct(n_slices=4, size=64)
    assert dice(anatomy_mask(vol, "CT", (1.0, 1.0)), truth) >= 0.9
    flat = np.zeros((1, 32, 32), np.float32)
    assert not anatomy_mask(flat, "DX", (1.0, 1.0)).any()


def test_distance_transform_closing_equals_disc_closing() -> None:
    """The fast closing is exactly scipy's closing with the same disc (on random shapes, several radii)."""
    from scipy import ndimage

    from inference.lungmask import _closing, _disc

    rng = np.random.default_rng(0)
    for radius in (1, 2, 4, 6):
        for _ in range(10):
            shape = ndimage.binary_dilation(rng.random((60, 70)) > 0.985, iterations=2) | (rng.random((60, 70)) > 0.97)
            expected = ndimage.binary_closing(np.pad(shape, radius), structure=_disc(radius))[
                radius:-radius, radius:-radius
            ]
            assert np.array_equal(_closing(shape, radius), expected)


def _phantom_mask(seed: int, lesions: str, z_gaps: bool = True) -> tuple[np.ndarray, object]:
    from inference.phantoms import make_ct

    ph = make_ct(seed, 128, 128, 16, lesions)
    sz, sy, sx = ph.grid.spacing
    mask = anatomy_mask(ph.hu, "CT", (sy, sx), np.array([0.0, 0.0, 1.0]), sz if z_gaps else None)
    return mask, ph


def test_ct_lung_mask_leaves_the_diaphragm_dome_out() -> None:
    """Near the bases the liver dome is ringed by lung on an axial slice; it is abdomen, not a hole in the lung."""
    mask, ph = _phantom_mask(11, "none")
    extra = (mask & ~ph.lung_mask).sum(axis=(1, 2))
    lungs = ph.lung_mask.sum(axis=(1, 2))
    assert extra.sum() <= 0.02 * lungs.sum()
    # per slice: never a dome-sized region (the dome is 30-40 % of the basal slices' lung area)
    assert (extra <= 0.1 * np.maximum(lungs, 1) + 20).all(), extra.tolist()


def test_ct_lung_mask_dome_rule_follows_the_orientation() -> None:
    """The same volume stored head to feet: the rule looks at the other end of the slice axis."""
    from inference.phantoms import make_ct

    ph = make_ct(11, 128, 128, 16, "none")
    flipped = ph.hu[::-1].copy()
    mask = anatomy_mask(flipped, "CT", (ph.grid.spacing[1], ph.grid.spacing[2]), np.array([0.0, 0.0, -1.0]))
    assert (mask & ~ph.lung_mask[::-1]).sum() <= 0.02 * ph.lung_mask.sum()
    wrong = anatomy_mask(flipped, "CT", (ph.grid.spacing[1], ph.grid.spacing[2]), np.array([0.0, 0.0, 1.0]))
    assert (wrong & ~ph.lung_mask[::-1]).sum() > (mask & ~ph.lung_mask[::-1]).sum()


def test_fill_z_gaps_fills_only_short_bounded_runs() -> None:
    column = np.array([1, 0, 0, 1, 0, 0, 0, 1, 0, 0], bool)[:, None, None]
    filled = fill_z_gaps(column, 2)[:, 0, 0]
    assert filled.tolist() == [True] * 4 + [False] * 3 + [True] + [False] * 2  # 3-long gap and open end stay


def test_ct_lung_mask_takes_in_consolidation_through_the_slice_axis() -> None:
    """A consolidation merges with the chest wall in its slice; lung above and below it brings it into the mask."""
    with_gaps, ph = _phantom_mask(114, "consolidation")
    without, _ = _phantom_mask(114, "consolidation", z_gaps=False)
    lesion = ph.lesion_mask
    assert (without & lesion).sum() <= 0.1 * lesion.sum()  # what the in-plane steps alone find
    assert (with_gaps & lesion).sum() >= 0.35 * lesion.sum()
    assert (with_gaps & ~ph.lung_mask & ~lesion).sum() <= 0.03 * ph.lung_mask.sum()
