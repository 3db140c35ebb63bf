"""Phantom radiographs: each kind of acquisition variation is drawn from the seed and shows in the image where and
as it should; ground truth and reproducibility hold under it; lateral views are rendered (and refused by the node,
tests/test_worker.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from inference.radiograph_phantoms import (
    PLAIN_RADIOGRAPHS,
    TYPICAL_RADIOGRAPHS,
    Radiograph,
    RadiographAcquisition,
    draw_acquisition,
    make_radiograph,
)

SIZE = 64
SEED = 21


def plain() -> RadiographAcquisition:
    return draw_acquisition(np.random.default_rng(0), PLAIN_RADIOGRAPHS)


def render(**changes: object) -> Radiograph:
    """The same subject (SEED) with the plain acquisition changed as given."""
    return make_radiograph(SEED, SIZE, SIZE, acquisition=replace(plain(), **changes))


def test_the_acquisition_is_drawn_from_the_seed_and_varies_between_seeds() -> None:
    a = make_radiograph(3, 48, 48).acquisition
    assert a == make_radiograph(3, 48, 48).acquisition  # same seed, same acquisition
    draws = [draw_acquisition(np.random.default_rng([seed, 1])) for seed in range(60)]
    assert len({d.kvp for d in draws}) == 60
    for name in ("kvp", "fluence", "tilt_deg", "axial_deg", "inspiration_mm", "scatter", "blur_mm", "gamma"):
        values = np.array([getattr(d, name) for d in draws])
        assert values.std() > 0, name
    assert min(d.kvp for d in draws) < 85 and max(d.kvp for d in draws) > 110
    assert max(d.fluence for d in draws) / min(d.fluence for d in draws) > 4  # dose: noise levels apart
    assert min(d.tilt_deg for d in draws) < -2 and max(d.tilt_deg for d in draws) > 2
    assert min(d.inspiration_mm for d in draws) < -10 and max(d.inspiration_mm for d in draws) > 5
    # each on/off variation occurs and is absent in some images
    for flag in (
        lambda d: d.field_margin_mm is not None,
        lambda d: d.dark_shutter,
        lambda d: d.grid,
        lambda d: d.grid_lines,
        lambda d: d.marker == "L",
        lambda d: d.marker == "R",
    ):
        assert 0 < sum(map(flag, draws)) < 60
    # the plain ranges draw no variation at all
    p = draw_acquisition(np.random.default_rng(5), PLAIN_RADIOGRAPHS)
    assert p.field_margin_mm is None and not p.grid and not p.marker and p.tilt_deg == 0 and p.scatter == 0


def test_variation_leaves_the_subject_and_its_lesions_alone() -> None:
    """The acquisition has its own random stream: the same seed gives the same subject and lesions (kinds and
    sizes; positions are drawn within the lungs as positioned and breathing), plain or not."""
    typical = make_radiograph(8, 64, 64, "nodule")
    flat = make_radiograph(8, 64, 64, "nodule", ranges=PLAIN_RADIOGRAPHS)
    assert [(les.kind, les.size_mm) for les in typical.lesions] == [(les.kind, les.size_mm) for les in flat.lesions]
    assert typical.acquisition != flat.acquisition
    np.testing.assert_array_equal(make_radiograph(8, 64, 64, "nodule").image, typical.image)


def test_lesions_change_the_line_integral_only_inside_their_mask_under_typical_variation() -> None:
    for seed in (5, 6, 7):
        rx = make_radiograph(seed, 64, 64, "consolidation", keep_line_integral=True, keep_healthy=True)
        assert rx.lesion_mask.any()
        assert rx.acquisition is not None
        diff = rx.line_integral != rx.healthy_line_integral
        assert not (diff & ~rx.lesion_mask).any()
        assert rx.lesion_mask[diff].all()
        # the same noise: far from the lesion the images differ only by the lesion's faint share of scatter
        far = ~ndimage.binary_dilation(rx.lesion_mask, iterations=2)
        assert np.abs(rx.image - rx.healthy_image)[far].max() < 0.05, rx.acquisition.describe()


def test_collimation_bright_and_dark_shutters() -> None:
    base = render()
    bright = render(field_margin_mm=(10.0, 10.0, 10.0, 10.0), grid=True)
    dark = render(field_margin_mm=(10.0, 10.0, 10.0, 10.0), dark_shutter=True)
    assert base.field_mask is not None and base.field_mask.all()  # not collimated: the whole image is exposed
    assert bright.field_mask is not None and 0.3 < bright.field_mask.mean() < 0.9
    outside = ~ndimage.binary_dilation(bright.field_mask, iterations=3)
    assert outside.any()
    assert bright.image[outside].mean() > 0.85  # unexposed: bright (attenuation is bright)
    assert base.image[outside].mean() < 0.5  # the same pixels uncollimated: mostly air beside the body
    assert dark.field_mask is not None
    assert np.all(dark.image[~ndimage.binary_dilation(dark.field_mask, iterations=2)] == 0)  # blacked out
    assert (bright.lung_mask & ~bright.field_mask).sum() == 0  # the lungs stay in the field


def test_a_lead_marker_is_burned_in_clear_of_the_lungs() -> None:
    size = 192  # the 14 mm letter needs the pixels
    rx = make_radiograph(SEED, size, size, acquisition=replace(plain(), marker="R", marker_mm=14.0))
    assert rx.marker_mask is not None and rx.marker_mask.sum() > 10
    assert not (rx.marker_mask & ndimage.binary_dilation(rx.lung_mask, iterations=3)).any()
    rows, cols = np.nonzero(rx.marker_mask)
    assert rows.mean() < 0.3 * size  # an upper corner
    assert cols.mean() < size / 2  # an R goes to the image's left on a PA (the patient's right), where it fits
    ring = ndimage.binary_dilation(rx.marker_mask, iterations=4) & ~ndimage.binary_dilation(
        rx.marker_mask, iterations=1
    )
    assert rx.image[rx.marker_mask].mean() > rx.image[ring].mean() + 0.3  # lead: bright
    unmarked = make_radiograph(SEED, SIZE, SIZE, acquisition=plain()).marker_mask
    assert unmarked is not None and not unmarked.any()


def test_scatter_veils_contrast_and_a_grid_cuts_it() -> None:
    def contrast(rx: Radiograph) -> float:
        lungs = rx.lung_mask
        body = ndimage.binary_dilation(lungs, iterations=6) & ~ndimage.binary_dilation(lungs, iterations=2)
        return float(rx.image[body].mean() - rx.image[lungs].mean())

    clean = render()
    veiled = render(scatter=0.1, scatter_mm=50.0)
    gridded = render(scatter=0.1, scatter_mm=50.0, grid=True)
    assert contrast(veiled) < 0.85 * contrast(clean)
    assert contrast(veiled) < contrast(gridded) <= contrast(clean) + 1e-3


def test_grid_lines_show_at_their_period() -> None:
    lines = render(grid=True, grid_lines=True, grid_line_depth=0.04, grid_period_px=4.0, grid_phase=0.0)
    without = render(grid=True)
    profile = (lines.image - without.image).mean(axis=0)
    spectrum = np.abs(np.fft.rfft(profile - profile.mean()))
    assert int(np.argmax(spectrum)) == round(SIZE / 4.0)


def test_kvp_dose_and_detector_blur() -> None:
    low_kvp, high_kvp = render(kvp=70.0), render(kvp=125.0)
    body = low_kvp.lung_mask | ndimage.binary_dilation(low_kvp.lung_mask, iterations=8)
    assert low_kvp.image[body].mean() > high_kvp.image[body].mean() + 0.02  # soft beam: more attenuation shown

    noiseless = render(fluence=1e12)

    def noise(fluence: float) -> float:  # the same image but for the quantum noise of its dose
        return float((render(fluence=fluence).image - noiseless.image)[noiseless.lung_mask].std())

    assert noise(2e3) > 5 * noise(2e5) > 0  # ten times the dose: about a third of the noise

    def detail(rx: Radiograph) -> float:
        return float((rx.image - ndimage.gaussian_filter(rx.image, 2.0))[rx.lung_mask].std())

    assert detail(render(fluence=1e12, blur_mm=8.0)) < 0.7 * detail(render(fluence=1e12, blur_mm=0.3))  # 1.5 px vs 0.05


def test_positioning_tilt_shift_rotation_and_inspiration() -> None:
    def lung_centres(rx: Radiograph) -> list[np.ndarray]:
        labels, n = ndimage.label(rx.lung_mask)
        sizes = ndimage.sum(rx.lung_mask, labels, range(1, n + 1))
        two = np.argsort(sizes)[-2:] + 1
        centres = [np.array(ndimage.center_of_mass(labels == k)) for k in two]
        return sorted(centres, key=lambda c: c[1])

    def tilt(rx: Radiograph) -> float:
        (r0, c0), (r1, c1) = lung_centres(rx)
        return float(np.degrees(np.arctan2(r1 - r0, c1 - c0)))

    upright = render()
    assert abs(tilt(render(tilt_deg=8.0)) - tilt(render(tilt_deg=-8.0))) == pytest.approx(16.0, abs=5.0)

    shifted = render(shift_mm=(0.0, 20.0))
    moved = np.mean(lung_centres(shifted), axis=0) - np.mean(lung_centres(upright), axis=0)
    assert moved[1] * upright.pixel_spacing[1] == pytest.approx(20.0, abs=4.0)

    def width_ratio(rx: Radiograph) -> float:
        left, right = rx.lung_mask[:, : SIZE // 2].sum(), rx.lung_mask[:, SIZE // 2 :].sum()
        return float(left / right)

    assert width_ratio(render(axial_deg=8.0)) != pytest.approx(width_ratio(render(axial_deg=-8.0)), rel=0.05)

    def lung_height(rx: Radiograph) -> int:
        rows = np.flatnonzero(rx.lung_mask.any(axis=1))
        return int(rows[-1] - rows[0])

    assert lung_height(render(inspiration_mm=15.0)) > lung_height(render(inspiration_mm=-25.0))


def test_a_lateral_view_is_rendered() -> None:
    lateral = make_radiograph(SEED, 64, 64, view="LL")
    frontal = make_radiograph(SEED, 64, 64)
    assert lateral.view == "LL" and lateral.lung_mask.any()
    assert not np.array_equal(lateral.image, frontal.image)
    with pytest.raises(ValueError, match="unknown view"):
        make_radiograph(SEED, 64, 64, view="AP-oblique")


def test_typical_ranges_are_the_default() -> None:
    a = make_radiograph(4, 48, 48)
    b = make_radiograph(4, 48, 48, ranges=TYPICAL_RADIOGRAPHS)
    np.testing.assert_array_equal(a.image, b.image)
