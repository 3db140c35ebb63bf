"""Synthetic chest radiographs with exact ground truth: projections through the CT phantom's subjects, taken the
many ways radiographs are taken.

Why the variation: a model trained on one exposure, one position and one detector learns those, and every site
and every image differs in them. Each radiograph draws its acquisition from its seed (`RadiographAcquisition`,
within `RadiographRanges`):

- exposure: tube voltage (kVp: bone contrast falls and the body grows more transparent as it rises), dose (the
  quantum noise), detector read noise;
- positioning: in-plane tilt, rotation of the patient about the body's long axis (a rotated PA: the spine moves
  off the midline of the chest, one lung looks wider), offset on the detector, inspiration depth (diaphragm
  height and dome shape);
- collimation: a field around the lungs, the unexposed border left bright or blacked out by an electronic shutter;
- scatter and anti-scatter grid: a low-frequency veil from the irradiated body; a grid cuts most of it, absorbs
  some primary and, when stationary, casts fine lines (aliased on the pixel grid);
- detector: blur (the MTF, a Gaussian), gain differences between rows (line artefacts);
- a lead L or R marker in an upper corner of the field;
- presentation: the processing's window and gamma.

The acquisition has its own random stream: the subject and its lesions' kinds and sizes are those the seed gives
without variation (`PLAIN_RADIOGRAPHS` renders the plain projection; lesion positions are drawn within the lungs
as positioned and breathing), and one subject's healthy and lesion renderings share acquisition and noise.

Ground truth: `lesion_mask` is every pixel whose line integral a lesion changes (the scatter spreads a faint share
of a lesion's effect further); `lung_mask` is the lung fields as a reader outlines them on a PA: pixels whose ray
crosses lung and neither the heart nor the diaphragm domes (no retrocardiac lung, no posterior recesses below the
domes), inside the collimated field.

Views: PA by default. LL (left lateral) is rendered as well, so that the node's refusal of lateral views
(inference/volume.py) is tested on a real lateral image; the models are trained on PA views only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from inference.phantoms import (
    WATER_MU_PER_MM,
    Grid,
    Lesion,
    Subject,
    add_lesions,
    draw_subject,
    render_anatomy,
)

VIEWS = ("PA", "LL")
ACQUISITION_STREAM = 0x5258  # the acquisition's own random stream: np.random.default_rng([seed, this])
REFERENCE_KVP = 120.0  # the attenuation model's reference: WATER_MU_PER_MM and bone as the CT phantom has them
BONE_HU = 100.0  # above this, attenuation counts as bone (its share depends on kVp)
GRID_PRIMARY = 0.72  # primary transmitted by an anti-scatter grid
GRID_SCATTER = 0.15  # scatter transmitted by it
MARKER_ATTENUATION = 0.97  # a lead letter stops nearly every photon
PENUMBRA_MM = 1.5  # collimator edge blur

# 7 x 5 bitmaps of the lead markers' letters
_LETTERS = {
    "L": ("10000", "10000", "10000", "10000", "10000", "10000", "11111"),
    "R": ("11110", "10001", "10001", "11110", "10100", "10010", "10001"),
}


@dataclass(frozen=True)
class RadiographRanges:
    """Where each acquisition parameter is drawn from: uniform in (lo, hi) (fluence log-uniform), symmetric
    +- for angles and shifts, and probabilities for what a radiograph has or has not."""

    kvp: tuple[float, float] = (70.0, 125.0)
    fluence: tuple[float, float] = (5e3, 4e4)  # photons per mm^2 at the detector without the patient
    read_noise: tuple[float, float] = (1.0, 8.0)  # photons per pixel (std)
    tilt_deg: float = 5.0
    axial_deg: float = 6.0
    shift_mm: float = 15.0
    inspiration_mm: tuple[float, float] = (-25.0, 15.0)  # diaphragm lower (+) or higher (-) than the subject's own
    collimation_p: float = 0.6
    field_margin_mm: tuple[float, float] = (6.0, 40.0)  # collimated field edge beyond the lung fields, per side
    dark_shutter_p: float = 0.4  # of collimated images: the border blacked out by the processing
    grid_p: float = 0.6
    grid_lines_p: float = 0.5  # of images with a grid: a stationary grid, whose lines show
    grid_line_depth: tuple[float, float] = (0.01, 0.04)
    grid_period_px: tuple[float, float] = (2.2, 6.0)  # on the projection grid (aliased lines)
    scatter: tuple[float, float] = (0.03, 0.10)  # scattered photons reaching the detector per interaction (no grid)
    scatter_mm: tuple[float, float] = (30.0, 70.0)  # width of the scatter kernel
    blur_mm: tuple[float, float] = (0.6, 1.6)
    line_gain: tuple[float, float] = (0.0, 0.006)  # std of per-row detector gain
    marker_p: float = 0.8
    marker_mm: tuple[float, float] = (10.0, 16.0)  # letter height
    gamma: tuple[float, float] = (0.65, 0.95)
    window: tuple[float, float] = (5.8, 7.6)  # line integral shown white


TYPICAL_RADIOGRAPHS = RadiographRanges()
# Set B of the held-out radiographs (inference.heldout): every range in SHIFTED_FIELDS lies outside the typical
# one (harder beams, lower dose, more read noise, scatter, blur and line noise, another presentation); geometry,
# collimation, grid, markers, subjects and lesions are drawn as in training.
SHIFTED_RADIOGRAPHS = RadiographRanges(
    kvp=(130.0, 150.0),
    fluence=(1.5e3, 4.5e3),
    read_noise=(9.0, 14.0),
    scatter=(0.12, 0.18),
    blur_mm=(1.8, 2.6),
    line_gain=(0.008, 0.015),
    gamma=(0.5, 0.6),
    window=(7.8, 8.6),
)
SHIFTED_FIELDS = ("kvp", "fluence", "read_noise", "scatter", "blur_mm", "line_gain", "gamma", "window")
PLAIN_RADIOGRAPHS = RadiographRanges(
    kvp=(REFERENCE_KVP, REFERENCE_KVP),
    fluence=(2e4, 2e4),
    read_noise=(0.0, 0.0),
    tilt_deg=0.0,
    axial_deg=0.0,
    shift_mm=0.0,
    inspiration_mm=(0.0, 0.0),
    collimation_p=0.0,
    grid_p=0.0,
    scatter=(0.0, 0.0),
    blur_mm=(1.0, 1.0),
    line_gain=(0.0, 0.0),
    marker_p=0.0,
    gamma=(0.8, 0.8),
    window=(7.0, 7.0),
)


@dataclass(frozen=True)
class RadiographAcquisition:
    """How one radiograph was taken and processed (see the module docstring)."""

    kvp: float
    fluence: float
    read_noise: float
    tilt_deg: float
    axial_deg: float
    shift_mm: tuple[float, float]  # (towards the feet, towards the image's right)
    inspiration_mm: float
    field_margin_mm: tuple[float, float, float, float] | None  # (top, bottom, left, right); None: not collimated
    dark_shutter: bool
    grid: bool
    grid_lines: bool
    grid_line_depth: float
    grid_period_px: float
    grid_phase: float
    scatter: float
    scatter_mm: float
    blur_mm: float
    line_gain: float
    marker: str  # "", "L" or "R"
    marker_mm: float
    gamma: float
    window: float

    def describe(self) -> str:
        parts = [f"{self.kvp:.0f} kVp", f"{self.fluence:.0f}/mm2"]
        if self.field_margin_mm is not None:
            parts.append("dark shutter" if self.dark_shutter else "collimated")
        if self.grid:
            parts.append("grid lines" if self.grid_lines else "grid")
        if self.marker:
            parts.append(f"marker {self.marker}")
        parts.append(f"tilt {self.tilt_deg:+.1f}, rotation {self.axial_deg:+.1f} deg")
        return ", ".join(parts)


def draw_acquisition(rng: np.random.Generator, ranges: RadiographRanges = TYPICAL_RADIOGRAPHS) -> RadiographAcquisition:
    """One radiograph's acquisition within `ranges` (always the same number of draws, whatever the ranges)."""

    def uniform(bounds: tuple[float, float]) -> float:
        return float(rng.uniform(bounds[0], bounds[1]))

    def symmetric(limit: float) -> float:
        return float(rng.uniform(-limit, limit))

    kvp = uniform(ranges.kvp)
    fluence = float(math.exp(rng.uniform(math.log(ranges.fluence[0]), math.log(ranges.fluence[1]))))
    read_noise = uniform(ranges.read_noise)
    tilt, axial = symmetric(ranges.tilt_deg), symmetric(ranges.axial_deg)
    shift = (symmetric(ranges.shift_mm), symmetric(ranges.shift_mm))
    inspiration = uniform(ranges.inspiration_mm)
    collimated = bool(rng.random() < ranges.collimation_p)
    m = ranges.field_margin_mm
    margins = (uniform(m), uniform(m), uniform(m), uniform(m))
    dark = bool(rng.random() < ranges.dark_shutter_p)
    grid = bool(rng.random() < ranges.grid_p)
    lines = bool(rng.random() < ranges.grid_lines_p)
    depth, period, phase = uniform(ranges.grid_line_depth), uniform(ranges.grid_period_px), uniform((0, 2 * math.pi))
    scatter, scatter_mm = uniform(ranges.scatter), uniform(ranges.scatter_mm)
    blur, line_gain = uniform(ranges.blur_mm), uniform(ranges.line_gain)
    marker = str(rng.choice(["L", "R"])) if rng.random() < ranges.marker_p else ""
    marker_mm = uniform(ranges.marker_mm)
    gamma, window = uniform(ranges.gamma), uniform(ranges.window)
    return RadiographAcquisition(
        kvp=kvp,
        fluence=fluence,
        read_noise=read_noise,
        tilt_deg=tilt,
        axial_deg=axial,
        shift_mm=shift,
        inspiration_mm=inspiration,
        field_margin_mm=margins if collimated else None,
        dark_shutter=collimated and dark,
        grid=grid,
        grid_lines=grid and lines,
        grid_line_depth=depth,
        grid_period_px=period,
        grid_phase=phase,
        scatter=scatter,
        scatter_mm=scatter_mm,
        blur_mm=blur,
        line_gain=line_gain,
        marker=marker,
        marker_mm=marker_mm,
        gamma=gamma,
        window=window,
    )


