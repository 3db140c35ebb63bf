"""Study-level (triage) metrics on constructed scores whose AUROC and sensitivity are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from inference.evaluate import triage
from inference.study_metrics import (
    bootstrap,
    bootstrap_indices,
    operating_threshold,
    paired_difference,
    sensitivity_at_specificity,
    study_auroc,
    study_metrics,
    with_interval,
)

# 10 healthy studies scoring 0.0 .. 0.9; 4 lesion studies
HEALTHY = np.round(np.arange(10) / 10, 2)
LESION = np.array([0.85, 0.95, 0.5, 1.0])
SCORES = np.concatenate([LESION, HEALTHY])
LABELS = np.array([True] * 4 + [False] * 10)


def test_study_auroc_by_hand() -> None:
    # lesion 0.85 beats 9 healthy, 0.95 and 1.0 beat 10, 0.5 beats 5 (0.0-0.4) and ties 0.5 (one half)
    assert study_auroc(SCORES, LABELS) == pytest.approx((9 + 10 + 10 + 5.5) / 40)
    assert math.isnan(study_auroc(HEALTHY, np.zeros(10, bool)))


def test_sensitivity_at_90_specificity_by_hand() -> None:
    # 90 % of 10 healthy: the 9th smallest (0.8) is the threshold; flagged: 0.85, 0.95, 1.0
    assert operating_threshold(HEALTHY, 0.9) == pytest.approx(0.8)
    assert sensitivity_at_specificity(SCORES, LABELS, 0.9) == pytest.approx(3 / 4)
    # 95 %: ceil(9.5) = 10th smallest, 0.9: flagged 0.95, 1.0
    assert sensitivity_at_specificity(SCORES, LABELS, 0.95) == pytest.approx(2 / 4)
    # a lesion study tied with the threshold is not flagged
    tied = np.concatenate([[0.8], HEALTHY])
    assert sensitivity_at_specificity(tied, np.array([True] + [False] * 10), 0.9) == 0.0


def test_perfect_separation_has_a_degenerate_interval() -> None:
    m = study_metrics(SCORES + LABELS * 2.0, LABELS, resamples=200, seed=3)
    assert (m.auroc, m.auroc_ci, m.sensitivity, m.sensitivity_ci) == (1.0, (1.0, 1.0), 1.0, (1.0, 1.0))
    assert (m.n_lesion, m.n_healthy) == (4, 10)


def test_bootstrap_is_stratified_seeded_and_shrinks_with_more_studies() -> None:
    idx = bootstrap_indices(LABELS, 100, seed=1)
    assert idx.shape == (100, 14)
    assert LABELS[idx].sum(axis=1).tolist() == [4] * 100  # every resample keeps the class sizes
    assert np.array_equal(idx, bootstrap_indices(LABELS, 100, seed=1))
    lo, hi = bootstrap(study_auroc, SCORES, LABELS, 500, seed=0)
    assert lo <= study_auroc(SCORES, LABELS) <= hi and hi - lo > 0.05
    assert (lo, hi) != bootstrap(study_auroc, SCORES, LABELS, 500, seed=1)
    rng = np.random.default_rng(0)
    big_labels = np.repeat([True, False], 400)
    big = rng.normal(size=800) + big_labels
    small = np.r_[big[:20], big[400:420]]
    small_labels = np.repeat([True, False], 20)
    lo_s, hi_s = bootstrap(study_auroc, small, small_labels, 500, seed=0)
    lo_b, hi_b = bootstrap(study_auroc, big, big_labels, 500, seed=0)
    assert hi_b - lo_b < (hi_s - lo_s) / 2


def test_paired_difference() -> None:
    same = paired_difference(study_auroc, SCORES, SCORES, LABELS, 100, seed=0)
    assert same == (0.0, 0.0, 0.0)
    better = SCORES + LABELS * 2.0  # perfect
    diff, lo, hi = paired_difference(study_auroc, better, SCORES, LABELS, 300, seed=0)
    assert diff == pytest.approx(1 - study_auroc(SCORES, LABELS)) and 0.0 <= lo <= diff <= hi
    with pytest.raises(ValueError, match="same studies"):
        paired_difference(study_auroc, SCORES, SCORES[:5], LABELS, 10)


def test_per_kind_study_metrics_compare_each_kind_with_every_healthy_study() -> None:
    # nodules score above every healthy study, ground glass below every one
    per_case = [{"kind": "nodule", "lesion_study": True, "study_score": s} for s in (2.0, 3.0)]
    per_case += [{"kind": "ggo", "lesion_study": True, "study_score": s} for s in (-1.0, -2.0)]
    per_case += [{"kind": "none", "lesion_study": False, "study_score": float(s)} for s in HEALTHY]
    overall, by_kind = triage(per_case, seed=0, resamples=50)
    assert overall is not None and overall.auroc == pytest.approx(0.5)
    assert (by_kind["nodule"].auroc, by_kind["nodule"].sensitivity) == (1.0, 1.0)
    assert (by_kind["ggo"].auroc, by_kind["ggo"].sensitivity) == (0.0, 0.0)
    assert (by_kind["ggo"].n_lesion, by_kind["ggo"].n_healthy) == (2, 10)
    assert triage(per_case[:4], seed=0) == (None, {})  # no healthy study: nothing to rank against


def test_interval_formatting() -> None:
    assert with_interval(0.8125, (0.7, 0.9)) == "0.812 [0.700, 0.900]"
    assert with_interval(float("nan"), (0.0, 1.0)) == "n/a"
