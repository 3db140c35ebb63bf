"""The lung fields of a frontal chest radiograph (CR/DX): the condition the radiograph model is trained with and
the one the node computes, from one function (`radiograph_lung_mask`).

Input: presentation values in [0, 1], bright = dense (inference.volume's CR/DX intensities), rows from head to
feet (a PA or AP view as displayed; the node refuses other views, inference/volume.py). Per image:

1. Work at about WORK_MM per pixel (finer images are block-averaged down, the mask is brought back up): the
   estimate needs no finer detail, grid lines and quantum noise average out, and a 3000-pixel detector image
   costs no more than a small one.
2. Outside: the image border, air (darker than AIR_FRACTION of the median, i.e. no body on the ray) and
   collimator shutters (`shutters`: flat bands along the border, bright when unexposed, black when the
   processing blanked them). Lead markers sit in the air or on a shutter and stay outside with them.
3. Lung cores: regions from which every path to the outside climbs by more than CORE_DEPTH (grey-level hole
   filling from the outside): the lungs are dark pools enclosed by the chest wall, mediastinum and diaphragm.
   The largest two with at least MIN_CORE_FRACTION of the body; when only one lung is that deep, the other is
   looked for with a shallower depth on the other side of the midline.
4. The lung fields' outlines: a watershed of the gradient magnitude from the cores, against a background marker
   made of the outside and the dense tissue near the lungs (brighter than a level half-way from an Otsu
   threshold of the lungs' surroundings to their 95th percentile: mediastinum, heart, diaphragm, neck). The
   dense-tissue marker leaves APEX_MM above each core open: the apices lie under the shoulders and ribs, brighter
   than the rest of the lung, and only their edges say where they end. Then closed with a disc of
   CLOSING_RADIUS_MM and filled.

When no core qualifies (a white-out, no chest) the body (everything not outside) is returned, so the image is
still analysed. What it outlines is the visible lung field a reader traces: lung hidden behind the heart or below
the diaphragm domes is dense tissue here, as in the phantoms' ground truth (inference/radiograph_phantoms.py).
Measured against that ground truth: tests/test_lung_fields.py; limits in docs/method.md (effusions and
white-out, devices, rotated collimators; the faint apex of a low-contrast image is where it errs most).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import reconstruction
from skimage.segmentation import watershed

from inference.lungmask import CLOSING_RADIUS_MM, _close_and_fill, _fill_holes

WORK_MM = 2.0
FLAT_SPREAD = 0.05  # 5-95 % spread of a shutter's row or column less its trend, in [0, 1] units
TREND_PX = 8.0  # the trend: a Gaussian of this many working pixels along the line
AIR_FRACTION = 0.45  # of the median intensity: darker is air (lungs always have the body in front and behind)
CORE_DEPTH = 0.04  # how far below its rim a lung core lies, in [0, 1] units
MIN_CORE_FRACTION = 0.01  # of the body's area
NEAR_MM = 40.0  # the lungs' surroundings that set the dense-tissue level
DENSE_QUANTILE_SHARE = 0.5  # the dense-tissue level: Otsu + this share of the way to the 95th percentile
APEX_MM = 100.0
GRADIENT_SIGMA_PX = 1.5


def radiograph_lung_mask(image: np.ndarray, pixel_spacing: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Boolean lung fields (Z, Y, X) of radiographs in [0, 1] (bright = dense), one image per slice."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[None]
    out = np.zeros(image.shape, dtype=bool)
    for k in range(image.shape[0]):
        out[k] = lung_fields(image[k], pixel_spacing)
    return out


def lung_fields(image: np.ndarray, pixel_spacing: tuple[float, float]) -> np.ndarray:
    """One radiograph's lung fields (bool, the image's shape), estimated at about WORK_MM per pixel."""
    factors = tuple(max(1, int(WORK_MM // max(s, 1e-3))) for s in pixel_spacing)
    rows, cols = image.shape[0] // factors[0], image.shape[1] // factors[1]
    if rows < 8 or cols < 8:
        return np.zeros(image.shape, dtype=bool)
    small = (
        image[: rows * factors[0], : cols * factors[1]].reshape(rows, factors[0], cols, factors[1]).mean(axis=(1, 3))
    )
    spacing = (pixel_spacing[0] * factors[0], pixel_spacing[1] * factors[1])
    mask = _lung_fields(small.astype(np.float32), spacing)
    if factors == (1, 1):
        return mask
    up = ndimage.zoom(mask.astype(np.float32), factors, order=1, grid_mode=True, mode="nearest") >= 0.5
    out = np.zeros(image.shape, dtype=bool)
    out[: up.shape[0], : up.shape[1]] = up
    return out


def shutters(img: np.ndarray) -> np.ndarray:
    """Collimator shutters: from each image edge inwards, the rows (columns) that are flat, up to the first one that
    is not. Flat: no edge along the line, i.e. the 5-95 % spread of the line less its own smooth trend (the scatter
    that reaches an unexposed border falls off slowly) is below FLAT_SPREAD. Only bands in from the border: a flat
    line inside the image is anatomy or air, not a shutter."""
    out = np.zeros(img.shape, dtype=bool)
    for axis in (0, 1):
        lines = img if axis == 0 else img.T
        detail = lines - ndimage.gaussian_filter1d(lines, TREND_PX, axis=1, mode="nearest")
        low, high = np.percentile(detail, [5, 95], axis=1)
        flat = (high - low) < FLAT_SPREAD
        if flat.all():  # no anatomy anywhere
            return np.ones(img.shape, dtype=bool)
        first, last = int(np.argmin(flat)), int(np.argmin(flat[::-1]))
        band = np.zeros(flat.size, dtype=bool)
        band[:first] = True
        band[flat.size - last :] = True
        if axis == 0:
            out[band, :] = True
        else:
            out[:, band] = True
    return out


def _outside(smooth: np.ndarray) -> np.ndarray:
    """Step 2: border, air and shutters."""
    out = shutters(smooth)
    out[[0, -1], :] = True
    out[:, [0, -1]] = True
    return out | (smooth < AIR_FRACTION * float(np.median(smooth)))


def _cores(smooth: np.ndarray, outside: np.ndarray) -> list[np.ndarray]:
    """Step 3: the lung cores, largest first (at most two). When only one lung is that deep (the other's rim
    dips low somewhere), the other is looked for at half and a quarter of CORE_DEPTH, across the body's midline."""
    seed = np.where(outside, smooth, smooth.max())
    depth = reconstruction(seed, smooth, method="erosion") - smooth
    body = int((~outside).sum())
    found: list[np.ndarray] = []
    for share in (1.0, 0.5, 0.25):
        labels, n = ndimage.label(depth > share * CORE_DEPTH)
        if n == 0:
            continue
        sizes = np.bincount(labels.reshape(-1))
        sizes[0] = 0
        for k in np.argsort(-sizes)[:3]:
            if len(found) == 2 or sizes[k] < MIN_CORE_FRACTION * body:
                break
            core = labels == k
            if found and (np.any(core & found[0]) or not _across(core, found[0], outside)):
                continue
            found.append(core)
        if len(found) == 2:
            break
    return found