@dataclass
class Radiograph:
    """A chest radiograph: presentation values in [0, 1] (bright = attenuating) and its ground truth."""

    image: np.ndarray  # float32 (rows, cols)
    lesion_mask: np.ndarray  # bool (rows, cols)
    lung_mask: np.ndarray  # bool (rows, cols): the visible lung fields (module docstring)
    pixel_spacing: tuple[float, float]
    lesions: list[Lesion]
    seed: int
    view: str = "PA"
    acquisition: RadiographAcquisition | None = None
    field_mask: np.ndarray | None = None  # bool: the collimated (exposed) field
    marker_mask: np.ndarray | None = None  # bool: the lead marker's letter
    healthy_image: np.ndarray | None = None
    line_integral: np.ndarray | None = None  # noise-free attenuation line integral, when asked for
    healthy_line_integral: np.ndarray | None = None


def breathe(sub: Subject, inspiration_mm: float) -> Subject:
    """The subject at another inspiration: a deeper breath lowers and flattens the diaphragm and lets the heart
    descend with it; a shallow one raises it (short lungs, domed diaphragm)."""
    if not inspiration_mm:
        return sub
    hx, hy, hz, hax, hay, haz = sub.heart
    flatten = float(np.clip(1.0 - inspiration_mm / 80.0, 0.6, 1.4))
    return replace(
        sub,
        lung_base=sub.lung_base - inspiration_mm,
        dome=(sub.dome[0] * flatten, sub.dome[1] * flatten),
        heart=(hx, hy, hz - 0.5 * inspiration_mm, hax, hay, haz),
    )


