"""Evaluation on held-out phantoms: what the worklist decides, and segmentation metrics, row by row.

Metrics (implemented here and in `inference.study_metrics` with numpy/scipy, unit-tested against hand values):
- study level (the triage decision): per study the score the node ranks its worklist by (the pipeline's
  `study_score`: the maximum of the slice scores); study AUROC and sensitivity at 90 % specificity, each with a
  95 % bootstrap interval over studies, overall and per lesion kind (that kind's lesion studies against all
  healthy ones).
- pixel level, per case, over the voxels of the exact lungs together with the node's anatomy mask (a lesion the
  node's mask leaves out is a miss, not ignored): Dice, IoU, precision, recall, false-positive rate,
  AUROC and AUPRC of the anomaly map against the lesion mask. Reported as mean (std) over lesion cases
  (FPR over all cases: healthy controls show false positives only).
- slice level (CT), over all slices of all cases (a slice is positive when it holds lesion pixels): AUROC and
  AUPRC of the slice score, F1 of "the slice has a segmented pixel". For a radiograph the one image is the study.

Everything runs on the model grid (the pipeline's `detect` on normalised, resampled slices with the same anatomy
mask the node computes); ground truth is resampled there too (a model-grid pixel is a lesion pixel when at least
`GT_FRACTION` of its area is lesion). The held-out sets are `inference.heldout`'s.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from inference.heldout import GT_FRACTION, Case
from inference.pipeline import PipelineSettings
from inference.study_metrics import BOOTSTRAP_RESAMPLES, StudyMetrics, study_metrics
from inference.unet import ModelInfo, UNet

__all__ = ["GT_FRACTION", "Case"]  # re-exported: the evaluation's cases and ground-truth rule live in heldout

# Ablation models trained identically (same data, steps, seed) except for the one component; file names in the
# --ablations folder. Rows 2-6 use them when present, else the shipped weights with the component switched off at
# inference only (the report says which).
ABLATION_MODELS = {
    "gaussian": "ablation-gaussian.safetensors",  # Gaussian noise, no mask condition
    "uncond": "ablation-uncond.safetensors",  # simplex noise, no mask condition
    "simplex": "ablation-simplex.safetensors",  # simplex noise, mask condition (the method, same budget)
}
CT_THRESHOLD_HU = -400.0  # the CT baseline: lung denser than this is abnormal
NODE_STEPS = PipelineSettings().steps  # the node's reverse steps per member: the rows that stand for the node use it
NODE_T_START = PipelineSettings().t_start  # the node's depth per modality: the rows, comparisons and header name it

# --- metrics ------------------------------------------------------------------------------------------------


def confusion(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) of two boolean arrays."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    return tp, fp, fn, int(pred.size - tp - fp - fn)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2|P and G| / (|P| + |G|); 1 when both are empty."""
    tp, fp, fn, _ = confusion(pred, truth)
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    tp, fp, fn, _ = confusion(pred, truth)
    return 1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn)


def precision(pred: np.ndarray, truth: np.ndarray) -> float:
    """TP / (TP + FP); with no positive prediction: 1 if there is nothing to find, else 0."""
    tp, fp, fn, _ = confusion(pred, truth)
    return (1.0 if fn == 0 else 0.0) if tp + fp == 0 else tp / (tp + fp)


def recall(pred: np.ndarray, truth: np.ndarray) -> float:
    tp, _, fn, _ = confusion(pred, truth)
    return 1.0 if tp + fn == 0 else tp / (tp + fn)


def false_positive_rate(pred: np.ndarray, truth: np.ndarray) -> float:
    _, fp, _, tn = confusion(pred, truth)
    return 0.0 if fp + tn == 0 else fp / (fp + tn)


def f1(pred: np.ndarray, truth: np.ndarray) -> float:
    return dice(pred, truth)


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties); NaN with one class only."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels, bool).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auprc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision: sum over score thresholds of (recall gain) x precision; NaN without positives."""
    scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels, bool).ravel()
    n_pos = int(labels.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each group of tied scores
    tp, fp = tp[last], fp[last]
    prec = tp / (tp + fp)
    rec = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, rec]) * prec))


