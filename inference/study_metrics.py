"""Study-level metrics: what the worklist decides, with bootstrap confidence intervals over studies.

The node ranks its worklist by one number per study (the job's score: the pipeline's `study_score`, the maximum of
its slice scores, maximum again over a study's series) and a site flags a study when that number passes a
threshold. So the triage questions are: does a lesion study score above a healthy one (study AUROC), and how many
lesion studies are flagged at a threshold that leaves 90 % of healthy studies unflagged (sensitivity at 90 %
specificity)?

With a few dozen studies these numbers move a lot from one sample to the next, so each comes with a 95 %
percentile bootstrap interval over studies: lesion and healthy studies are resampled separately (stratified, so
every resample has both classes and the same prevalence), with a fixed seed so the report is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

SPECIFICITY = 0.9
BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95

Statistic = Callable[[np.ndarray, np.ndarray], float]


def _split(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels, bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    return s[y], s[~y]


def study_auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(a lesion study scores above a healthy one), ties counting one half; NaN without both classes."""
    pos, neg = _split(scores, labels)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


def operating_threshold(healthy_scores: np.ndarray, specificity: float = SPECIFICITY) -> float:
    """The lowest threshold t with at least `specificity` of the healthy studies at or below it.

    A study is flagged when its score is above t. t is a healthy study's score (the ceil(spec * n)-th smallest),
    so a lesion study tied with it is not flagged: ties count against the method.
    """
    neg = np.sort(np.asarray(healthy_scores, np.float64).ravel())
    if neg.size == 0:
        return float("nan")
    k = max(1, math.ceil(specificity * neg.size - 1e-9))
    return float(neg[k - 1])


def sensitivity_at_specificity(scores: np.ndarray, labels: np.ndarray, specificity: float = SPECIFICITY) -> float:
    """Fraction of lesion studies flagged (score > the `operating_threshold` of the healthy ones)."""
    pos, neg = _split(scores, labels)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    return float(np.mean(pos > operating_threshold(neg, specificity)))


def bootstrap_indices(labels: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) study indices, lesion and healthy studies each drawn with replacement from their own class.

    The same indices applied to two methods' scores on the same studies give a paired comparison.
    """
    y = np.asarray(labels, bool).ravel()
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, y.size), dtype=np.int64)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    out[:, : pos.size] = pos[rng.integers(0, pos.size, (resamples, pos.size))] if pos.size else 0
    out[:, pos.size :] = neg[rng.integers(0, neg.size, (resamples, neg.size))] if neg.size else 0
    return out


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central `confidence` interval of bootstrap values (NaN resamples left out)."""
    v = np.asarray(values, np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(v, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap(
    statistic: Statistic,
    scores: np.ndarray,
    labels: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(scores, labels)` over studies (stratified, fixed seed)."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels, bool).ravel()
    idx = bootstrap_indices(y, resamples, seed)
    values = np.array([statistic(s[i], y[i]) for i in idx])
    return percentile_interval(values, confidence)


def paired_difference(
    statistic: Statistic,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    labels: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> tuple[float, float, float]:
    """statistic(a) - statistic(b) on the same studies, and its paired bootstrap interval (same resamples)."""
    a = np.asarray(scores_a, np.float64).ravel()
    b = np.asarray(scores_b, np.float64).ravel()
    y = np.asarray(labels, bool).ravel()
    if a.shape != b.shape:
        raise ValueError("a paired comparison needs both methods' scores on the same studies")
    idx = bootstrap_indices(y, resamples, seed)
    values = np.array([statistic(a[i], y[i]) - statistic(b[i], y[i]) for i in idx])
    lo, hi = percentile_interval(values, confidence)
    return statistic(a, y) - statistic(b, y), lo, hi


@dataclass(frozen=True)
class StudyMetrics:
    """Triage metrics of one method on one set of studies."""

    n_lesion: int
    n_healthy: int
    auroc: float
    auroc_ci: tuple[float, float]
    sensitivity: float  # at `specificity`
    sensitivity_ci: tuple[float, float]
    threshold: float  # the study-score threshold of that operating point
    specificity: float = SPECIFICITY


def study_metrics(
    scores: np.ndarray,
    labels: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    specificity: float = SPECIFICITY,
) -> StudyMetrics:
    """Study AUROC and sensitivity at `specificity`, each with its 95 % bootstrap interval over studies."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels, bool).ravel()

    def sens(sc: np.ndarray, lab: np.ndarray) -> float:
        return sensitivity_at_specificity(sc, lab, specificity)

    return StudyMetrics(
        n_lesion=int(y.sum()),
        n_healthy=int((~y).sum()),
        auroc=study_auroc(s, y),
        auroc_ci=bootstrap(study_auroc, s, y, resamples, seed),
        sensitivity=sens(s, y),
        sensitivity_ci=bootstrap(sens, s, y, resamples, seed),
        threshold=operating_threshold(s[~y], specificity),
        specificity=specificity,
    )


def with_interval(value: float, interval: tuple[float, float]) -> str:
    """'0.812 [0.700, 0.905]' (n/a for NaN)."""
    if np.isnan(value):
        return "n/a"
    lo, hi = interval
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"
