"""Threshold, morphology and scores against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from inference.postprocess import background_threshold, clean_segmentation, detect_anomalies, slice_scores


def test_background_threshold_hand_computed() -> None:
    error = np.array([[[1.0, 3.0, 9.0], [5.0, 100.0, 7.0]]], np.float32)
    mask = np.array([[[False, False, False], [False, True, True]]])
    # outside: 1, 3, 9, 5 -> mean 4.5, population std sqrt(((3.5)^2 + 1.5^2 + 4.5^2 + 0.5^2) / 4) = sqrt(8.75)
    assert background_threshold(error, mask, 2.0) == pytest.approx(4.5 + 2 * np.sqrt(8.75))
    assert background_threshold(error, mask, 0.0) == pytest.approx(4.5)
    # a mask covering everything falls back to all voxels
    assert background_threshold(error, np.ones_like(mask), 0.0) == pytest.approx(error.mean())


def test_slice_scores_hand_computed() -> None:
    error = np.zeros((4, 1, 101), np.float32)
    error[0, 0] = np.arange(101)[::-1]  # the 20 largest of 0..100: 81..100, mean 90.5
    error[1, 0] = 2.0
    mask = np.ones((4, 1, 101), bool)
    mask[2] = False  # no anatomy in slice 2
    mask[3, 0, 5:] = False  # slice 3: fewer in-mask voxels than top_k -> the mean of all of them
    error[3, 0, :5] = [1, 2, 3, 4, 5]
    error[3, 0, 5:] = 1000.0  # outside the mask: never counted
    scores = slice_scores(error, mask)
    np.testing.assert_allclose(scores, np.sqrt([90.5, 2.0, 0.0, 3.0]), rtol=1e-6)
    # only in-mask voxels count: mask out 51..100 -> 0..50, the 20 largest 31..50, mean 40.5
    mask[0, 0, :50] = False
    assert slice_scores(error, mask)[0] == pytest.approx(np.sqrt(40.5))
    assert slice_scores(error, mask, top_k=1)[0] == pytest.approx(np.sqrt(50.0))


def test_morphology_and_min_component_size() -> None:
    seg = np.zeros((2, 12, 12), bool)
    seg[0, 2:6, 2:6] = True  # 16-pixel square survives opening
    seg[0, 9, 9] = True  # isolated pixel: removed by opening
    seg[1, 2:6, 2:6] = True
    seg[1, 3, 3] = False  # a hole: filled by closing
    seg[1, 8:10, 8:11] = True  # 2x3 block
    opened = clean_segmentation(seg, opening=1, closing=0)
    assert opened[0, 2:6, 2:6].sum() == 12 and not opened[0, 9, 9]  # cross opening trims the 4 corners
    closed = clean_segmentation(seg, opening=0, closing=1)
    assert closed[1, 3, 3] and closed[0, 9, 9]
    # 3D components: the two squares touch across slices -> one component of ~ 2 x 16 voxels
    big = clean_segmentation(seg, opening=0, closing=0, min_component_size=20)
    assert big[0, 2:6, 2:6].all() and big[1, 2, 2] and not big[0, 9, 9] and not big[1, 8:10, 8:11].any()
    # the closing is padded: a block at the image edge keeps its edge pixels
    edge = np.zeros((1, 8, 8), bool)
    edge[0, 0:4, 0:4] = True
    assert clean_segmentation(edge, opening=0, closing=2)[0, 0:4, 0:4].all()


def test_detect_anomalies_end_to_end_hand_values() -> None:
    rng = np.random.default_rng(0)
    error = np.abs(rng.normal(0, 0.01, (2, 32, 32))).astype(np.float32)
    mask = np.zeros((2, 32, 32), bool)
    mask[:, 8:24, 8:24] = True
    error[1, 12:18, 12:18] = 1.0  # a 36-voxel lesion inside the mask
    error[0, 0:3, 0:3] = 1.0  # a hot spot outside the mask: raises alpha, never segmented
    outside = error[~mask]
    alpha = outside.mean(dtype=np.float64) + 3 * outside.std(dtype=np.float64)
    det = detect_anomalies(error, mask, 3.0, opening=1, closing=1, min_component_size=10)
    assert det.threshold == pytest.approx(alpha)
    assert det.segmentation[1, 12:18, 12:18].sum() >= 32 and not det.segmentation[0].any()
    assert not det.segmentation[~mask].any()
    assert det.anomalous_fraction == pytest.approx(det.segmentation.sum() / mask.sum())
    expected_scores = [np.sqrt(np.sort(error[k][mask[k]])[-20:].mean()) for k in range(2)]
    np.testing.assert_allclose(det.slice_scores, expected_scores, rtol=1e-5)
    assert det.study_score == pytest.approx(max(expected_scores), rel=1e-5)
    assert det.slice_scores[1] == pytest.approx(1.0)  # the lesion fills the slice's top 20
    # a separate score map scores the slices; the segmentation still comes from the anomaly map
    wider = np.zeros_like(error)
    wider[0, 10, 10] = 40.0
    other = detect_anomalies(error, mask, 3.0, opening=1, closing=1, min_component_size=10, score_map=wider)
    np.testing.assert_allclose(other.slice_scores, [np.sqrt(2.0), 0.0])
    assert np.array_equal(other.segmentation, det.segmentation) and other.threshold == det.threshold
    with pytest.raises(ValueError, match="differ in shape"):
        detect_anomalies(error, mask, 3.0, score_map=wider[:1])


def test_keep_limits_the_segmentation_and_nothing_else() -> None:
    error = np.zeros((1, 16, 16), np.float32)
    error[0, 2:6, 2:6] = 1.0
    error[0, 9:14, 9:14] = 1.0
    mask = np.ones((1, 16, 16), bool)
    keep = np.zeros_like(mask)
    keep[0, :8, :8] = True  # only the first patch may be outlined
    free = detect_anomalies(error, mask, 3.0, adaptive_threshold=False, fixed_threshold=0.5, opening=0, closing=0)
    kept = detect_anomalies(
        error, mask, 3.0, adaptive_threshold=False, fixed_threshold=0.5, opening=0, closing=0, keep=keep
    )
    assert free.segmentation[0, 9:14, 9:14].all() and not kept.segmentation[0, 8:, 8:].any()
    assert np.array_equal(kept.segmentation, free.segmentation & keep)
    np.testing.assert_array_equal(kept.slice_scores, free.slice_scores)


def test_fixed_threshold_and_unrestricted() -> None:
    error = np.zeros((1, 8, 8), np.float32)
    error[0, :3, :3] = 5.0
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 4:, 4:] = True
    det = detect_anomalies(
        error, mask, 3.0, adaptive_threshold=False, fixed_threshold=1.0, restrict_to_mask=False, opening=0, closing=0
    )
    assert det.threshold == 1.0 and det.segmentation[0, :3, :3].all()
    with pytest.raises(ValueError, match="differ in shape"):
        detect_anomalies(error, mask[:, :4], 3.0)


def test_median_filter_drops_lone_pixels_and_keeps_patches() -> None:
    from inference.postprocess import median_filtered

    error = np.zeros((1, 16, 16), np.float32)
    error[0, 3, 3] = 1.0  # a missed vessel: one pixel
    error[0, 8:12, 8:12] = 1.0  # a lesion: a 4 x 4 patch
    out = median_filtered(error, 3)
    assert out[0, 3, 3] == 0.0 and out[0, 9:11, 9:11].min() == 1.0
    assert median_filtered(error, 1) is error
