"""The CT lung masks as first written (slice by slice, whole volume), kept as the reference the fast code must equal.
(The radiograph lung fields, rewritten for collimation, markers and rotation, are tested against the phantoms'
ground-truth lungs instead: tests/test_lung_fields.py.)

inference/lungmask.py computes the same masks on bounding boxes with fewer scipy passes; the tests compare the
two voxel for voxel. One documented difference: this fill_z_gaps also fills a run at the very start or end of
a column when the column is shorter than about max_gap / 4 slices (its "no True" sentinel is only 4 x the
depth away); the fast one fills only runs with True on both ends, as its docstring says.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from inference.lungmask import (  # the same constants: the tests compare the algorithms
    AIR_THRESHOLD_HU,
    CLOSING_RADIUS_MM,
    MIN_LUNG_VOXELS,
    SECOND_LUNG_FRACTION,
    Z_GAP_MM,
    FeetSide,
    feet_side,
)

_CROSS_2D = ndimage.generate_binary_structure(2, 1)
_FACES_3D = ndimage.generate_binary_structure(3, 1)


def _disc(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (yy * yy + xx * xx) <= radius * radius


def _drop_border_components(binary: np.ndarray) -> np.ndarray:
    """Per 2D slice: remove components (8-connected) that touch the image border."""
    out = np.zeros_like(binary)
    eight = np.ones((3, 3), dtype=bool)
    for k in range(binary.shape[0]):
        labels, n = ndimage.label(binary[k], structure=eight)
        if n == 0:
            continue
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        keep = np.ones(n + 1, dtype=bool)
        keep[border] = False
        keep[0] = False
        out[k] = keep[labels]
    return out


def _closing(binary: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing with the disc of `radius` (x^2 + y^2 <= r^2), through two Euclidean distance transforms.

    Exactly the morphological closing with that disc, in time independent of the radius (a structuring-element
    closing costs radius^2 per pixel). The input is padded by 2r so nothing near its edge erodes.
    """
    pad = 2 * radius
    padded = np.pad(binary, pad)
    dilated = ndimage.distance_transform_edt(~padded) <= radius
    closed = ndimage.distance_transform_edt(dilated) > radius
    return closed[pad:-pad, pad:-pad]


def _select_labels(labels: np.ndarray, n: int, keep: list[int]) -> np.ndarray:
    """labels in `keep` -> True, through a lookup table (np.isin sorts the whole volume)."""
    lut = np.zeros(n + 1, dtype=bool)
    lut[keep] = True
    return lut[labels]