def _projection_grid(
    sub: Subject, view: str, n_z: int, n_c: int, width: float, height: float, z_center: float, axial_deg: float
) -> tuple[Grid, int]:
    """The phantom grid for a projection and the axis the rays run along (1: y for PA, 2: x for LL).

    Deep enough for the body rotated by `axial_deg` about its long axis."""
    a = math.radians(abs(axial_deg))
    if view == "PA":
        half = math.hypot(sub.body_ax * math.sin(a), sub.body_ay * math.cos(a)) + 5.0
    else:
        half = math.hypot(sub.body_ax * math.cos(a), sub.body_ay * math.sin(a)) + 5.0
    n_d = max(48, min(160, int(2 * half / 1.6)))
    sz, sc, sd = height / n_z, width / n_c, 2 * half / n_d
    z0 = z_center - sz * (n_z - 1) / 2
    if view == "PA":
        return Grid((n_z, n_d, n_c), (sz, sd, sc), (z0, -sd * (n_d - 1) / 2, -sc * (n_c - 1) / 2)), 1
    return Grid((n_z, n_c, n_d), (sz, sc, sd), (z0, -sc * (n_c - 1) / 2, -sd * (n_d - 1) / 2)), 2


def _hidden_lung(sub: Subject, grid: Grid) -> np.ndarray:
    """Where lung on a PA ray is hidden: the heart, and the diaphragm domes (liver and spleen under the lungs)."""
    z, y, x = grid.coords()
    hx, hy, hz, hax, hay, haz = sub.heart
    hidden = ((x - hx) / hax) ** 2 + ((y - hy) / hay) ** 2 + ((z - hz) / haz) ** 2 <= 1.0
    for side, dome in ((-1, sub.dome[0]), (1, sub.dome[1])):
        r2 = ((x - side * sub.lung_x) / sub.lung_ax) ** 2 + ((y - sub.lung_y) / sub.lung_ay) ** 2
        hidden = hidden | ((r2 <= 1.0) & (z <= sub.lung_base + dome * np.clip(1.0 - r2, 0.0, 1.0)))
    return hidden


