"""Anatomy masks used as the U-Net's condition and as the "inside" for the background-adaptive threshold.

CT (from HU, in 3D): air below AIR_THRESHOLD_HU; air connected to the in-plane image border removed slice by slice
(outside-body air, also under the table); the remaining air labelled in 3D (face-connected) and the largest one or
two components kept (the lungs; the second only if it is at least SECOND_LUNG_FRACTION of the first, which drops
bowel gas and small pockets); holes filled per slice (vessels, nodules inside the lung), then a per-slice closing
with a disc of CLOSING_RADIUS_MM to take in vessels and nodules at the lung border; holes filled again. Near the
lung bases an axial slice cuts the diaphragm dome, and the liver or spleen appears as a "hole" ringed by lung:
a filled region is given back when most of its pixels have no lung air anywhere below them (towards the feet)
while a slice without lungs lies below (the abdomen). A nodule has lung beneath it; the dome has abdomen.
Last, along the slice axis, gaps of up to Z_GAP_MM between lung voxels of one (y, x) column are filled: a
consolidation or a nodule against the chest wall is no hole in its own slice (it merges with the wall), but the
same column is lung above and below it. Without this, most consolidations fall outside the mask.

CR/DX: the lung fields of a frontal radiograph, from inference/lung_fields.py (the same function for training and
inference).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    from inference.lung_refiner import LungRefiner

AIR_THRESHOLD_HU = -320.0
SECOND_LUNG_FRACTION = 0.1
CLOSING_RADIUS_MM = 3.0
Z_GAP_MM = 40.0
MIN_LUNG_VOXELS = 10
FEW_COMPONENTS = 8  # up to this many air components, sizes are counted per component box (else one bincount)

_CROSS_2D = ndimage.generate_binary_structure(2, 1)
_FACES_3D = ndimage.generate_binary_structure(3, 1)
# In-plane neighbourhoods for a (Z, Y, X) stack: one scipy call treats every slice on its own.
_SLICE_CROSS = np.zeros((3, 3, 3), dtype=bool)
_SLICE_CROSS[1] = _CROSS_2D


def _disc(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (yy * yy + xx * xx) <= radius * radius


def _label_2d(binary: np.ndarray, structure: np.ndarray) -> tuple[np.ndarray, int]:
    """ndimage.label into uint16 when the count fits (a third faster to label and look up), else int32."""
    labels = np.empty(binary.shape, dtype=np.uint16)
    try:
        n = ndimage.label(binary, structure=structure, output=labels)
    except RuntimeError:  # more than 65535 components
        return ndimage.label(binary, structure=structure)
    return labels, int(n)


def _drop_border_components(binary: np.ndarray) -> np.ndarray:
    """Per 2D slice: remove components (8-connected) that touch the image border.

    Slice by slice (a slice's labels stay in cache), and only within the in-plane bounding box of the stack's
    False pixels grown by one pixel: everything outside it is True and joined to the image border through that
    frame, so a component reaches the image border exactly when it reaches the grown box's edge.
    """
    out = np.zeros_like(binary)
    solid = ~np.all(binary, axis=0)
    rows, cols = np.flatnonzero(solid.any(axis=1)), np.flatnonzero(solid.any(axis=0))
    if rows.size == 0:  # True everywhere: one component, on the border
        return out
    box = (
        slice(max(int(rows[0]) - 1, 0), min(int(rows[-1]) + 2, binary.shape[1])),
        slice(max(int(cols[0]) - 1, 0), min(int(cols[-1]) + 2, binary.shape[2])),
    )
    eight = np.ones((3, 3), dtype=bool)
    for k in range(binary.shape[0]):
        labels, n = _label_2d(binary[k][box], eight)
        if n == 0:
            continue
        border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        keep = np.ones(n + 1, dtype=bool)
        keep[border] = False
        keep[0] = False
        out[k][box] = keep[labels]
    return out


def _fill_holes(stack: np.ndarray) -> np.ndarray:
    """Per slice of a (Z, Y, X) stack: scipy's binary_fill_holes (background 4-connected to the border stays).

    Through one labelling of the background with an in-plane cross, about 4x faster than scipy's propagation.
    """
    labels, n = ndimage.label(~stack, structure=_SLICE_CROSS)
    if n == 0:
        return stack.copy()
    border = np.concatenate(
        [labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
    )
    hole = np.ones(n + 1, dtype=bool)
    hole[border] = False
    hole[0] = False
    if not hole.any():  # no holes (common after the closing): skip the lookup over the whole stack
        return stack.copy()
    return stack | hole[labels]


def _dilate_disc(binary: np.ndarray, radius: int) -> np.ndarray:
    """Per slice of a (Z, Y, X) stack: dilation with the disc of `radius` (x^2 + y^2 <= r^2); outside is False.

    The disc is a union of horizontal segments, one per row offset dy, of half-width isqrt(r^2 - dy^2): dilate
    along x by each half-width (growing one pixel at a time), then OR the rows shifted by dy. About 5r whole-array
    boolean operations, exact for any radius.
    """
    rows = binary.shape[1]
    halves = [math.isqrt(radius * radius - dy * dy) for dy in range(-radius, radius + 1)]
    along_x = {0: binary}
    grown = binary
    for w in range(1, max(halves) + 1):
        grown = grown.copy()
        grown[:, :, w:] |= binary[:, :, :-w]
        grown[:, :, :-w] |= binary[:, :, w:]
        along_x[w] = grown
    out = along_x[halves[radius]].copy()  # dy = 0
    for dy, w in zip(range(-radius, radius + 1), halves, strict=True):
        if dy == 0 or abs(dy) >= rows:
            continue
        source = along_x[w]
        if dy > 0:
            out[:, dy:] |= source[:, :-dy]
        else:
            out[:, :dy] |= source[:, -dy:]
    return out


def _closing(binary: np.ndarray, radius: int) -> np.ndarray:
    """Binary closing of each slice of a (Z, Y, X) stack (or of one 2D image) with the disc of `radius`.

    Exactly the morphological closing with that disc on an unbounded plane (the input is padded by r, so nothing
    near its edge erodes): a dilation, then an erosion as the complement of the dilated complement.
    """
    flat = binary.ndim == 2
    stack = binary[None] if flat else binary
    padded = np.pad(stack, ((0, 0), (radius, radius), (radius, radius)))
    closed = ~_dilate_disc(~_dilate_disc(padded, radius), radius)
    closed = closed[:, radius:-radius, radius:-radius]
    return closed[0] if flat else closed


def _select_labels(labels: np.ndarray, n: int, keep: list[int]) -> np.ndarray:
    """labels in `keep` -> True, through a lookup table (np.isin sorts the whole volume)."""
    lut = np.zeros(n + 1, dtype=bool)
    lut[keep] = True
    return lut[labels]


def _in_plane_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """(all slices, rows, cols): the in-plane bounding box of every True voxel of a (Z, Y, X) mask; None if empty."""
    footprint = np.any(mask, axis=0)
    rows = np.flatnonzero(footprint.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(footprint.any(axis=0))
    return slice(None), slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def _close_and_fill(mask: np.ndarray, radius: int) -> np.ndarray:
    """Per slice: fill holes, close with a disc, fill holes again; on the stack's in-plane bounding box only.

    A hole of a slice is the same within its own bounding box and within any larger box (everything outside its
    own box is background that reaches the border), and the closing never leaves a slice's bounding box (it stays
    inside the convex hull), so one box for the whole stack gives each slice's result.
    """
    out = np.zeros_like(mask)
    box = _in_plane_box(mask)
    if box is None:
        return out
    filled = _fill_holes(mask[box])
    if radius > 0:
        filled = _fill_holes(_closing(filled, radius))
    out[box] = filled
    return out


FeetSide = Literal["start", "end", "both", "none"]


def feet_side(normal: np.ndarray | None) -> FeetSide:
    """Which end of a volume sorted along `normal` lies towards the feet (patient LPS: +z is the head).

    "both" when the orientation is unknown (test either end), "none" for non-axial stacks (no dome rule).
    """
    if normal is None:
        return "both"
    if abs(float(normal[2])) < 0.7:
        return "none"
    return "start" if normal[2] > 0 else "end"


def _abdomen_beyond(lungs: np.ndarray, from_start: bool, ks: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """For voxels (ks, ys, xs): no lung air in the column strictly beyond the voxel, and a lung-free slice beyond it.

    "Beyond" is towards index 0 when from_start, else towards the last index. From each column's first (last) lung
    voxel and the first (last) lung-free slice: no whole-volume running OR.
    """
    depth = lungs.shape[0]
    in_column = lungs.any(axis=0)
    lung_free = np.flatnonzero(~lungs.any(axis=(1, 2)))
    if from_start:
        first = np.where(in_column, np.argmax(lungs, axis=0), depth)
        first_free = lung_free[0] if lung_free.size else depth
        return (first[ys, xs] >= ks) & (first_free < ks)
    last = np.where(in_column, depth - 1 - np.argmax(lungs[::-1], axis=0), -1)
    last_free = lung_free[-1] if lung_free.size else -1
    return (last[ys, xs] <= ks) & (last_free > ks)


def _drop_domes(filled: np.ndarray, lungs: np.ndarray, side: FeetSide) -> np.ndarray:
    """Give back filled-in regions with abdomen (no lung air, then a lung-free slice) below them: diaphragm domes.

    A filled-in region (4-connected in its slice) goes when more than half of its voxels are dome voxels; the
    regions of every slice are labelled at once and voted on only at their own voxels.
    """
    if side == "none" or filled.shape[0] < 3:
        return filled
    added = filled & ~lungs
    if not added.any():
        return filled
    labels, n = ndimage.label(added, structure=_SLICE_CROSS)
    ks, ys, xs = np.nonzero(added)
    region = labels[ks, ys, xs]
    dome = np.zeros(ks.size, dtype=bool)
    for from_start in (True, False):
        if side in ("start", "end") and from_start != (side == "start"):
            continue
        dome |= _abdomen_beyond(lungs, from_start, ks, ys, xs)
    votes = np.bincount(region[dome], minlength=n + 1)
    sizes = np.bincount(region, minlength=n + 1)
    drop = 2 * votes > sizes
    drop[0] = False
    out = filled.copy()
    gone = drop[region]
    out[ks[gone], ys[gone], xs[gone]] = False
    return out


def fill_z_gaps(mask: np.ndarray, max_gap: int) -> np.ndarray:
    """Fill each (y, x) column's runs of False of at most `max_gap` voxels that have True on both ends.

    Only columns with a False run bounded on both ends (found with two running ORs over slices) are measured:
    the nearest True at or before and at or after each of their voxels.
    """
    if max_gap < 1 or mask.shape[0] < 3:
        return mask
    out = mask.copy()
    box = _in_plane_box(mask)
    if box is None:
        return out
    sub = mask[box]
    bounded = np.logical_or.accumulate(sub, axis=0)
    bounded &= np.logical_or.accumulate(sub[::-1], axis=0)[::-1]
    bounded &= ~sub
    ys, xs = np.nonzero(bounded.any(axis=0))
    if ys.size == 0:
        return out
    columns = sub[:, ys, xs]  # (Z, columns with a bounded gap)
    n = columns.shape[0]
    dtype = np.int16 if n < np.iinfo(np.int16).max else np.int32
    z = np.arange(n, dtype=dtype)[:, None]
    previous = np.maximum.accumulate(np.where(columns, z, dtype(-1)), axis=0)  # -1: no True at or before
    following = np.minimum.accumulate(np.where(columns, z, dtype(n))[::-1], axis=0)[::-1]  # n: none after
    gap = following - previous - 1
    fill = (gap > 0) & (gap <= max_gap) & (previous >= 0) & (following < n)
    out[box][:, ys, xs] = columns | fill
    return out


def _lung_components(air: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice, slice]] | None:
    """The largest one or two 3D air components (see SECOND_LUNG_FRACTION) on their in-plane bounding box.

    Returns (lungs on the box, box) with the box spanning every slice, or None when no component qualifies.
    Labelling runs on the in-plane bounding box of the air (inside the body: a fraction of the image), and the
    selection compares labels within the lungs' box only (a lookup over the whole volume costs more).
    """
    outer = _in_plane_box(air)
    if outer is None:
        return None
    labels, n = ndimage.label(air[outer], structure=_FACES_3D)
    if n == 0:
        return None
    found = ndimage.find_objects(labels)
    if n <= FEW_COMPONENTS:  # count each within its own box: no whole-volume int64 copy for bincount
        sizes = np.zeros(n + 1, dtype=np.int64)
        for label, where in enumerate(found, start=1):
            sizes[label] = np.count_nonzero(labels[where] == label)
    else:
        sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
        sizes[0] = 0
    order = np.argsort(-sizes)
    keep = [int(order[0])] if sizes[order[0]] >= MIN_LUNG_VOXELS else []
    if keep and n > 1 and sizes[order[1]] >= SECOND_LUNG_FRACTION * sizes[order[0]]:
        keep.append(int(order[1]))
    if not keep:
        return None
    rows = [found[label - 1][1] for label in keep]
    cols = [found[label - 1][2] for label in keep]
    inner = (
        slice(None),
        slice(min(r.start for r in rows), max(r.stop for r in rows)),
        slice(min(c.start for c in cols), max(c.stop for c in cols)),
    )
    within = labels[inner]
    lungs = within == keep[0]
    for label in keep[1:]:
        lungs |= within == label
    top, left = outer[1].start, outer[2].start
    box = (
        slice(None),
        slice(top + inner[1].start, top + inner[1].stop),
        slice(left + inner[2].start, left + inner[2].stop),
    )
    return lungs, box


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
    `slice_spacing_mm` sizes the filling of gaps along the slice axis (None: no filling). Every step after the
    3D labelling works on the lungs' in-plane bounding box (nothing outside it changes).
    """
    hu = np.asarray(hu, dtype=np.float32)
    if hu.ndim == 2:
        hu = hu[None]
    out = np.zeros(hu.shape, dtype=bool)
    found = _lung_components(_drop_border_components(hu < threshold))
    if found is None:
        return out
    lungs, box = found
    radius = int(round(closing_radius_mm / max(min(pixel_spacing), 1e-3)))
    mask = _drop_domes(_close_and_fill(lungs, max(radius, 1)), lungs, feet)
    if slice_spacing_mm:
        mask = fill_z_gaps(mask, int(Z_GAP_MM // slice_spacing_mm))
    out[box] = mask
    return out


def anatomy_mask(
    pixels: np.ndarray,
    modality: str,
    pixel_spacing: tuple[float, float],
    normal: np.ndarray | None = None,
    slice_spacing_mm: float | None = None,
    refiner: LungRefiner | None = None,
) -> np.ndarray:
    """The condition mask for a volume on the source grid: lungs for CT, lung fields for CR/DX.

    `normal`: the slice normal the volume is sorted along (None: orientation unknown); `slice_spacing_mm`: the
    distance between slices (None: a single slice, or unknown); `refiner`: a CT lung refiner that adds the lung
    filled by opacities (`inference.lung_refiner`; None: the threshold mask alone).
    """
    if modality == "CT":
        mask = ct_lung_mask(pixels, pixel_spacing, feet=feet_side(normal), slice_spacing_mm=slice_spacing_mm)
        if refiner is None:
            return mask
        return refiner.refine(np.asarray(pixels, dtype=np.float32).reshape(mask.shape), mask)  # 2D: one slice
    from inference.lung_fields import radiograph_lung_mask  # it builds on this module's helpers

    return radiograph_lung_mask(pixels, pixel_spacing)