# --- rows ---------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: how the anomaly map is made and thresholded."""

    label: str
    method: str = "diffusion"  # diffusion | intensity
    noise: str = "simplex"
    condition: bool = True
    adaptive: bool = True
    ensemble: int = 1
    steps: int | None = NODE_STEPS  # None: every timestep
    model: str = "shipped"  # which weights: "shipped", or an ablation model's name (see ABLATION_MODELS)
    median: bool = True  # the median filters of the error and score maps (PipelineSettings.median_size, score_...)
    max_cases: int | None = None  # evaluate on the first n lesion cases and n healthy ones only (costly rows)
    max_slices: int | None = None  # and on n slices of each: centred on the lesion, or central lung slices
    note: str = ""
    key: str = ""  # names the row for the findings (see evaluation_tables.COMPARISONS)
    threshold: float = CT_THRESHOLD_HU  # intensity rows: the value above which a pixel inside the mask is abnormal
    t_start: int | None = None  # diffusion depth (None: the pipeline's default for the modality)
    deep_t_start: int | None = None  # a mixed-depth ensemble: every other member starts this deep

    @property
    def whole_studies(self) -> bool:
        """Every slice of every study: only then is the study score the node's (triage metrics need it)."""
        return self.max_slices is None


@dataclass
class RowResult:
    row: Row
    per_case: list[dict[str, Any]]  # metrics (float), "kind" (str), "study_score" and "lesion_study"
    image: dict[str, float]  # slice level (CT); for radiographs the one image is the study
    seconds_per_slice: float
    n_cases: int
    n_slices: int
    extra: dict[str, object] = field(default_factory=dict)
    study: StudyMetrics | None = None  # triage metrics over all studies (None: slice subset, or one class only)
    study_by_kind: dict[str, StudyMetrics] = field(default_factory=dict)  # each kind's lesion studies vs healthy

    def summary(self, key: str, lesion_only: bool = True) -> tuple[float, float]:
        vals = [c[key] for c in self.per_case if (c["lesion"] or not lesion_only) and not np.isnan(c[key])]
        return (float(np.mean(vals)), float(np.std(vals))) if vals else (float("nan"), float("nan"))

    @property
    def seconds_per_study(self) -> float:
        return self.seconds_per_slice * self.n_slices / max(self.n_cases, 1)

    def study_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """(scores, labels) per study, in case order (the same order for every row run on the same cases)."""
        scores = np.array([c["study_score"] for c in self.per_case], np.float64)
        labels = np.array([c["lesion_study"] for c in self.per_case], bool)
        return scores, labels


class ModelDenoiser:
    """The Denoiser protocol over a UNet in fp32 with torch (evaluation needs nothing faster)."""

    def __init__(self, model: UNet, info: ModelInfo, max_batch: int = 24) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.dtype = torch.float32
        self.max_batch = max_batch
        self.model_id = info.model_id
        self.grid = info.config.image_size
        self.training = info.training  # its noise spectrum (PipelineSettings.for_model)
        self.name = f"torch-{self.device.type}-fp32"

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x_t, cond, t)


