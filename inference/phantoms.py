"""Synthetic chest CT series and chest radiographs with exact ground truth (no patient data anywhere).

Why: the method is trained on healthy images and measured on lesions, and no patient data may reach
this project, so both come from here. A subject is drawn from a seed (body size, fat and muscle layers,
lungs with a domed diaphragm, branching vessel and airway trees, ribs, spine, sternum, heart,
mediastinum and aorta); lesions (solid nodules, ground-glass opacities, consolidation, reticular
patterns) are painted into the lungs with their exact masks; a scanner model (blur, edge enhancement,
correlated noise) renders it. Radiographs are Beer-Lambert line integrals through the same subjects
(inference/radiograph_phantoms.py).

Ground truth is defined on the ideal (noise-free) phantom: a lesion case differs from its healthy
counterpart only inside the lesion mask. Acquisition uses its own random stream, so healthy and lesion
renderings of one subject share the same noise.

Coordinates are patient LPS millimetres relative to the body centre: x to the patient's left, y to the
posterior, z to the head. Volumes are indexed (z, y, x) with z increasing with the index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)
from scipy import ndimage

if TYPE_CHECKING:
    from inference.radiograph_phantoms import Radiograph

LESION_KINDS = ("nodule", "ggo", "consolidation", "reticular")
LESION_CHOICES = ("none", *LESION_KINDS, "mixed")
WATER_MU_PER_MM = 0.0195  # linear attenuation of water around 70 keV


@dataclass(frozen=True)
class Scanner:
    """How a scanner and reconstruction kernel render the ideal phantom."""

    name: str
    kernel: str
    blur_mm: float  # Gaussian point-spread sigma, in plane
    sharpen: float  # edge enhancement of sharp kernels (unsharp-mask gain)
    noise_hu: float  # noise standard deviation inside the body
    grain_mm: float  # noise correlation length (soft kernels: coarse grain)
    kvp: int


SCANNERS = (
    Scanner("Synthetic-A 64", "STANDARD", 0.9, 0.0, 12.0, 0.9, 120),
    Scanner("Synthetic-A 64", "LUNG", 0.5, 0.6, 28.0, 0.45, 120),
    Scanner("Synthetic-B 128", "B30f", 0.8, 0.0, 9.0, 0.8, 120),
    Scanner("Synthetic-B 128", "B70f", 0.45, 0.8, 35.0, 0.4, 100),
    Scanner("Synthetic-C 16", "SOFT", 1.2, 0.0, 18.0, 1.1, 140),
    Scanner("Synthetic-C 16", "SHARP", 0.6, 0.5, 24.0, 0.55, 120),
)


# A range a phantom parameter is drawn from: one interval, or several disjoint ones (a shifted range that lies
# on both sides of the training range). Drawn with `draw_in`.
Span = tuple[tuple[float, float], ...]

# Scanners and kernels no training phantom is rendered with: each has noise outside the training scanners'
# 9-35 HU and a kernel outside their blur (0.45-1.2 mm) or edge enhancement (0-0.8) ranges.
SHIFTED_SCANNERS = (
    Scanner("Synthetic-D 320", "LD-SHARP", 0.35, 1.1, 55.0, 0.35, 100),  # low dose, very sharp kernel
    Scanner("Synthetic-D 320", "LD-SOFT", 1.35, 0.0, 45.0, 1.2, 80),  # low dose at 80 kVp, soft kernel
    Scanner("Synthetic-E 256", "SMOOTH", 1.6, 0.0, 5.0, 1.5, 140),  # high dose, very smooth iterative look
    Scanner("Synthetic-E 256", "EDGE", 0.6, 1.4, 40.0, 0.5, 120),  # strong edge enhancement
)


@dataclass(frozen=True)
class Ranges:
    """Where a CT phantom's random draws fall: subjects, scanners, lesion sizes and densities.

    Why: the model learns "healthy" from phantoms drawn in TRAINING; the evaluation's out-of-distribution set is
    drawn in SHIFTED, outside every one of those ranges, to show how a model behaves on images unlike its training
    data. TRAINING repeats the draws the phantoms always made, call for call, so a seed renders byte for byte the
    same phantom as before these ranges existed (the shipped model's training data does not change).
    """

    name: str
    body_scale: Span  # overall subject size (body, lungs, heart, z extent scale with it)
    scanners: tuple[Scanner, ...]
    nodule_mm: Span  # lesion diameter / extent per kind
    ggo_mm: Span
    consolidation_mm: Span
    reticular_mm: Span
    nodule_hu: Span  # solid nodule density
    ggo_lift_hu: Span  # how much ground glass raises the lung's HU
    consolidation_hu: Span
    reticular_hu: Span  # density of the reticular lines

    def size_mm(self, kind: str) -> Span:
        return self._per_kind(kind, "mm")

    def density_hu(self, kind: str) -> Span:
        return self._per_kind(kind, "lift_hu" if kind == "ggo" else "hu")

    def _per_kind(self, kind: str, suffix: str) -> Span:
        if kind not in LESION_KINDS:
            raise ValueError(f"unknown lesion kind {kind!r}; choose from {', '.join(LESION_KINDS)}")
        span: Span = getattr(self, f"{kind}_{suffix}")
        return span


TRAINING = Ranges(
    name="training",
    body_scale=((0.88, 1.12),),
    scanners=SCANNERS,
    nodule_mm=((6.0, 28.0),),
    ggo_mm=((15.0, 45.0),),
    consolidation_mm=((30.0, 70.0),),
    reticular_mm=((40.0, 80.0),),
    nodule_hu=((15.0, 60.0),),
    ggo_lift_hu=((200.0, 380.0),),
    consolidation_hu=((20.0, 50.0),),
    reticular_hu=((-250.0, -80.0),),
)

SHIFTED = Ranges(
    name="shifted",
    body_scale=((0.78, 0.86), (1.14, 1.3)),  # smaller and larger people than any training subject
    scanners=SHIFTED_SCANNERS,
    nodule_mm=((3.5, 5.5), (30.0, 40.0)),
    ggo_mm=((8.0, 14.0), (48.0, 65.0)),
    consolidation_mm=((15.0, 28.0), (75.0, 95.0)),
    reticular_mm=((22.0, 38.0), (85.0, 110.0)),
    nodule_hu=((-200.0, 0.0), (80.0, 200.0)),  # part-solid and calcified-dense nodules
    ggo_lift_hu=((130.0, 190.0), (400.0, 520.0)),  # fainter and denser ground glass
    consolidation_hu=((-80.0, 10.0), (60.0, 120.0)),
    reticular_hu=((-420.0, -270.0), (-60.0, 20.0)),
)

RANGES = {r.name: r for r in (TRAINING, SHIFTED)}


def draw_in(rng: np.random.Generator, span: Span) -> float:
    """One uniform draw from a span. One interval: exactly `rng.uniform(lo, hi)` (the draws TRAINING repeats);
    several: uniform over their union by length, still one draw from the stream."""
    if len(span) == 1:
        lo, hi = span[0]
        return float(rng.uniform(lo, hi))
    widths = [hi - lo for lo, hi in span]
    u = float(rng.uniform(0.0, sum(widths)))
    for (lo, _hi), width in zip(span, widths, strict=True):
        if u <= width:
            return lo + u
        u -= width
    return span[-1][1]


@dataclass(frozen=True)
class Grid:
    """A sampling grid: shape (z, y, x), spacing in mm, and the mm position of index 0 per axis."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axis(self, i: int) -> np.ndarray:
        return (self.origin[i] + self.spacing[i] * np.arange(self.shape[i])).astype(np.float32)

    def coords(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable z (nz,1,1), y (1,ny,1), x (1,1,nx) coordinates in mm."""
        return self.axis(0)[:, None, None], self.axis(1)[None, :, None], self.axis(2)[None, None, :]

    def index_range(self, i: int, lo: float, hi: float) -> slice:
        a = max(0, math.floor((lo - self.origin[i]) / self.spacing[i]))
        b = min(self.shape[i], math.ceil((hi - self.origin[i]) / self.spacing[i]) + 1)
        return slice(a, max(a, b))


@dataclass
class Subject:
    """Anatomy of one synthetic person, all lengths in mm (drawn by `draw_subject`)."""

    body_ax: float
    body_ay: float
    fat: float
    muscle: float
    lung_ax: float
    lung_ay: float
    lung_x: float
    lung_y: float
    lung_base: float  # z of the lowest point of the lungs (costophrenic recess)
    lung_apex: float
    dome: tuple[float, float]  # diaphragm dome height, right and left
    heart: tuple[float, float, float, float, float, float]  # centre x, y, z and semi-axes
    carina_z: float
    rib_spacing: float
    rib_top: float
    rib_slope: float  # how far a rib descends from back to front
    parenchyma_hu: float
    tree_seed: int


@dataclass
class Lesion:
    kind: str
    center_mm: tuple[float, float, float]
    size_mm: float  # diameter (nodule) or extent
    voxels: int = 0


@dataclass
class CTPhantom:
    """An acquired CT volume in HU with its ground truth."""

    hu: np.ndarray  # float32 (z, y, x)
    lesion_mask: np.ndarray  # bool (z, y, x)
    lung_mask: np.ndarray  # bool (z, y, x)
    grid: Grid
    lesions: list[Lesion]
    scanner: Scanner
    seed: int
    healthy_hu: np.ndarray | None = None  # the same subject and noise without lesions, when asked for
    ideal_hu: np.ndarray | None = None  # before acquisition, when asked for
    ideal_healthy_hu: np.ndarray | None = None

    @property
    def slice_labels(self) -> np.ndarray:
        return np.any(self.lesion_mask, axis=(1, 2))


def draw_subject(rng: np.random.Generator, ranges: Ranges = TRAINING) -> Subject:
    """Anatomical variation between people: size, habitus, lung and heart shape, ribs."""
    s = draw_in(rng, ranges.body_scale)  # overall size
    body_ax = 165.0 * s * rng.uniform(0.92, 1.08)
    body_ay = body_ax * rng.uniform(0.62, 0.78)
    fat = rng.uniform(5.0, 28.0)
    muscle = rng.uniform(8.0, 15.0)
    lung_ax = (body_ax - fat - muscle - 25.0) * rng.uniform(0.48, 0.56)
    lung_ay = (body_ay - fat - muscle - 15.0) * rng.uniform(0.78, 0.9)
    lung_x = lung_ax * rng.uniform(1.05, 1.2)
    heart_ax = 58.0 * s * rng.uniform(0.9, 1.15)
    lung_base = -110.0 * s + rng.uniform(-10, 10)
    lung_apex = 125.0 * s + rng.uniform(-10, 10)
    return Subject(
        body_ax=body_ax,
        body_ay=body_ay,
        fat=fat,
        muscle=muscle,
        lung_ax=lung_ax,
        lung_ay=lung_ay,
        lung_x=lung_x,
        lung_y=rng.uniform(0.0, 10.0),
        lung_base=lung_base,
        lung_apex=lung_apex,
        dome=(rng.uniform(45, 65), rng.uniform(35, 55)),
        heart=(
            rng.uniform(15, 35),
            -rng.uniform(20, 35),
            lung_base + rng.uniform(70, 95),
            heart_ax,
            heart_ax * rng.uniform(0.75, 0.9),
            heart_ax * rng.uniform(0.85, 1.0),
        ),
        carina_z=lung_base + (lung_apex - lung_base) * rng.uniform(0.6, 0.68),
        rib_spacing=rng.uniform(19.0, 25.0),
        rib_top=lung_apex + rng.uniform(0, 15),
        rib_slope=rng.uniform(90, 130),
        parenchyma_hu=rng.uniform(-880, -830),
        tree_seed=int(rng.integers(2**31)),
    )


def lung_contains(sub: Subject, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The analytic lungs (vessels inside count as lung): boolean of broadcast x, y, z in mm."""
    t = np.clip((z - sub.lung_base) / (sub.lung_apex - sub.lung_base), 0.0, 1.0)
    width = np.sqrt(np.clip((1.0 - t) / 0.4, 0.0, 1.0)) * (0.92 + 0.08 * (1.0 - t))
    inside = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z)), dtype=bool)
    hx, hy, hz, hax, hay, haz = sub.heart
    heart = ((x - hx) / (hax + 4)) ** 2 + ((y - hy) / (hay + 4)) ** 2 + ((z - hz) / (haz + 4)) ** 2 <= 1
    for side, dome in ((-1, sub.dome[0]), (1, sub.dome[1])):
        cx, cy = side * sub.lung_x, sub.lung_y
        ax, ay = sub.lung_ax * width + 1e-3, sub.lung_ay * width + 1e-3
        dx, dy = np.abs(x - cx) / ax, np.abs(y - cy) / ay
        section = dx**2.4 + dy**2.4 <= 1.0
        r2 = ((x - cx) / sub.lung_ax) ** 2 + ((y - cy) / sub.lung_ay) ** 2
        above_diaphragm = z > sub.lung_base + dome * np.clip(1.0 - r2, 0.0, 1.0)
        medial = side * x > 18.0 + 10.0 * np.clip(1 - np.abs(z - sub.carina_z) / 60.0, 0, 1)
        inside |= section & above_diaphragm & medial
    spine = x**2 + (y - (sub.body_ay - sub.fat - sub.muscle - 45.0)) ** 2 <= 32.0**2
    return inside & ~heart & ~spine


