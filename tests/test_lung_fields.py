"""The radiograph lung fields (the condition of the radiograph model) against the phantoms' ground-truth lungs,
under the acquisition variation the model is trained with, and the same mask at training and at inference."""

from __future__ import annotations

from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from inference.lung_fields import radiograph_lung_mask, shutters
from inference.radiograph_phantoms import PLAIN_RADIOGRAPHS, Radiograph, draw_acquisition, make_radiograph

SIZE = 192


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def fields_dice(rx: Radiograph) -> float:
    return dice(radiograph_lung_mask(rx.image, rx.pixel_spacing)[0], rx.lung_mask)


@pytest.mark.slow  # eight full-size radiographs rendered (40 s); the hard cases below stay in the fast tier
def test_lung_fields_match_the_phantom_lungs_under_typical_variation() -> None:
    """On radiographs with the typical acquisition variation (seeds the estimator was not tuned on): Dice about 0.9
    on average (0.898 on these eight, 0.910 on seeds 400-431); the faint apices of low-contrast images and a leak
    along a tight collimator edge keep single images lower (down to 0.76 on those seeds)."""
    scores = []
    for seed in range(500, 508):
        rx = make_radiograph(seed, SIZE, SIZE, native=SIZE)
        assert rx.acquisition is not None
        scores.append(fields_dice(rx))
        assert scores[-1] >= 0.75, (seed, rx.acquisition.describe())
    assert np.mean(scores) >= 0.88, np.round(scores, 3)


PLAIN = draw_acquisition(np.random.default_rng(0), PLAIN_RADIOGRAPHS)
HARD_CASES = {
    "bright shutters": dict(field_margin_mm=(8.0, 12.0, 10.0, 15.0), grid=True, scatter=0.08),
    "dark shutters": dict(field_margin_mm=(15.0, 8.0, 12.0, 10.0), dark_shutter=True),
    "markers": dict(marker="L", marker_mm=16.0),
    "tilted and shifted": dict(tilt_deg=5.0, shift_mm=(10.0, -12.0)),
    "rotated patient": dict(axial_deg=6.0),
    "shallow inspiration": dict(inspiration_mm=-25.0),
    "low kVp, low dose": dict(kvp=70.0, fluence=5e3, read_noise=8.0),
    "grid lines, scatter, blur": dict(
        grid=True, grid_lines=True, grid_line_depth=0.04, grid_period_px=2.5, scatter=0.1, blur_mm=1.6
    ),
    "everything": dict(
        field_margin_mm=(6.0, 6.0, 6.0, 6.0),
        marker="R",
        marker_mm=12.0,
        tilt_deg=-5.0,
        axial_deg=-6.0,
        kvp=125.0,
        scatter=0.1,
        inspiration_mm=15.0,
        gamma=0.65,
        window=5.8,
    ),
}


@cache
def plain_dice() -> float:
    return fields_dice(make_radiograph(31, SIZE, SIZE, native=SIZE, acquisition=PLAIN))


@pytest.mark.parametrize("case", HARD_CASES)
def test_lung_fields_under_each_kind_of_variation(case: str) -> None:
    """One subject taken plainly (Dice 0.96) and with each kind of variation at the edge of its range: tight
    bright shutters cost most (0.88), the rest 0.93-0.96."""
    assert plain_dice() >= 0.93
    rx = make_radiograph(31, SIZE, SIZE, native=SIZE, acquisition=replace(PLAIN, **HARD_CASES[case]))  # type: ignore[arg-type]
    assert fields_dice(rx) >= 0.85


def test_collimator_shutters_are_found_along_the_border() -> None:
    rx = make_radiograph(31, SIZE, SIZE, native=SIZE, acquisition=replace(PLAIN, field_margin_mm=(8.0, 8.0, 8.0, 8.0)))
    assert rx.field_mask is not None
    found = shutters(rx.image)
    assert dice(found, ~rx.field_mask) >= 0.85
    assert not (found & rx.lung_mask).any()
    uncollimated = make_radiograph(31, SIZE, SIZE, native=SIZE, acquisition=PLAIN)
    assert not (shutters(uncollimated.image) & uncollimated.lung_mask).any()  # flat air rows, at most


def test_training_conditions_on_the_mask_the_node_computes(tmp_path: Path) -> None:
    """The radiograph model's training pool and the node, reading the same phantom as DICOM, give the same
    lung-field condition on the model grid, pixel for pixel."""
    from inference.lungmask import anatomy_mask
    from inference.phantoms import radiograph_dataset, synthetic_study
    from inference.simplex import splitmix64
    from inference.train import radiograph_slices
    from inference.volume import load_series, mask_to_grid, to_model_grid

    pool = radiograph_slices(seed=4, subjects=2, size=96, grid=32)
    for i in range(2):
        rx = make_radiograph(splitmix64(4, i) % 2**31, 96, 96, "none", native=96)  # min(96, max(128, 2 x 32))
        path = tmp_path / f"{i}.dcm"
        radiograph_dataset(rx, synthetic_study(4, i), "DX").save_as(path, enforce_file_format=True)
        volume = load_series([path])
        grid_image, mapping = to_model_grid(volume, 32)
        mask = anatomy_mask(volume.pixels, volume.modality, volume.pixel_spacing, volume.normal, volume.slice_spacing)
        np.testing.assert_array_equal(mask_to_grid(mask, mapping).astype(np.float32)[0], pool.masks[i].numpy())
        np.testing.assert_allclose(grid_image[0], pool.images[i].numpy(), atol=1e-6)