def _subset(cases: Sequence[Case], row: Row) -> list[Case]:
    if row.max_cases is None:
        chosen = list(cases)
    else:
        lesion = [c for c in cases if c.kind != "none"][: row.max_cases]
        healthy = [c for c in cases if c.kind == "none"][: row.max_cases]
        chosen = lesion + healthy
    if row.max_slices is None:
        return chosen
    out = []
    for c in chosen:
        # lesion cases: slices centred on the slice with the most lesion; controls: the central lung slices
        lung_slices = np.flatnonzero(c.anatomy.any(axis=(1, 2)))
        if c.lesion.any():
            centre = int(np.argmax(c.lesion.sum(axis=(1, 2))))
        else:
            centre = int(lung_slices[len(lung_slices) // 2]) if len(lung_slices) else len(c.image) // 2
        first = min(max(0, centre - row.max_slices // 2), max(0, len(c.image) - row.max_slices))
        pick = np.arange(first, min(len(c.image), first + row.max_slices))
        out.append(
            replace(
                c,
                image=c.image[pick],
                anatomy=c.anatomy[pick],
                lesion=c.lesion[pick],
                lung=c.lung[pick],
                intensities=c.intensities[pick],
            )
        )
    return out


def intensity_baseline(case: Case, threshold: float = CT_THRESHOLD_HU) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anomaly map = the source value inside the anatomy mask (HU for CT, brightness for a radiograph's lung
    field); segmentation = values above `threshold` there (dense lung is bright on both)."""
    floor = -1000.0 if case.modality == "CT" else 0.0
    score_map = np.where(case.anatomy, case.intensities, floor).astype(np.float32)
    seg = case.anatomy & (case.intensities > threshold)
    slice_scores = np.array(
        [np.percentile(score_map[k][case.anatomy[k]], 99) if case.anatomy[k].any() else floor for k in range(len(seg))]
    )
    return score_map, seg, slice_scores


def evaluate_row(
    row: Row,
    cases: Sequence[Case],
    denoiser: ModelDenoiser | None,
    seed: int,
    lam: float,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> RowResult:
    """Run one row on its cases; metrics per case, slice level over all slices, study level over all studies."""
    from inference.pipeline import detect

    chosen = _subset(cases, row)
    per_case = []
    slice_scores, slice_pred, slice_truth = [], [], []
    start = time.perf_counter()
    n_slices = 0
    for case in chosen:
        if row.method == "intensity":
            amap, seg, scores = intensity_baseline(case, row.threshold)
            # the node's study score: the maximum of the slice scores (postprocess.detect_anomalies)
            study_score = float(scores.max()) if scores.size else 0.0
        else:
            assert denoiser is not None
            defaults = PipelineSettings()
            settings = PipelineSettings(
                t_start={case.modality: row.t_start or defaults.t_start_for(case.modality)},
                deep_t_start={case.modality: row.deep_t_start} if row.deep_t_start else {},
                steps=row.steps or 10,
                stride=1 if row.steps is None else None,
                ensemble=row.ensemble,
                threshold_lambda={case.modality: lam},
                seed=seed,
                noise=row.noise,  # type: ignore[arg-type]
                use_mask_condition=row.condition,
                adaptive_threshold=row.adaptive,
            ).for_model(denoiser.training)  # the model's noise spectrum and segmentation sizes
            if not row.median:
                settings = replace(settings, median_size=1, score_median_size=1)
            det = detect(case.image, case.anatomy, denoiser, settings, case.modality)
            amap, seg, scores = det.anomaly_map, det.segmentation, det.slice_scores
            study_score = det.study_score  # exactly what the node sends in its SR and ranks the worklist by
        n_slices += len(seg)
        # scored region: the exact lungs and the node's mask together, so lesions its mask misses count as misses
        inside = case.anatomy | case.lung | case.lesion
        truth = case.lesion
        has_lesion = bool(truth.any())
        per_case.append(
            {
                "kind": case.kind,
                "lesion": float(has_lesion),
                "lesion_study": case.lesion_study,
                "study_score": study_score,
                "dice": dice(seg[inside], truth[inside]) if has_lesion else float("nan"),
                "iou": iou(seg[inside], truth[inside]) if has_lesion else float("nan"),
                "precision": precision(seg[inside], truth[inside]) if has_lesion else float("nan"),
                "recall": recall(seg[inside], truth[inside]) if has_lesion else float("nan"),
                "fpr": false_positive_rate(seg[inside], truth[inside]),
                "auroc": auroc(amap[inside], truth[inside]) if has_lesion else float("nan"),
                "auprc": auprc(amap[inside], truth[inside]) if has_lesion else float("nan"),
            }
        )
        slice_scores.append(np.asarray(scores, np.float64))
        slice_pred.append(seg.any(axis=(1, 2)))
        slice_truth.append(truth.any(axis=(1, 2)))
    elapsed = time.perf_counter() - start
    s, p, y = np.concatenate(slice_scores), np.concatenate(slice_pred), np.concatenate(slice_truth)
    image = {"auroc": auroc(s, y), "auprc": auprc(s, y), "f1": f1(p, y) if y.any() else float("nan")}
    result = RowResult(row, per_case, image, elapsed / max(n_slices, 1), len(chosen), n_slices)
    if row.whole_studies:
        result.study, result.study_by_kind = triage(per_case, seed, resamples)
    return result


def triage(
    per_case: Sequence[dict[str, Any]], seed: int, resamples: int = BOOTSTRAP_RESAMPLES
) -> tuple[StudyMetrics | None, dict[str, StudyMetrics]]:
    """Study metrics over all studies and per lesion kind (that kind's lesion studies against every healthy one)."""
    scores = np.array([c["study_score"] for c in per_case], np.float64)
    labels = np.array([c["lesion_study"] for c in per_case], bool)
    kinds = np.array([str(c["kind"]) for c in per_case])
    if not labels.any() or labels.all():
        return None, {}
    overall = study_metrics(scores, labels, resamples, seed)
    by_kind = {}
    for kind in dict.fromkeys(kinds[labels]):
        pick = (kinds == kind) | ~labels
        by_kind[str(kind)] = study_metrics(scores[pick], labels[pick], resamples, seed)
    return overall, by_kind


DEEP_T_START = 550  # SAC-Diff's T_s (of T = 1000): deep enough to heal large diffuse findings
RADIOGRAPH_EARLIER_T_START = 250  # the radiographs' depth until validation chose a shallower one (docs/method.md)


def default_rows(
    ensemble: int,
    subset_cases: int,
    subset_slices: int,
    every_step_cases: int,
    every_step_slices: int,
    trained_t_max: int | None = None,
) -> list[Row]:
    """The ablation ladder of docs/EVALUATION.md; the costly rows (25, 50, every step) run on subsets. The deep and
    mixed-depth rows are added for a model trained on timesteps up to DEEP_T_START (`trained_t_max`)."""
    k = ensemble
    where = "centred on the lesion; controls: central lung slices"
    subset = f"subset: {subset_cases} lesion + {subset_cases} healthy cases, {subset_slices} slices each ({where})"
    every = (
        f"subset: {every_step_cases} lesion + {every_step_cases} healthy cases, "
        f"{every_step_slices} slices each ({where})"
    )
    steps = NODE_STEPS
    other = 10 if steps != 10 else 5
    return [
        Row("Intensity threshold (> -400 HU in lung)", method="intensity", key="baseline"),
        Row("DDPM, Gaussian noise", noise="gaussian", condition=False, adaptive=False, model="gaussian", key="ddpm"),
        Row("Simplex noise", condition=False, adaptive=False, model="uncond", key="simplex"),
        Row("Simplex + mask conditioning", condition=True, adaptive=False, model="simplex", key="mask"),
        Row("Simplex + adaptive threshold", condition=False, adaptive=True, model="uncond", key="adaptive"),
        Row("Simplex + mask + adaptive threshold", condition=True, adaptive=True, model="simplex", key="mask+adaptive"),
        Row(f"Simplex + mask + adaptive + K={k} ensemble, {steps} steps", ensemble=k, steps=steps, key="full"),
        Row(f"Full method, K={k}, {other} steps", ensemble=k, steps=other, key="steps-other"),
        Row(
            f"Full method, K={k}, 10 steps (subset)",
            ensemble=k,
            steps=10,
            max_cases=subset_cases,
            max_slices=subset_slices,
            note=subset,
            key="subset-10",
        ),
        Row(
            f"Full method, K={k}, 25 steps",
            ensemble=k,
            steps=25,
            max_cases=subset_cases,
            max_slices=subset_slices,
            note=subset,
            key="subset-25",
        ),
        Row(
            f"Full method, K={k}, 50 steps",
            ensemble=k,
            steps=50,
            max_cases=subset_cases,
            max_slices=subset_slices,
            note=subset,
            key="subset-50",
        ),
        Row(
            f"Full method, K={k}, every step (251)",
            ensemble=k,
            steps=None,
            max_cases=every_step_cases,
            max_slices=every_step_slices,
            note=every,
            key="every-step",
        ),
        Row(
            f"Full method without the median filter, K={k}, {steps} steps",
            ensemble=k,
            steps=steps,
            median=False,
            key="no-median",
        ),
        *(deep_rows(k) if trained_t_max is not None and trained_t_max >= DEEP_T_START else []),
    ]


def deep_rows(ensemble: int) -> list[Row]:
    """Item 4 of the models issue: every member from DEEP_T_START, and members alternating CT's t_start with it."""
    k, shallow = ensemble, NODE_T_START["CT"]
    return [
        Row(
            f"Full method, K={k}, {NODE_STEPS} steps, all members from t_start {DEEP_T_START}",
            ensemble=k,
            steps=NODE_STEPS,
            t_start=DEEP_T_START,
            key="deep",
        ),
        Row(
            f"Full method, K={k}, {NODE_STEPS} steps, mixed depth: members alternate t_start {shallow} / "
            f"{DEEP_T_START}",
            ensemble=k,
            steps=NODE_STEPS,
            deep_t_start=DEEP_T_START,
            key="mixed",
        ),
    ]


def triage_rows(ensemble: int, trained_t_max: int | None = None) -> list[Row]:
    """The CT rows of the out-of-distribution set: the threshold baseline, the full method and its deeper starts."""
    rows = default_rows(ensemble, 1, 1, 1, 1, trained_t_max)
    return [r for r in rows if r.key in ("baseline", "full", "deep", "mixed")]


def radiograph_rows(ensemble: int, brightness_threshold: float, with_model: bool) -> list[Row]:
    """Radiograph rows: the lung-field brightness threshold, and the radiograph model's full method when given,
    beside the same from the depth radiographs started at before (its row in the comparisons)."""
    baseline = Row(
        f"Brightness threshold (> {brightness_threshold:.3f} in the lung field)",
        method="intensity",
        threshold=brightness_threshold,
        key="baseline",
    )
    if not with_model:
        return [baseline]
    method = f"Radiograph model: simplex + mask + adaptive + K={ensemble}, {NODE_STEPS} steps"
    return [
        baseline,
        Row(
            f"{method}, t_start {NODE_T_START['DX']}",
            ensemble=ensemble,
            steps=NODE_STEPS,
            key="full",
        ),
        Row(
            f"{method}, t_start {RADIOGRAPH_EARLIER_T_START}",
            ensemble=ensemble,
            steps=NODE_STEPS,
            t_start=RADIOGRAPH_EARLIER_T_START,
            key="radiograph-earlier-depth",
        ),
    ]