def _lung_contains_point(sub: Subject, x: float, y: float, z: float) -> bool:
    """`lung_contains` for one point in plain floats: the branching trees ask it ~7000 times a subject, where
    numpy's per-call overhead made it most of a phantom's render time. Same arithmetic, same answers."""
    t = min(max((z - sub.lung_base) / (sub.lung_apex - sub.lung_base), 0.0), 1.0)
    width = math.sqrt(min(max((1.0 - t) / 0.4, 0.0), 1.0)) * (0.92 + 0.08 * (1.0 - t))
    hx, hy, hz, hax, hay, haz = sub.heart
    if ((x - hx) / (hax + 4)) ** 2 + ((y - hy) / (hay + 4)) ** 2 + ((z - hz) / (haz + 4)) ** 2 <= 1:
        return False
    if x**2 + (y - (sub.body_ay - sub.fat - sub.muscle - 45.0)) ** 2 <= 32.0**2:
        return False
    for side, dome in ((-1, sub.dome[0]), (1, sub.dome[1])):
        cx, cy = side * sub.lung_x, sub.lung_y
        ax, ay = sub.lung_ax * width + 1e-3, sub.lung_ay * width + 1e-3
        dx, dy = abs(x - cx) / ax, abs(y - cy) / ay
        if not dx**2.4 + dy**2.4 <= 1.0:
            continue
        r2 = ((x - cx) / sub.lung_ax) ** 2 + ((y - cy) / sub.lung_ay) ** 2
        if not z > sub.lung_base + dome * min(max(1.0 - r2, 0.0), 1.0):
            continue
        if side * x > 18.0 + 10.0 * min(max(1 - abs(z - sub.carina_z) / 60.0, 0), 1):
            return True
    return False


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    """Unit-variance Gaussian random field with correlation lengths `sigma` (voxels), made coarse then zoomed."""
    factors = [max(1, int(s // 1.5)) for s in sigma]
    coarse_shape = [max(2, -(-n // f) + 1) for n, f in zip(shape, factors, strict=True)]
    coarse = rng.standard_normal(coarse_shape).astype(np.float32)
    coarse = ndimage.gaussian_filter(coarse, [s / f for s, f in zip(sigma, factors, strict=True)], mode="wrap")
    zoom = [n / c for n, c in zip(shape, coarse_shape, strict=True)]
    fine = ndimage.zoom(coarse, [max(z, 1e-6) for z in zoom], order=1, grid_mode=True, mode="grid-wrap")
    fine = fine[tuple(slice(0, n) for n in shape)]
    if fine.shape != tuple(shape):
        fine = np.pad(fine, [(0, n - m) for n, m in zip(shape, fine.shape, strict=True)], mode="edge")
    std = float(fine.std()) or 1.0
    return ((fine - fine.mean()) / std).astype(np.float32)


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """np.cross of two 3-vectors, term for term as numpy computes it, without its per-call axis handling."""
    a0, a1, a2 = (float(v) for v in a)
    b0, b1, b2 = (float(v) for v in b)
    return np.array([a1 * b2 - a2 * b1, a2 * b0 - a0 * b2, a0 * b1 - a1 * b0])


@dataclass
class _Segment:
    p0: np.ndarray
    p1: np.ndarray
    r0: float
    r1: float


def _grow_tree(
    rng: np.random.Generator,
    sub: Subject,
    root: np.ndarray,
    direction: np.ndarray,
    length: float,
    radius: float,
    generations: int,
    min_radius: float,
) -> list[_Segment]:
    """A dichotomous branching tree (vessels or airways) that fills the lung: children turn 15-45 degrees,
    lean away from the root and shrink; a branch that would leave the lung tries other directions."""
    out: list[_Segment] = []
    stack = [(root, direction / np.linalg.norm(direction), length, radius, 0)]
    while stack:
        p0, d, ln, r, gen = stack.pop()
        p1 = p0 + d * ln
        if gen > 0 and not _lung_contains_point(sub, float(p1[0]), float(p1[1]), float(p1[2])):
            continue
        out.append(_Segment(p0, p1, r, r * 0.9))
        if gen >= generations or r * 0.75 < min_radius:
            continue
        away = p1 - root
        away /= np.linalg.norm(away) + 1e-9
        for sign in (-1.0, 1.0):
            for _ in range(3):
                perp = _cross(d, rng.normal(size=3))
                perp /= np.linalg.norm(perp) + 1e-9
                angle = math.radians(rng.uniform(15, 45))
                child = d * math.cos(angle) + sign * perp * math.sin(angle) + 0.35 * away
                child /= np.linalg.norm(child)
                child_len = ln * rng.uniform(0.75, 0.88)
                end = p1 + child * child_len
                if _lung_contains_point(sub, float(end[0]), float(end[1]), float(end[2])):
                    stack.append((p1, child, child_len, r * rng.uniform(0.72, 0.8), gen + 1))
                    break
    return out


def _paint_segments(
    vol: np.ndarray,
    grid: Grid,
    segments: list[_Segment],
    value: float,
    where: np.ndarray | None,
    radius_scale: float = 1.0,
) -> None:
    """Set voxels inside each tapered capsule (optionally only where `where`) to `value`, box by box."""
    axes = [grid.axis(i) for i in range(3)]
    for seg in segments:
        rmax = max(seg.r0, seg.r1) * radius_scale
        lo = np.minimum(seg.p0, seg.p1) - rmax
        hi = np.maximum(seg.p0, seg.p1) + rmax
        # points are (x, y, z); the grid is (z, y, x)
        box = (grid.index_range(0, lo[2], hi[2]), grid.index_range(1, lo[1], hi[1]), grid.index_range(2, lo[0], hi[0]))
        if any(b.stop <= b.start for b in box):
            continue
        z = axes[0][box[0]][:, None, None] - seg.p0[2]
        y = axes[1][box[1]][None, :, None] - seg.p0[1]
        x = axes[2][box[2]][None, None, :] - seg.p0[0]
        v = seg.p1 - seg.p0
        vv = float(v @ v) or 1e-9
        t = np.clip((x * v[0] + y * v[1] + z * v[2]) / vv, 0.0, 1.0)
        d2 = (x - t * v[0]) ** 2 + (y - t * v[1]) ** 2 + (z - t * v[2]) ** 2
        r = (seg.r0 + t * (seg.r1 - seg.r0)) * radius_scale
        inside = d2 <= r * r
        if where is not None:
            inside &= where[box]
        vol[box][inside] = value


def _trees(sub: Subject) -> tuple[list[_Segment], list[_Segment]]:
    """Pulmonary vessel trees and the airway tree of a subject, from its own seed."""
    rng = np.random.default_rng(sub.tree_seed)
    vessels: list[_Segment] = []
    airways: list[_Segment] = []
    carina = np.array([0.0, -5.0 + sub.lung_y, sub.carina_z])
    for side in (-1.0, 1.0):
        hilum = np.array([side * (sub.lung_x - sub.lung_ax * 0.45), sub.lung_y, sub.carina_z - 25.0])
        for up, front in ((1.0, 0.0), (0.3, -0.8), (0.3, 0.8), (-0.5, -0.6), (-0.5, 0.6), (-1.0, 0.0)):
            d = np.array([side * 0.7, front, up]) + rng.normal(0, 0.2, 3)
            vessels += _grow_tree(rng, sub, hilum, d, 18.0, 5.0, 9, 0.55)
        d = hilum - carina
        airways.append(_Segment(carina, hilum, 7.0, 6.0))
        for up in (1.0, -1.0):
            child = d / np.linalg.norm(d) + np.array([0.0, 0.0, up])
            airways += _grow_tree(rng, sub, hilum, child, 20.0, 4.5, 3, 1.2)
    return vessels, airways


def render_anatomy(sub: Subject, grid: Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The ideal healthy volume in HU and its lung mask on `grid`."""
    z, y, x = grid.coords()
    shape = grid.shape
    hu = np.full(shape, -1000.0, dtype=np.float32)
    # the chest narrows towards the neck above the lung apices
    body_ax = sub.body_ax * (1.0 - 0.55 * np.clip((z - sub.lung_apex + 25.0) / 70.0, 0.0, 1.0))
    r_body = (x / body_ax) ** 2 + (y / sub.body_ay) ** 2
    body = np.broadcast_to(r_body <= 1.0, shape)
    hu[body] = -100.0  # subcutaneous fat
    in_ax, in_ay = body_ax - sub.fat, sub.body_ay - sub.fat
    muscle = np.broadcast_to((x / in_ax) ** 2 + (y / in_ay) ** 2 <= 1.0, shape)
    hu[muscle] = 50.0
    cav_ax, cav_ay = in_ax - sub.muscle - 12.0, in_ay - sub.muscle - 12.0
    r_cav = (x / cav_ax) ** 2 + (y / cav_ay) ** 2
    cavity = np.broadcast_to(r_cav <= 1.0, shape)
    hu[cavity] = 30.0  # mediastinal soft tissue; below the diaphragm, abdomen
    abdomen = cavity & (z < sub.lung_base + 0.8 * sub.dome[0])
    hu[abdomen] = 55.0

    # Spine: vertebral bodies with discs, canal, posterior elements.
    vy = sub.body_ay - sub.fat - sub.muscle - 45.0
    vert_phase = np.mod(z - sub.lung_base, 28.0)
    disc = np.broadcast_to(vert_phase < 5.0, shape)
    rv = np.sqrt(x**2 + (y - vy) ** 2)
    vbody = np.broadcast_to(rv <= 18.0, shape)
    hu[vbody] = 250.0
    hu[vbody & np.broadcast_to(rv > 15.5, shape)] = 700.0
    hu[vbody & disc] = 90.0
    canal_r = np.sqrt(x**2 + (y - vy - 27.0) ** 2)
    arch = np.broadcast_to((canal_r <= 13.0) | ((np.abs(x) < 5.0) & (y > vy + 30) & (y < vy + 55)), shape)
    hu[arch & ~disc] = 500.0
    hu[np.broadcast_to(canal_r <= 8.0, shape)] = 20.0

    # Ribs: bands around the cavity wall that descend from back to front.
    theta = np.pi - np.abs(np.arctan2(x, y))  # 0 at the spine (posterior), pi at the sternum
    rib_r = np.sqrt(r_cav)
    wall = (rib_r > 1.0 + 2.0 / cav_ax) & (rib_r < 1.0 + 12.0 / cav_ax)
    z_along = z + sub.rib_slope * (theta / np.pi)  # a rib's z at the back = this value
    phase = np.mod(sub.rib_top - z_along, sub.rib_spacing)
    rib_band = (phase < 8.0) & (z_along < sub.rib_top + 2) & (z_along > sub.lung_base - 30)
    ribs = np.broadcast_to(wall & (theta < 0.82 * np.pi) & (theta > 0.12 * np.pi), shape) & rib_band
    hu[ribs & body] = 450.0
    sternum = (np.abs(x) < 14.0) & (y < -cav_ay + 2) & (y > -cav_ay - 12) & (z > sub.heart[2] - 30)
    hu[np.broadcast_to(sternum, shape)] = 350.0

    # Heart with a pericardial fat shell, aorta.
    hx, hy, hz, hax, hay, haz = sub.heart
    rh = ((x - hx) / hax) ** 2 + ((y - hy) / hay) ** 2 + ((z - hz) / haz) ** 2
    hu[(rh <= (1 + 4.0 / hax) ** 2) & cavity] = -90.0
    hu[rh <= 1.0] = 40.0
    desc = np.broadcast_to((x - 18.0) ** 2 + (y - (vy - 28.0)) ** 2 <= 13.0**2, shape) & np.broadcast_to(
        z < sub.carina_z + 30, shape
    )
    asc = np.broadcast_to((x + 5.0) ** 2 + (y + 20.0) ** 2 <= 15.0**2, shape) & np.broadcast_to(
        (z > hz) & (z < sub.carina_z + 30), shape
    )
    hu[(desc | asc) & cavity] = 45.0

    # Lungs: parenchyma with texture and a gravity gradient (dependent lung is denser).
    lung = lung_contains(sub, x, y, z) & cavity
    texture = _smooth_noise(rng, shape, (2.0 / grid.spacing[0], 3.0 / grid.spacing[1], 3.0 / grid.spacing[2]))
    gradient = np.broadcast_to(25.0 * (y / sub.lung_ay), shape)
    hu[lung] = (sub.parenchyma_hu + 18.0 * texture + gradient)[lung]

    # Airways: trachea above the carina, then the bronchial tree (wall, then air lumen).
    trachea_r = np.sqrt(x**2 + (y - (-5.0 + sub.lung_y)) ** 2)
    trachea = np.broadcast_to(z > sub.carina_z, shape) & np.broadcast_to(trachea_r <= 10.0, shape) & body
    hu[trachea] = 0.0
    hu[trachea & np.broadcast_to(trachea_r <= 8.0, shape)] = -1000.0
    vessels, airways = _trees(sub)
    _paint_segments(hu, grid, vessels, 40.0, cavity)
    _paint_segments(hu, grid, airways, -40.0, cavity)
    _paint_segments(hu, grid, airways, -1000.0, cavity, radius_scale=0.7)
    return hu, lung


def _random_lung_point(rng: np.random.Generator, lung: np.ndarray, grid: Grid) -> np.ndarray:
    idx = np.flatnonzero(lung)
    k = np.unravel_index(idx[rng.integers(len(idx))], lung.shape)
    return np.array([grid.axis(2)[k[2]], grid.axis(1)[k[1]], grid.axis(0)[k[0]]], dtype=np.float64)


def _lesion_box(grid: Grid, center: np.ndarray, radius: float) -> tuple[slice, slice, slice]:
    return (
        grid.index_range(0, center[2] - radius, center[2] + radius),
        grid.index_range(1, center[1] - radius, center[1] + radius),
        grid.index_range(2, center[0] - radius, center[0] + radius),
    )


def add_lesion(
    hu: np.ndarray,
    lung: np.ndarray,
    grid: Grid,
    kind: str,
    rng: np.random.Generator,
    mask: np.ndarray,
    ranges: Ranges = TRAINING,
) -> Lesion | None:
    """Paint one lesion of `kind` into `hu` (in place), inside the lungs; mark changed voxels in `mask`."""
    if kind not in LESION_KINDS:
        raise ValueError(f"unknown lesion kind {kind!r}; choose from {', '.join(LESION_KINDS)}")
    center = _random_lung_point(rng, lung, grid)
    size = draw_in(rng, ranges.size_mm(kind))
    radius = size / 2
    box = _lesion_box(grid, center, radius * 1.4 + 2)
    if any(b.stop - b.start < 1 for b in box):
        return None
    z = grid.axis(0)[box[0]][:, None, None] - center[2]
    y = grid.axis(1)[box[1]][None, :, None] - center[1]
    x = grid.axis(2)[box[2]][None, None, :] - center[0]
    local_shape = (len(z), y.shape[1], x.shape[2])
    sig = tuple(max(radius / 3, 2.0) / s for s in grid.spacing)
    wobble = _smooth_noise(rng, local_shape, sig)
    aniso = rng.uniform(0.75, 1.3, 3)
    r = np.sqrt((x / aniso[0]) ** 2 + (y / aniso[1]) ** 2 + (z / aniso[2]) ** 2) / radius
    lung_box = lung[box]
    region = hu[box]  # a view: painting changes hu
    if kind == "nodule":
        shape = (r + 0.12 * wobble) <= 1.0
        change = shape & lung_box
        region[change] = draw_in(rng, ranges.density_hu("nodule")) + 8.0 * wobble[change]
    elif kind == "ggo":
        shape = (r + 0.25 * wobble) <= 1.0
        change = shape & lung_box & (region < -300)  # vessels stay visible through ground glass
        lift = draw_in(rng, ranges.density_hu("ggo")) * np.clip(1.2 - r, 0.4, 1.0) + 25.0 * wobble
        region[change] = region[change] + np.maximum(lift[change], 120.0)
    elif kind == "consolidation":
        shape = (r + 0.3 * wobble) <= 1.0
        change = shape & lung_box
        region[change] = draw_in(rng, ranges.density_hu("consolidation")) + 10.0 * wobble[change]
    elif kind == "reticular":
        edge = ndimage.distance_transform_edt(lung_box, sampling=grid.spacing)
        fine = _smooth_noise(rng, local_shape, tuple(1.6 / s for s in grid.spacing))
        net = np.abs(fine) < 0.28  # the zero-set of a random field: a web of lines
        shape = (r + 0.2 * wobble <= 1.0) & (edge < rng.uniform(12, 22)) & net
        change = shape & lung_box & (region < -300)
        region[change] = draw_in(rng, ranges.density_hu("reticular")) + 30.0 * fine[change]
    else:
        raise ValueError(f"unknown lesion kind {kind!r}; choose from {', '.join(LESION_KINDS)}")
    n = int(change.sum())
    if n < 8:
        return None
    mask[box] |= change
    return Lesion(kind, (float(center[0]), float(center[1]), float(center[2])), float(size), n)


def add_lesions(
    hu: np.ndarray, lung: np.ndarray, grid: Grid, lesions: str, rng: np.random.Generator, ranges: Ranges = TRAINING
) -> tuple[np.ndarray, np.ndarray, list[Lesion]]:
    """A lesion case from a healthy ideal volume: (new hu, exact mask, lesion list). `hu` is not changed."""
    if lesions not in LESION_CHOICES:
        raise ValueError(f"unknown lesion type {lesions!r}; choose from {', '.join(LESION_CHOICES)}")
    out = hu.copy()
    mask = np.zeros(hu.shape, dtype=bool)
    found: list[Lesion] = []
    if lesions == "none" or not lung.any():
        return out, mask, found
    count = int(rng.integers(1, 4))
    for _ in range(count * 4):  # retries when a lesion lands where it cannot be seen
        kind = str(rng.choice(LESION_KINDS)) if lesions == "mixed" else lesions
        lesion = add_lesion(out, lung, grid, kind, rng, mask, ranges)
        if lesion is not None:
            found.append(lesion)
        if len(found) >= count:
            break
    return out, mask, found


def acquire_ct(hu: np.ndarray, grid: Grid, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """Render an ideal volume as a scanner would: in-plane blur, kernel sharpening, correlated noise."""
    sy, sx = grid.spacing[1], grid.spacing[2]
    blurred = ndimage.gaussian_filter(hu, (0.0, scanner.blur_mm / sy, scanner.blur_mm / sx))
    if scanner.sharpen > 0:
        wide = ndimage.gaussian_filter(blurred, (0.0, 1.5 / sy, 1.5 / sx))
        blurred += scanner.sharpen * (blurred - wide)
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, (0.0, scanner.grain_mm / sy, scanner.grain_mm / sx))
    noise *= scanner.noise_hu / (float(noise.std()) or 1.0)
    out = blurred + noise
    return np.clip(out, -1024.0, 3071.0).astype(np.float32)


def ct_grid(rows: int, cols: int, slices: int, rng: np.random.Generator, sub: Subject) -> Grid:
    """A scan of the chest: a 330-400 mm field of view and a z range from the apex to below the diaphragm."""
    fov = rng.uniform(330.0, 400.0) * max(1.0, (sub.body_ax * 2 + 20) / 330.0)
    pixel = fov / max(rows, cols)
    z_lo = sub.lung_base - rng.uniform(15, 30)
    z_hi = sub.lung_apex + rng.uniform(5, 20)
    thickness = (z_hi - z_lo) / slices
    return Grid(
        (slices, rows, cols),
        (thickness, pixel, pixel),
        (z_lo + thickness / 2, -pixel * (rows - 1) / 2, -pixel * (cols - 1) / 2),
    )


def make_ct(
    seed: int,
    rows: int = 512,
    cols: int = 512,
    slices: int = 80,
    lesions: str = "none",
    *,
    keep_healthy: bool = False,
    keep_ideal: bool = False,
    scanner: Scanner | None = None,
    ranges: Ranges = TRAINING,
) -> CTPhantom:
    """One subject's chest CT (seeded): anatomy, lesions of type `lesions`, scanner from the seed.

    `ranges`: where subject size, scanner and lesions are drawn from (TRAINING, or SHIFTED for images unlike the
    training data).
    """
    rng = np.random.default_rng(seed)
    sub = draw_subject(rng, ranges)
    grid = ct_grid(rows, cols, slices, rng, sub)
    chosen = scanner or ranges.scanners[int(rng.integers(len(ranges.scanners)))]
    anatomy_seed, lesion_seed, noise_seed = (int(s) for s in rng.integers(2**63, size=3))
    anatomy_rng, lesion_rng = np.random.default_rng(anatomy_seed), np.random.default_rng(lesion_seed)
    ideal_healthy, lung = render_anatomy(sub, grid, anatomy_rng)
    ideal, mask, found = add_lesions(ideal_healthy, lung, grid, lesions, lesion_rng, ranges)
    hu = acquire_ct(ideal, grid, chosen, np.random.default_rng(noise_seed))
    healthy = acquire_ct(ideal_healthy, grid, chosen, np.random.default_rng(noise_seed)) if keep_healthy else None
    return CTPhantom(
        hu=hu,
        lesion_mask=mask,
        lung_mask=lung,
        grid=grid,
        lesions=found,
        scanner=chosen,
        seed=seed,
        healthy_hu=healthy,
        ideal_hu=ideal if keep_ideal else None,
        ideal_healthy_hu=ideal_healthy if keep_ideal else None,
    )


# --- DICOM -----------------------------------------------------------------------------------------


def _base_dataset(sop_class: str, modality: str, study: dict[str, str], series_uid: str, number: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = study["patient_name"]
    ds.PatientID = study["patient_id"]
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study["study_uid"]
    ds.StudyDate = study["date"]
    ds.StudyTime = study["time"]
    ds.ReferringPhysicianName = ""
    ds.StudyID = study["study_id"]
    ds.AccessionNumber = study["accession"]
    ds.StudyDescription = "CHEST"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.SeriesDate = study["date"]
    ds.SeriesTime = study["time"]
    ds.BodyPartExamined = "CHEST"
    ds.Manufacturer = "edgenode phantoms"
    ds.InstitutionName = "Synthetic"
    ds.InstanceNumber = number
    ds.ContentDate = study["date"]
    ds.ContentTime = study["time"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BurnedInAnnotation = "NO"
    return ds


def synthetic_study(seed: int, index: int = 0) -> dict[str, str]:
    """Patient and study identifiers for a phantom: synthetic, derived from the seed, no real names."""
    rng = np.random.default_rng([seed, index, 7])
    day = datetime(2026, 1, 1) + timedelta(days=int(rng.integers(0, 300)), minutes=int(rng.integers(420, 1080)))
    return {
        "patient_name": f"PHANTOM^{seed}-{index}",
        "patient_id": f"PH{seed:06d}{index:04d}",
        "accession": f"A{seed % 10**6:06d}{index:04d}",
        "study_id": str(index + 1),
        "study_uid": generate_uid(entropy_srcs=[f"edgenode-phantom-study-{seed}-{index}"]),
        "date": day.strftime("%Y%m%d"),
        "time": day.strftime("%H%M%S"),
    }


def ct_datasets(ph: CTPhantom, study: dict[str, str]) -> list[Dataset]:
    """CT Image Storage, one dataset per slice, stored as signed 16-bit with slope 1 / intercept 0 (HU)."""
    series_uid = generate_uid()
    frame_uid = generate_uid()
    sz, sy, sx = ph.grid.spacing
    stored = np.round(ph.hu).astype(np.int16)
    out = []
    for k in range(ph.hu.shape[0]):
        ds = _base_dataset(CTImageStorage, "CT", study, series_uid, k + 1)
        ds.SeriesDescription = f"CHEST {ph.scanner.kernel}"
        ds.PatientPosition = "HFS"
        ds.ManufacturerModelName = ph.scanner.name
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.PixelSpacing = [round(sy, 6), round(sx, 6)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        z = ph.grid.origin[0] + k * sz
        ds.ImagePositionPatient = [round(ph.grid.origin[2], 4), round(ph.grid.origin[1], 4), round(z, 4)]
        ds.SliceThickness = round(sz, 4)
        ds.SliceLocation = round(z, 4)
        ds.KVP = ph.scanner.kvp
        ds.ConvolutionKernel = ph.scanner.kernel
        ds.AcquisitionNumber = 1
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        ds.PixelData = stored[k].tobytes()
        out.append(ds)
    return out


def radiograph_dataset(rx: Radiograph, study: dict[str, str], modality: str = "DX") -> Dataset:
    """A chest radiograph as DX (for presentation) or CR, 12-bit MONOCHROME2 (attenuation is bright), with its view
    (PA, or LL for a left lateral) and tube voltage."""
    modality = modality.upper()
    sop = DigitalXRayImageStorageForPresentation if modality == "DX" else ComputedRadiographyImageStorage
    ds = _base_dataset(sop, modality, study, generate_uid(), 1)
    lateral = rx.view != "PA"
    ds.SeriesDescription = f"CHEST {'LAT' if lateral else 'PA'} {modality}"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.ViewPosition = rx.view
    ds.PatientOrientation = ["P", "F"] if lateral else ["L", "F"]
    spacing = [round(rx.pixel_spacing[0], 6), round(rx.pixel_spacing[1], 6)]
    ds.ImagerPixelSpacing = spacing
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelSpacing = spacing
        ds.DetectorType = "DIRECT"
        ds.ImageLaterality = "U"
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = []
        ds.PresentationLUTShape = "IDENTITY"
        ds.LossyImageCompression = "00"
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "51185008", "SCT", "Chest"
        ds.AnatomicRegionSequence = [code]
        ds.PixelIntensityRelationship = "LIN"
        ds.PixelIntensityRelationshipSign = 1
    pixels = np.clip(np.round(rx.image * 4095.0), 0, 4095).astype(np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.KVP = round(rx.acquisition.kvp) if rx.acquisition is not None else 120
    ds.PixelData = pixels.tobytes()
    return ds


def write_study(
    out_dir: Path,
    modality: str,
    seed: int,
    index: int,
    lesions: str,
    size: int = 512,
    slices: int = 80,
) -> Path:
    """Generate one phantom study and write it as <out_dir>/<study>/NNNN.dcm + ground_truth.npz."""
    modality = modality.lower()
    case_seed = int(np.random.default_rng([seed, index]).integers(2**31))
    study = synthetic_study(seed, index)
    folder = out_dir / f"{modality}-{index:04d}-{lesions}"
    folder.mkdir(parents=True, exist_ok=True)
    if modality == "ct":
        ph = make_ct(case_seed, size, size, slices, lesions)
        datasets = ct_datasets(ph, study)
        truth: dict[str, Any] = {  # Any: numpy's stub would read a key as savez's allow_pickle
            "lesion_mask": ph.lesion_mask,
            "lung_mask": ph.lung_mask,
            "slice_labels": ph.slice_labels,
            "spacing_zyx_mm": np.array(ph.grid.spacing),
            "sop_instance_uids": np.array([str(ds.SOPInstanceUID) for ds in datasets]),
        }
        found = ph.lesions
    elif modality in ("dx", "cr"):
        from inference.radiograph_phantoms import make_radiograph

        rx = make_radiograph(case_seed, size, size, lesions)
        datasets = [radiograph_dataset(rx, study, modality)]
        truth = {
            "lesion_mask": rx.lesion_mask[None],
            "lung_mask": rx.lung_mask[None],
            "slice_labels": np.array([rx.lesion_mask.any()]),
            "spacing_yx_mm": np.array(rx.pixel_spacing),
            "sop_instance_uids": np.array([str(datasets[0].SOPInstanceUID)]),
        }
        found = rx.lesions
    else:
        raise ValueError(f"unknown modality {modality!r}; choose ct, dx or cr")
    for n, ds in enumerate(datasets):
        ds.save_as(folder / f"{n + 1:04d}.dcm", enforce_file_format=True)
    np.savez_compressed(
        folder / "ground_truth.npz",
        **truth,
        lesion_kinds=np.array([les.kind for les in found], dtype=str),
        lesion_centers_mm=np.array([les.center_mm for les in found], dtype=np.float32).reshape(-1, 3),
        lesion_sizes_mm=np.array([les.size_mm for les in found], dtype=np.float32),
        case_seed=np.array(case_seed),
        study_instance_uid=np.array(study["study_uid"]),
    )
    return folder