def _rotate_about_z(volume: np.ndarray, grid: Grid, degrees: float, order: int, cval: float) -> np.ndarray:
    """The volume of a patient turned by `degrees` about the body's long axis (z), in physical coordinates."""
    a = math.radians(degrees)
    sy, sx = grid.spacing[1], grid.spacing[2]
    # output index (i, j) -> mm (y, x) -> rotated back -> input index; z unchanged
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    m2 = np.diag([1 / sy, 1 / sx]) @ rot @ np.diag([sy, sx])
    matrix = np.eye(3)
    matrix[1:, 1:] = m2
    centre = np.array([(n - 1) / 2 for n in volume.shape], dtype=np.float64)
    offset = centre - matrix @ centre
    return ndimage.affine_transform(volume, matrix, offset=offset, order=order, cval=cval, mode="constant")


def _line_integral(hu: np.ndarray, spacing: float, axis: int, kvp: float) -> np.ndarray:
    """Beer-Lambert line integral along `axis` at `kvp`: soft tissue scaled as water is, bone more steeply (its
    photoelectric share falls with energy), both equal to the CT's attenuation at REFERENCE_KVP."""
    soft = np.clip(WATER_MU_PER_MM * (1.0 + np.minimum(hu, BONE_HU) / 1000.0), 0.0, None)
    bone = WATER_MU_PER_MM * np.maximum(hu - BONE_HU, 0.0) / 1000.0
    ratio = REFERENCE_KVP / kvp
    line = ratio**0.3 * (soft.sum(axis=axis, dtype=np.float64) + ratio**1.6 * bone.sum(axis=axis, dtype=np.float64))
    return (line * spacing).astype(np.float32)