def _across(core: np.ndarray, other: np.ndarray, outside: np.ndarray) -> bool:
    """Whether `core` lies on the other side of the body's midline from `other`."""
    columns = np.arange(outside.shape[1])
    midline = float(np.average(columns, weights=(~outside).sum(axis=0) + 1e-9))
    return (float(np.average(columns, weights=core.sum(axis=0))) - midline) * (
        float(np.average(columns, weights=other.sum(axis=0))) - midline
    ) < 0


def _dense_tissue(
    smooth: np.ndarray, outside: np.ndarray, cores: np.ndarray, spacing: tuple[float, float]
) -> np.ndarray:
    """Step 4's dense-tissue marker: bright pixels near the lungs, less the open zone above each core."""
    near = ndimage.distance_transform_edt(~cores, sampling=spacing) <= NEAR_MM
    values = smooth[near & ~outside]
    otsu = float(threshold_otsu(values))
    level = otsu + DENSE_QUANTILE_SHARE * (float(np.percentile(values, 95)) - otsu)
    has = np.asarray(cores.any(axis=0))
    top = np.where(has, np.argmax(cores, axis=0), -1)
    row = np.arange(smooth.shape[0])[:, None]
    apex = has[None, :] & (row < top[None, :]) & (row >= top[None, :] - APEX_MM / spacing[0])
    return (smooth > level) & ~apex


def _lung_fields(img: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Steps 2-4 of the module docstring on the working image."""
    smooth = ndimage.gaussian_filter(img, 1.0)
    if float(smooth.max() - smooth.min()) < 1e-6:
        return np.zeros(img.shape, dtype=bool)
    outside = _outside(smooth)
    cores = _cores(smooth, outside)
    if not cores:  # no dark lung field (a white-out, or no chest): the body, so the image is still analysed
        return _fill_holes((~outside)[None])[0]
    markers = np.zeros(img.shape, dtype=np.int32)
    markers[outside | _dense_tissue(smooth, outside, np.logical_or.reduce(cores), spacing)] = 1
    for k, core in enumerate(cores):
        markers[core] = 2 + k
    regions = watershed(ndimage.gaussian_gradient_magnitude(img, GRADIENT_SIGMA_PX), markers)
    radius = max(1, int(round(CLOSING_RADIUS_MM / max(min(spacing), 1e-3))))
    return _close_and_fill((regions >= 2)[None], radius)[0]
