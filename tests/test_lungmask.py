"""Lung masks against synthetic chests with known lungs: vessels, a nodule, noise, table, outside air."""

from __future__ import annotations

import numpy as np
import pytest

from inference.lung_fields import radiograph_lung_mask
from inference.lungmask import anatomy_mask, ct_lung_mask, fill_z_gaps
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
    # 3 mm pixels: a 384 mm chest (the lung fields are estimated in millimetres; see also tests/test_lung_fields.py)
    mask = radiograph_lung_mask(image.astype(np.float32), (3.0, 3.0))
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


# ---- the fast mask equals the reference implementation (tests/lungmask_reference.py), voxel for voxel ----------


@pytest.mark.parametrize(
    ("seed", "lesions"), [(11, "none"), (3, "nodule"), (114, "consolidation"), (7, "mixed"), (21, "reticular")]
)
def test_ct_lung_mask_equals_reference_on_phantoms(seed: int, lesions: str) -> None:
    from inference.phantoms import make_ct
    from tests import lungmask_reference as reference

    ph = make_ct(seed, 160, 144, 20, lesions)
    sz, sy, sx = ph.grid.spacing
    for hu, normal in ((ph.hu, np.array([0.0, 0.0, 1.0])), (ph.hu[::-1].copy(), np.array([0.0, 0.0, -1.0]))):
        for normal_given, spacing in ((normal, sz), (None, sz), (normal, None), (np.array([1.0, 0.0, 0.0]), sz)):
            expected = reference.anatomy_mask(hu, "CT", (sy, sx), normal_given, spacing)
            got = anatomy_mask(hu, "CT", (sy, sx), normal_given, spacing)
            assert expected.any()
            assert np.array_equal(got, expected), (seed, normal_given, spacing)


def _random_chest(rng: np.random.Generator, depth: int, rows: int, cols: int) -> np.ndarray:
    """A random chest in HU: body ellipse in air, two lungs (ellipsoids) with vessels, wall-bound consolidations
    spanning a few slices, a dome of soft tissue rising into one lung base, gas blobs, noise."""
    z, y, x = np.mgrid[0:depth, 0:rows, 0:cols].astype(np.float32)
    zc = (z + 0.5) / depth - 0.5
    body = ((y - rows / 2) / (0.45 * rows)) ** 2 + ((x - cols / 2) / (0.47 * cols)) ** 2 <= 1
    hu = np.where(body, 40.0, -1000.0)
    for side in (-1, 1):
        ry, rx = rng.uniform(0.2, 0.3) * rows, rng.uniform(0.1, 0.17) * cols
        cx = cols / 2 + side * rng.uniform(0.15, 0.25) * cols
        taper = np.clip(1.0 - rng.uniform(0.2, 1.2) * np.abs(zc), 0.0, 1.0)
        lung = ((y - rows / 2) / ry) ** 2 + ((x - cx) / rx) ** 2 <= taper**2
        hu[lung & body] = -850.0
    for _ in range(int(rng.integers(0, 25))):  # vessels and nodules: soft tissue discs, some on the lung border
        k, cy, cx, r = rng.integers(depth), rng.uniform(0, rows), rng.uniform(0, cols), rng.uniform(0.5, 3.0)
        hu[k][(y[0] - cy) ** 2 + (x[0] - cx) ** 2 <= r * r] = 40.0
    for _ in range(int(rng.integers(0, 3))):  # consolidations: blobs over a few slices
        k0 = int(rng.integers(depth))
        k1 = min(depth, k0 + int(rng.integers(1, 4)))
        cy, cx, r = rng.uniform(0.2, 0.8) * rows, rng.uniform(0.1, 0.9) * cols, rng.uniform(2, 0.15 * cols + 3)
        hu[k0:k1][(y[k0:k1] - cy) ** 2 + (x[k0:k1] - cx) ** 2 <= r * r] = 40.0
    if depth >= 3 and rng.random() < 0.6:  # a dome at either end
        base = range(min(depth, int(rng.integers(1, 4))))
        base = base if rng.random() < 0.5 else [depth - 1 - k for k in base]
        cy, cx = rows / 2, cols / 2 + rng.choice([-1, 1]) * 0.2 * cols
        for i, k in enumerate(base):
            r = (0.12 - 0.03 * i) * cols + 1
            hu[k][(y[0] - cy) ** 2 + (x[0] - cx) ** 2 <= r * r] = 40.0
    if depth >= 3 and rng.random() < 0.3:
        hu[int(rng.integers(depth))][body[0]] = 40.0  # a slice without lungs
    for _ in range(int(rng.integers(0, 4))):  # gas pockets in the body
        k, cy, cx, r = rng.integers(depth), rng.uniform(0.6, 0.9) * rows, rng.uniform(0.3, 0.7) * cols, 2.0
        hu[k][((y[0] - cy) ** 2 + (x[0] - cx) ** 2 <= r * r) & body[0]] = -900.0
    return (hu + rng.normal(0, 15, hu.shape)).astype(np.float32)


def test_ct_lung_mask_equals_reference_on_random_chests() -> None:
    from tests import lungmask_reference as reference

    rng = np.random.default_rng(5)
    for trial in range(40):
        depth = int(rng.choice([1, 2, 3, 5, 9, 14]))
        hu = _random_chest(rng, depth, int(rng.integers(24, 64)), int(rng.integers(24, 64)))
        spacing = (float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.5, 2.0)))
        normal = [None, np.array([0.0, 0.0, 1.0]), np.array([0.0, 0.0, -1.0])][trial % 3]
        # z spacing keeps max_gap below 4 x depth, where the reference's open-end sentinel is sound
        z_spacing = max(float(rng.uniform(2.0, 10.0)), 40.0 / (4 * depth - 1)) if trial % 4 else None
        expected = reference.anatomy_mask(hu, "CT", spacing, normal, z_spacing)
        assert np.array_equal(anatomy_mask(hu, "CT", spacing, normal, z_spacing), expected), trial


def test_fill_z_gaps_equals_reference_on_random_masks() -> None:
    from tests import lungmask_reference as reference

    rng = np.random.default_rng(9)
    for _ in range(30):
        depth = int(rng.integers(3, 30))
        mask = rng.random((depth, 9, 7)) < rng.uniform(0.1, 0.9)
        max_gap = int(rng.integers(1, depth // 4 + 2))  # within the reference's sentinel range
        assert np.array_equal(fill_z_gaps(mask, max_gap), reference.fill_z_gaps(mask, max_gap))


def test_fill_z_gaps_leaves_open_ends_for_any_gap_length() -> None:
    """A run at the start or end of a column is not bounded, however long max_gap is (the reference filled a run
    at the start when max_gap reached 4x the depth)."""
    column = np.array([0, 1, 0, 0, 1, 0], bool)[:, None, None]
    assert fill_z_gaps(column, 40)[:, 0, 0].tolist() == [False, True, True, True, True, False]


def test_stack_closing_equals_slice_by_slice_disc_closing() -> None:
    """The closing of a (Z, Y, X) stack treats each slice on its own: the same as scipy's closing per slice."""
    from scipy import ndimage

    from inference.lungmask import _closing, _disc

    rng = np.random.default_rng(1)
    for radius in (1, 3, 5):
        stack = ndimage.binary_dilation(rng.random((4, 40, 50)) > 0.98, iterations=2) | (rng.random((4, 40, 50)) > 0.97)
        stack[2] = False
        for k in range(4):
            expected = ndimage.binary_closing(np.pad(stack[k], radius), structure=_disc(radius))[
                radius:-radius, radius:-radius
            ]
            assert np.array_equal(_closing(stack, radius)[k], expected)