def _affine_2d(
    image: np.ndarray, degrees: float, shift_mm: tuple[float, float], spacing: tuple[float, float], order: int
) -> np.ndarray:
    """Rotate about the image centre by `degrees` and shift by `shift_mm` (rows, cols), in physical coordinates."""
    if not degrees and not any(shift_mm):
        return image
    a = math.radians(degrees)
    sr, sc = spacing
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    matrix = np.diag([1 / sr, 1 / sc]) @ rot @ np.diag([sr, sc])
    centre = np.array([(n - 1) / 2 for n in image.shape], dtype=np.float64)
    shift = np.array([shift_mm[0] / sr, shift_mm[1] / sc])
    offset = centre - matrix @ (centre + shift)
    return ndimage.affine_transform(image, matrix, offset=offset, order=order, cval=0.0, mode="constant")


def _field(lungs: np.ndarray, acq: RadiographAcquisition, spacing: tuple[float, float]) -> np.ndarray:
    """The collimated field (float, soft-edged): a rectangle `field_margin_mm` beyond the lung fields' box."""
    shape = lungs.shape
    if acq.field_margin_mm is None or not lungs.any():
        return np.ones(shape, dtype=np.float32)
    rows, cols = np.flatnonzero(lungs.any(axis=1)), np.flatnonzero(lungs.any(axis=0))
    top, bottom, left, right = acq.field_margin_mm
    sr, sc = spacing
    box = np.zeros(shape, dtype=np.float32)
    r0, r1 = max(0, round(rows[0] - top / sr)), min(shape[0], round(rows[-1] + 1 + bottom / sr))
    c0, c1 = max(0, round(cols[0] - left / sc)), min(shape[1], round(cols[-1] + 1 + right / sc))
    box[r0:r1, c0:c1] = 1.0
    return ndimage.gaussian_filter(box, (PENUMBRA_MM / sr, PENUMBRA_MM / sc), mode="nearest")


def _marker(
    lungs: np.ndarray, field: np.ndarray, acq: RadiographAcquisition, spacing: tuple[float, float], view: str
) -> np.ndarray:
    """The lead letter's footprint (bool): in an upper corner of the field, clear of the lung fields; on a PA the
    patient's left is the image's right, where an L goes first (an R first on the left). Empty when none fits."""
    out = np.zeros(lungs.shape, dtype=bool)
    if not acq.marker:
        return out
    sr, sc = spacing
    letter = np.array([[c == "1" for c in row] for row in _LETTERS[acq.marker]], dtype=np.float32)
    h = max(3, round(acq.marker_mm / sr))
    w = max(2, round(acq.marker_mm * 5 / 7 / sc))
    glyph = (
        ndimage.zoom(letter, (h / letter.shape[0], w / letter.shape[1]), order=0, grid_mode=True, mode="grid-constant")
        > 0.5
    )
    h, w = glyph.shape
    exposed = field >= 0.5
    rows, cols = np.flatnonzero(exposed.any(axis=1)), np.flatnonzero(exposed.any(axis=0))
    inset_r, inset_c = max(1, round(6.0 / sr)), max(1, round(6.0 / sc))
    keep_clear = ndimage.binary_dilation(lungs, iterations=max(1, round(8.0 / min(sr, sc))))
    top = int(rows[0]) + inset_r
    left, right = int(cols[0]) + inset_c, int(cols[-1]) + 1 - inset_c - w
    corners = [right, left] if (acq.marker == "L") == (view == "PA") else [left, right]
    for c in corners:
        if top < 0 or c < 0 or top + h > lungs.shape[0] or c + w > lungs.shape[-1]:
            continue
        box = (slice(top, top + h), slice(c, c + w))
        if keep_clear[box].any() or not exposed[box].all():
            continue
        out[box] = glyph
        return out
    return out