def _close_and_fill(mask: np.ndarray, radius: int) -> np.ndarray:
    """Per slice: fill holes, close with a disc, fill holes again; work on each slice's bounding box only."""
    out = np.zeros_like(mask)
    for k in range(mask.shape[0]):
        rows = np.flatnonzero(mask[k].any(axis=1))
        if rows.size == 0:
            continue
        cols = np.flatnonzero(mask[k].any(axis=0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        sl = ndimage.binary_fill_holes(mask[k][box])
        if radius > 0:  # a closing never leaves the bounding box (it stays inside the convex hull)
            sl = ndimage.binary_fill_holes(_closing(sl, radius))
        out[k][box] = sl
    return out


def _no_air_towards(lungs: np.ndarray, from_start: bool) -> tuple[np.ndarray, np.ndarray]:
    """For each voxel: (no lung air in its column strictly beyond it, a lung-free slice lies beyond it).

    "Beyond" is towards index 0 when from_start, else towards the last index.
    """
    seq = lungs if from_start else lungs[::-1]
    seen = np.logical_or.accumulate(seq, axis=0)
    empty = np.logical_or.accumulate(~seq.any(axis=(1, 2)))
    before = np.zeros_like(seen)
    before[1:] = seen[:-1]
    empty_before = np.zeros_like(empty)
    empty_before[1:] = empty[:-1]
    if not from_start:
        before, empty_before = before[::-1], empty_before[::-1]
    return ~before, empty_before


def _drop_domes(filled: np.ndarray, lungs: np.ndarray, side: FeetSide) -> np.ndarray:
    """Give back filled-in regions with abdomen (no lung air, then a lung-free slice) below them: diaphragm domes."""
    if side == "none" or filled.shape[0] < 3:
        return filled
    added = filled & ~lungs
    if not added.any():
        return filled
    dome = np.zeros_like(filled)
    for from_start in (True, False):
        if side in ("start", "end") and from_start != (side == "start"):
            continue
        no_air, abdomen_beyond = _no_air_towards(lungs, from_start)
        dome |= no_air & abdomen_beyond[:, None, None]
    out = filled.copy()
    for k in np.flatnonzero(added.any(axis=(1, 2))):
        labels, n = ndimage.label(added[k], structure=_CROSS_2D)
        votes = np.bincount(labels.reshape(-1), weights=dome[k].reshape(-1), minlength=n + 1)
        sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
        drop = votes > 0.5 * sizes
        drop[0] = False
        out[k] &= ~drop[labels]
    return out


def fill_z_gaps(mask: np.ndarray, max_gap: int) -> np.ndarray:
    """Fill each (y, x) column's runs of False of at most `max_gap` voxels that have True on both ends."""
    if max_gap < 1 or mask.shape[0] < 3:
        return mask
    z = np.arange(mask.shape[0], dtype=np.int32)[:, None, None]
    far = np.int32(mask.shape[0] * 4)
    previous = np.maximum.accumulate(np.where(mask, z, -far), axis=0)
    following = np.minimum.accumulate(np.where(mask, z, far)[::-1], axis=0)[::-1]
    gap = following - previous - 1
    return mask | ((gap > 0) & (gap <= max_gap))


def ct_lung_mask(
    hu: np.ndarray,
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
    threshold: float = AIR_THRESHOLD_HU,
    closing_radius_mm: float = CLOSING_RADIUS_MM,
    feet: FeetSide = "both",
    slice_spacing_mm: float | None = None,
) -> np.ndarray:
    """Boolean lung mask (Z, Y, X) of a chest CT volume in HU (see the module docstring for the steps).

    `feet` says which end of the slice axis is towards the feet (`feet_side`), for the diaphragm-dome rule;
    `slice_spacing_mm` sizes the filling of gaps along the slice axis (None: no filling).
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim == 2:
        hu = hu[None]
    air = _drop_border_components(hu < threshold)
    labels, n = ndimage.label(air, structure=_FACES_3D)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
    sizes[0] = 0
    order = np.argsort(-sizes)
    keep = [order[0]] if sizes[order[0]] >= MIN_LUNG_VOXELS else []
    if keep and n > 1 and sizes[order[1]] >= SECOND_LUNG_FRACTION * sizes[order[0]]:
        keep.append(order[1])
    lungs = _select_labels(labels, n, keep)
    radius = int(round(closing_radius_mm / max(min(pixel_spacing), 1e-3)))
    mask = _drop_domes(_close_and_fill(lungs, max(radius, 1)), lungs, feet)
    if slice_spacing_mm:
        mask = fill_z_gaps(mask, int(Z_GAP_MM // slice_spacing_mm))
    return mask


def anatomy_mask(
    pixels: np.ndarray,
    modality: str,
    pixel_spacing: tuple[float, float],
    normal: np.ndarray | None = None,
    slice_spacing_mm: float | None = None,
) -> np.ndarray:
    """The condition mask for a volume on the source grid: lungs for CT, lung fields for CR/DX.

    `normal`: the slice normal the volume is sorted along (None: orientation unknown); `slice_spacing_mm`: the
    distance between slices (None: a single slice, or unknown).
    """
    if modality != "CT":
        raise ValueError("the reference covers CT only: inference/lung_fields.py is tested against phantom lungs")
    return ct_lung_mask(pixels, pixel_spacing, feet=feet_side(normal), slice_spacing_mm=slice_spacing_mm)
