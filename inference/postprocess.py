"""From an anomaly map to a segmentation and scores: background-adaptive threshold, morphology, scores.

Definitions (docs/method.md repeats them):
- the anomaly map E is the squared reconstruction error, median-filtered per slice over `median_size` x
  `median_size` pixels (1: off). On the model grid a vessel the model misses is an isolated pixel of large error,
  a lesion a patch; the median removes the first and keeps the second (image-level AUROC on the evaluation
  phantoms 0.68 -> 0.75 with the same model).
- threshold alpha = mean(E[outside]) + lambda * std(E[outside]) over the voxels outside the anatomy mask (std with
  ddof=0). Outside the mask the model reconstructs ordinary anatomy/background, so its error says how large
  "normal" reconstruction error is for this study and scanner; that adapts the threshold per study (SAC-Diff).
  If the mask covers every voxel, all voxels are used instead.
- segmentation = (E > alpha), inside the anatomy mask when `restrict_to_mask`, then per-slice binary opening and
  closing (3x3 cross, `iterations` each), then removal of 3D components (face-connected) smaller than
  `min_component_size` voxels.
- the score map S is the same squared error median-filtered over a wider `score_median_size` neighbourhood (5 x 5):
  ranking a study needs evidence pooled over a lesion-sized patch, while the map shown and segmented keeps its
  outline (S is E when the sizes are equal).
- slice score = square root of the mean of the SCORE_TOP_K largest values of S over the slice's in-mask voxels (all
  of them when the slice has fewer); 0 for a slice without mask voxels. An RMS difference from the pseudo-healthy
  reconstruction in normalised intensity (half the CT window, 700 HU, is 1), over the slice's most abnormal patch.
  Not divided by alpha: on validation phantoms dividing by the background's error ranked studies by their
  background as much as by their lungs (docs/method.md).
- study score = max of the slice scores (a single focal lesion must rank the study; a volume-wide statistic would
  dilute it over hundreds of slices).
- anomalous fraction = segmented voxels / anatomy-mask voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

SCORE_TOP_K = 20  # model-grid pixels pooled per slice: a patch 4-5 pixels across (a lesion; a vessel is thinner)
_CROSS_2D = ndimage.generate_binary_structure(2, 1)[None]  # (1, 3, 3): no erosion across slices
_FACES_3D = ndimage.generate_binary_structure(3, 1)


@dataclass
class Detection:
    """Thresholded and scored anomaly map, same grid as the inputs."""

    threshold: float
    segmentation: np.ndarray  # bool (Z, H, W)
    slice_scores: np.ndarray  # float32 (Z,)
    study_score: float
    anomalous_fraction: float


def median_filtered(error: np.ndarray, size: int) -> np.ndarray:
    """Per-slice size x size median of a (Z, H, W) map (edges reflected); `size` <= 1 returns it unchanged."""
    if size <= 1:
        return error
    return ndimage.median_filter(error, size=(1, size, size), mode="reflect")


def background_threshold(error: np.ndarray, mask: np.ndarray, lam: float) -> float:
    """alpha = mean + lam * std (ddof=0) of the error outside the anatomy mask (all voxels if none is outside)."""
    outside = error[~mask]
    if outside.size == 0:
        outside = error.reshape(-1)
    return float(outside.mean(dtype=np.float64) + lam * outside.std(dtype=np.float64))


def clean_segmentation(
    binary: np.ndarray, opening: int = 1, closing: int = 1, min_component_size: int = 0
) -> np.ndarray:
    """Per-slice opening then closing (3x3 cross, given iterations), then drop small 3D components."""
    out = binary.astype(bool)
    if opening > 0:
        out = ndimage.binary_opening(out, structure=_CROSS_2D, iterations=opening)
    if closing > 0:
        # Pad so closing does not erode structures at the image edge.
        pad = ((0, 0), (closing, closing), (closing, closing))
        out = ndimage.binary_closing(np.pad(out, pad), structure=_CROSS_2D, iterations=closing)
        out = out[:, closing:-closing, closing:-closing]
    if min_component_size > 1 and out.any():
        labels, n = ndimage.label(out, structure=_FACES_3D)
        sizes = np.bincount(labels.reshape(-1), minlength=n + 1)
        keep = sizes >= min_component_size
        keep[0] = False
        out = keep[labels]
    return out


def slice_scores(score_map: np.ndarray, mask: np.ndarray, top_k: int = SCORE_TOP_K) -> np.ndarray:
    """Per slice: root of the mean of the top_k largest in-mask values of a squared-error map (all when fewer; 0
    where the slice has no mask voxels)."""
    scores = np.zeros(score_map.shape[0], dtype=np.float32)
    for k in range(score_map.shape[0]):
        values = score_map[k][mask[k]]
        if values.size > top_k:
            values = np.partition(values, values.size - top_k)[-top_k:]
        if values.size:
            scores[k] = np.sqrt(values.mean(dtype=np.float64))
    return scores


def detect_anomalies(
    error: np.ndarray,
    mask: np.ndarray,
    lam: float,
    *,
    adaptive_threshold: bool = True,
    fixed_threshold: float = 0.0,
    restrict_to_mask: bool = True,
    opening: int = 1,
    closing: int = 1,
    min_component_size: int = 0,
    score_map: np.ndarray | None = None,
    keep: np.ndarray | None = None,
) -> Detection:
    """Threshold (background-adaptive, or `fixed_threshold` for the ablation), clean and score an anomaly map.

    `score_map`: what the slice scores are computed from (the wider-filtered error); the anomaly map itself if None.
    `keep`: the voxels the segmentation may hold (e.g. only those denser than the reconstruction), applied before
    the cleaning; the threshold and the scores do not change with it.
    """
    error = np.asarray(error, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    score_map = error if score_map is None else np.asarray(score_map, dtype=np.float32)
    if error.shape != mask.shape or score_map.shape != mask.shape:
        raise ValueError(
            f"anomaly map {error.shape}, score map {score_map.shape} and mask {mask.shape} differ in shape"
        )
    alpha = background_threshold(error, mask, lam) if adaptive_threshold else float(fixed_threshold)
    raw = error > alpha
    if restrict_to_mask:
        raw &= mask
    if keep is not None:
        raw &= np.asarray(keep, dtype=bool)
    seg = clean_segmentation(raw, opening, closing, min_component_size)
    if restrict_to_mask:
        seg &= mask
    scores = slice_scores(score_map, mask)
    mask_voxels = int(mask.sum())
    return Detection(
        threshold=alpha,
        segmentation=seg,
        slice_scores=scores,
        study_score=float(scores.max()) if scores.size else 0.0,
        anomalous_fraction=float(seg.sum() / mask_voxels) if mask_voxels else 0.0,
    )