def _expose(
    line: np.ndarray,
    acq: RadiographAcquisition,
    spacing: tuple[float, float],
    field: np.ndarray,
    marker: np.ndarray,
    normals: np.ndarray,
    row_gain: np.ndarray,
) -> np.ndarray:
    """Line integral -> presentation values in [0, 1]: primary and scatter through the grid onto the detector,
    quantum and read noise (from the given standard normals, so healthy and lesion renderings share them),
    detector blur, window and gamma, electronic shutter."""
    sr, sc = spacing
    air = acq.fluence * sr * sc  # photons per pixel without the patient
    transmitted = np.exp(-line.astype(np.float64)) * field
    interacting = air * (field - transmitted)  # photons the body absorbed or scattered
    primary = air * transmitted * (GRID_PRIMARY if acq.grid else 1.0)
    if marker.any():
        primary *= 1.0 - MARKER_ATTENUATION * marker
    total = primary
    if acq.scatter > 0:
        veil = ndimage.gaussian_filter(interacting, (acq.scatter_mm / sr, acq.scatter_mm / sc), mode="constant")
        total = total + acq.scatter * (GRID_SCATTER if acq.grid else 1.0) * veil
    if acq.grid_lines:
        cols = np.arange(line.shape[1])
        total = total * (
            1.0 - acq.grid_line_depth * (0.5 + 0.5 * np.cos(2 * np.pi * cols / acq.grid_period_px + acq.grid_phase))
        )
    if acq.line_gain > 0:
        total = total * (1.0 + acq.line_gain * row_gain)[:, None]
    counts = total + np.sqrt(total + acq.read_noise**2) * normals
    measured = -np.log(np.maximum(counts, 0.5) / air)
    measured = ndimage.gaussian_filter(measured, (acq.blur_mm / sr, acq.blur_mm / sc))
    out = np.clip(measured / acq.window, 0.0, 1.0) ** acq.gamma
    if acq.dark_shutter:
        out[field < 0.5] = 0.0
    return out.astype(np.float32)


def make_radiograph(
    seed: int,
    rows: int = 512,
    cols: int = 512,
    lesions: str = "none",
    *,
    keep_healthy: bool = False,
    keep_line_integral: bool = False,
    native: int = 256,
    view: str = "PA",
    ranges: RadiographRanges = TYPICAL_RADIOGRAPHS,
    acquisition: RadiographAcquisition | None = None,
) -> Radiograph:
    """A chest radiograph of one subject (seeded): projection through the CT phantom, acquired as drawn from
    `ranges` (or as `acquisition` says), presented.

    The phantom is built at up to `native` pixels per side (the projection grid) and the image is resampled to
    rows x cols; the lesion mask covers every output pixel whose line integral the lesions change.
    """
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; choose from {', '.join(VIEWS)}")
    rng = np.random.default_rng(seed)
    sub = draw_subject(rng)
    margin, z_offset = rng.uniform(30, 70), rng.uniform(-10, 20)
    anatomy_seed, lesion_seed, noise_seed = (int(s) for s in rng.integers(2**63, size=3))
    acq = acquisition or draw_acquisition(np.random.default_rng([seed, ACQUISITION_STREAM]), ranges)
    sub = breathe(sub, acq.inspiration_mm)
    n_z, n_c = min(rows, native), min(cols, native)
    width = 2 * sub.body_ax + margin
    height = width * rows / cols
    z_center = (sub.lung_base + sub.lung_apex) / 2 + z_offset
    grid, axis = _projection_grid(sub, view, n_z, n_c, width, height, z_center, acq.axial_deg)
    anatomy_rng, lesion_rng = np.random.default_rng(anatomy_seed), np.random.default_rng(lesion_seed)
    ideal_healthy, lung = render_anatomy(sub, grid, anatomy_rng)
    ideal, lesion3d, found = add_lesions(ideal_healthy, lung, grid, lesions, lesion_rng)
    hidden = _hidden_lung(sub, grid) if view == "PA" else np.zeros((1, 1, 1), dtype=bool)
    want_healthy = keep_healthy or keep_line_integral
    if abs(acq.axial_deg) > 1e-3:
        turn = acq.axial_deg

        def rotate(v: np.ndarray, order: int, cval: float) -> np.ndarray:
            return _rotate_about_z(v, grid, turn, order, cval)

        codes = rotate(lung.astype(np.uint8) + 2 * np.broadcast_to(hidden, lung.shape).astype(np.uint8), 0, 0)
        lung, hidden = (codes & 1).astype(bool), (codes & 2).astype(bool)
        if lesion3d.any():
            lesion3d = rotate(lesion3d.astype(np.float32), 1, 0.0) > 0
            ideal = rotate(ideal, 1, -1000.0)
        ideal_healthy = rotate(ideal_healthy, 1, -1000.0)
        if not found:
            ideal = ideal_healthy
    spacing_d = grid.spacing[axis]
    # rows run from head to feet, so the grid's z axis (built upwards) is flipped
    line = _line_integral(ideal, spacing_d, axis, acq.kvp)[::-1]
    line_healthy = _line_integral(ideal_healthy, spacing_d, axis, acq.kvp)[::-1] if want_healthy else None
    lesion2d = np.any(lesion3d, axis=axis)[::-1]
    lung_all = np.any(lung, axis=axis)[::-1]
    lung2d = lung_all & ~np.any(hidden, axis=axis)[::-1] if view == "PA" else lung_all
    spacing = (grid.spacing[0], width / n_c)

    def place(image: np.ndarray, order: int) -> np.ndarray:
        return _affine_2d(np.ascontiguousarray(image), acq.tilt_deg, acq.shift_mm, spacing, order)

    line = place(line, 1)
    line_healthy = place(line_healthy, 1) if line_healthy is not None else None
    lesion2d = place(lesion2d.astype(np.float32), 1) > 0
    lung2d = place(lung2d.astype(np.float32), 1) >= 0.5
    lung_all = place(lung_all.astype(np.float32), 1) >= 0.5
    field = _field(lung_all, acq, spacing)  # collimated to the whole lungs, recesses included
    marker = _marker(lung_all, field, acq, spacing, view)
    noise_rng = np.random.default_rng(noise_seed)
    normals, row_gain = noise_rng.standard_normal(line.shape), noise_rng.standard_normal((line.shape[0],))

    def render(integral: np.ndarray) -> np.ndarray:
        return _resize(_expose(integral, acq, spacing, field, marker, normals, row_gain), rows, cols)

    image = render(line)
    healthy = render(line_healthy) if keep_healthy and line_healthy is not None else None
    zoomed = (rows, cols) != (n_z, n_c)
    exposed = field >= 0.5
    lesion2d &= exposed
    lung2d &= exposed
    return Radiograph(
        image=image,
        lesion_mask=_resize(lesion2d.astype(np.float32), rows, cols) > 0 if zoomed else lesion2d,
        lung_mask=_resize(lung2d.astype(np.float32), rows, cols) >= 0.5 if zoomed else lung2d,
        pixel_spacing=(height / rows, width / cols),
        lesions=found,
        seed=seed,
        view=view,
        acquisition=acq,
        field_mask=_resize(exposed.astype(np.float32), rows, cols) >= 0.5 if zoomed else exposed,
        marker_mask=_resize(marker.astype(np.float32), rows, cols) >= 0.5 if zoomed else marker,
        healthy_image=healthy,
        line_integral=line if keep_line_integral else None,
        healthy_line_integral=line_healthy if keep_line_integral else None,
    )


def _resize(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    if img.shape == (rows, cols):
        return img.astype(np.float32)
    out = ndimage.zoom(img, (rows / img.shape[0], cols / img.shape[1]), order=1, grid_mode=True, mode="nearest")
    return out[:rows, :cols].astype(np.float32)
