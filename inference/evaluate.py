"""Evaluation on held-out phantoms: segmentation and detection metrics, ablation by ablation.

Metrics (implemented here with numpy/scipy, unit-tested against hand values):
- pixel level, per case, over the voxels of the exact lungs together with the node's anatomy mask (a lesion the
  node's mask leaves out is a miss, not ignored): Dice, IoU, precision, recall, false-positive rate,
  AUROC and AUPRC of the anomaly map against the lesion mask. Reported as mean (std) over lesion cases
  (FPR over all cases: healthy controls show false positives only).
- image level, over all slices of all cases (a slice is positive when it holds lesion pixels): AUROC and AUPRC of
  the slice score, F1 of "the slice has a segmented pixel".

Everything runs on the model grid (the pipeline's `detect` on normalised, resampled slices with the same anatomy
mask the node computes); ground truth is resampled there too (a model-grid pixel is a lesion pixel when at least
`GT_FRACTION` of its area is lesion).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata

from inference.unet import ModelInfo, UNet

GT_FRACTION = 0.25
# Ablation models trained identically (same data, steps, seed) except for the one component; file names in the
# --ablations folder. Rows 2-6 use them when present, else the shipped weights with the component switched off at
# inference only (the report says which).
ABLATION_MODELS = {
    "gaussian": "ablation-gaussian.safetensors",  # Gaussian noise, no mask condition
    "uncond": "ablation-uncond.safetensors",  # simplex noise, no mask condition
    "simplex": "ablation-simplex.safetensors",  # simplex noise, mask condition (the method, same budget)
}


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


# --- the evaluation set ---------------------------------------------------------------------------------------


@dataclass
class Case:
    """One held-out phantom on the model grid."""

    name: str
    kind: str  # lesion type, or "none" for a healthy control
    image: np.ndarray  # (Z, S, S) in [-1, 1]
    anatomy: np.ndarray  # (Z, S, S) bool: the mask the node computes (condition + threshold background)
    lesion: np.ndarray  # (Z, S, S) bool ground truth on the model grid
    lung: np.ndarray  # (Z, S, S) bool: the phantom's exact lungs on the model grid
    hu_image: np.ndarray  # (Z, S, S) HU resampled (for the intensity baseline)


def make_cases(
    seed: int, lesion_cases: int, healthy_cases: int, grid: int, size: int = 256, slices: int = 20
) -> list[Case]:
    """Held-out phantoms (seeds disjoint from training's), lesion kinds in rotation, plus healthy controls."""
    from inference.lungmask import anatomy_mask
    from inference.phantoms import LESION_KINDS, make_ct
    from inference.simplex import splitmix64
    from inference.volume import GridMapping, normalise, resample_to_grid

    kinds = [*LESION_KINDS, "mixed"]
    plan = [kinds[i % len(kinds)] for i in range(lesion_cases)] + ["none"] * healthy_cases
    cases = []
    for i, kind in enumerate(plan):
        case_seed = splitmix64(1_000_003 + seed, i) % 2**31
        ph = make_ct(case_seed, size, size, slices, kind)
        mapping = GridMapping(rows=size, cols=size, size=grid)
        # phantom slices run feet to head, like an axial series sorted along its normal (0, 0, 1)
        spacing = ph.grid.spacing
        anatomy = anatomy_mask(ph.hu, "CT", (spacing[1], spacing[2]), np.array([0.0, 0.0, 1.0]), spacing[0])
        cases.append(
            Case(
                name=f"{kind}-{i}",
                kind=kind,
                image=resample_to_grid(normalise(ph.hu, "CT"), mapping, fill=-1.0),
                anatomy=resample_to_grid(anatomy.astype(np.float32), mapping) >= 0.5,
                lesion=resample_to_grid(ph.lesion_mask.astype(np.float32), mapping) >= GT_FRACTION,
                lung=resample_to_grid(ph.lung_mask.astype(np.float32), mapping) >= 0.5,
                hu_image=resample_to_grid(ph.hu, mapping, fill=-1000.0),
            )
        )
    return cases


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
    steps: int | None = 10  # None: every timestep
    model: str = "shipped"  # which weights: "shipped", or an ablation model's name (see ABLATION_MODELS)
    median: bool = True  # the 3x3 median filter of the error map (PipelineSettings.median_size)
    max_cases: int | None = None  # evaluate on the first n lesion cases and n healthy ones only (costly rows)
    max_slices: int | None = None  # and on n slices of each: centred on the lesion, or central lung slices
    note: str = ""
    key: str = ""  # names the row for the findings (see COMPARISONS)


@dataclass
class RowResult:
    row: Row
    per_case: list[dict[str, Any]]  # metrics (float) and "kind" (str)
    image: dict[str, float]
    seconds_per_slice: float
    n_cases: int
    n_slices: int
    extra: dict[str, object] = field(default_factory=dict)

    def summary(self, key: str, lesion_only: bool = True) -> tuple[float, float]:
        vals = [c[key] for c in self.per_case if (c["lesion"] or not lesion_only) and not np.isnan(c[key])]
        return (float(np.mean(vals)), float(np.std(vals))) if vals else (float("nan"), float("nan"))


class ModelDenoiser:
    """The Denoiser protocol over a UNet in fp32 with torch (evaluation needs nothing faster)."""

    def __init__(self, model: UNet, info: ModelInfo, max_batch: int = 24) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.dtype = torch.float32
        self.max_batch = max_batch
        self.model_id = info.model_id
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
                hu_image=c.hu_image[pick],
            )
        )
    return out


def intensity_baseline(case: Case, threshold_hu: float = -400.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anomaly map = HU inside the anatomy mask; segmentation = HU above `threshold_hu` there (dense lung)."""
    score_map = np.where(case.anatomy, case.hu_image, -1000.0).astype(np.float32)
    seg = case.anatomy & (case.hu_image > threshold_hu)
    slice_scores = np.array(
        [
            np.percentile(score_map[k][case.anatomy[k]], 99) if case.anatomy[k].any() else -1000.0
            for k in range(len(seg))
        ]
    )
    return score_map, seg, slice_scores


def evaluate_row(row: Row, cases: Sequence[Case], denoiser: ModelDenoiser | None, seed: int, lam: float) -> RowResult:
    """Run one row on its cases; metrics per case, image-level over all slices."""
    from inference.pipeline import PipelineSettings, detect

    chosen = _subset(cases, row)
    per_case = []
    slice_scores, slice_pred, slice_truth = [], [], []
    start = time.perf_counter()
    n_slices = 0
    for case in chosen:
        if row.method == "intensity":
            amap, seg, scores = intensity_baseline(case)
        else:
            assert denoiser is not None
            settings = PipelineSettings(
                steps=row.steps or 10,
                stride=1 if row.steps is None else None,
                ensemble=row.ensemble,
                threshold_lambda={"CT": lam},
                seed=seed,
                noise=row.noise,  # type: ignore[arg-type]
                use_mask_condition=row.condition,
                adaptive_threshold=row.adaptive,
                median_size=3 if row.median else 1,
            )
            det = detect(case.image, case.anatomy, denoiser, settings, "CT")
            amap, seg, scores = det.anomaly_map, det.segmentation, det.slice_scores
        n_slices += len(seg)
        # scored region: the exact lungs and the node's mask together, so lesions its mask misses count as misses
        inside = case.anatomy | case.lung | case.lesion
        truth = case.lesion
        has_lesion = bool(truth.any())
        per_case.append(
            {
                "kind": case.kind,
                "lesion": float(has_lesion),
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
    return RowResult(row, per_case, image, elapsed / max(n_slices, 1), len(chosen), n_slices)


def default_rows(
    ensemble: int, subset_cases: int, subset_slices: int, every_step_cases: int, every_step_slices: int
) -> list[Row]:
    """The ablation ladder of docs/EVALUATION.md; the costly rows (25, 50, every step) run on subsets."""
    k = ensemble
    where = "centred on the lesion; controls: central lung slices"
    subset = f"subset: {subset_cases} lesion + {subset_cases} healthy cases, {subset_slices} slices each ({where})"
    every = (
        f"subset: {every_step_cases} lesion + {every_step_cases} healthy cases, "
        f"{every_step_slices} slices each ({where})"
    )
    return [
        Row("Intensity threshold (> -400 HU in lung)", method="intensity", key="baseline"),
        Row("DDPM, Gaussian noise", noise="gaussian", condition=False, adaptive=False, model="gaussian", key="ddpm"),
        Row("Simplex noise", condition=False, adaptive=False, model="uncond", key="simplex"),
        Row("Simplex + mask conditioning", condition=True, adaptive=False, model="simplex", key="mask"),
        Row("Simplex + adaptive threshold", condition=False, adaptive=True, model="uncond", key="adaptive"),
        Row("Simplex + mask + adaptive threshold", condition=True, adaptive=True, model="simplex", key="mask+adaptive"),
        Row(f"Simplex + mask + adaptive + K={k} ensemble, 10 steps", ensemble=k, steps=10, key="full"),
        Row(f"Full method, K={k}, 5 steps", ensemble=k, steps=5, key="steps-5"),
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
            f"Full method without the median filter, K={k}, 10 steps",
            ensemble=k,
            steps=10,
            median=False,
            key="no-median",
        ),
    ]


def fmt(mean: float, std: float) -> str:
    return "n/a" if np.isnan(mean) else f"{mean:.3f} ({std:.3f})"


def markdown_table(results: Sequence[RowResult]) -> str:
    head = (
        "| Row | Dice | IoU | Precision | Recall | FPR (all cases) | Pixel AUROC | Pixel AUPRC "
        "| Image AUROC | Image AUPRC | Image F1 | s/slice | cases / slices |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in results:
        cells = [fmt(*r.summary(k)) for k in ("dice", "iou", "precision", "recall")]
        cells.append(fmt(*r.summary("fpr", lesion_only=False)))
        cells += [fmt(*r.summary(k)) for k in ("auroc", "auprc")]
        cells += [("n/a" if np.isnan(r.image[k]) else f"{r.image[k]:.3f}") for k in ("auroc", "auprc", "f1")]
        label = r.row.label + (f" [{r.row.note}]" if r.row.note else "")
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {r.seconds_per_slice:.3f} | {r.n_cases} / {r.n_slices} |"
        )
    return head + "\n".join(lines) + "\n"


def kind_table(result: RowResult) -> str:
    """One row's pixel metrics per lesion kind (mean over that kind's cases): which lesions the method finds."""
    head = "| Lesion kind | cases | Dice | Precision | Recall | Pixel AUROC |\n|---|---|---|---|---|---|\n"
    lines = []
    for kind in dict.fromkeys(str(c["kind"]) for c in result.per_case if c["lesion"]):
        chosen = [c for c in result.per_case if c["kind"] == kind]
        cells = []
        for key in ("dice", "precision", "recall", "auroc"):
            vals = [float(c[key]) for c in chosen if not np.isnan(c[key])]
            cells.append(fmt(float(np.mean(vals)), float(np.std(vals))) if vals else "n/a")
        lines.append(f"| {kind} | {len(chosen)} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


# What each comparison asks: (with, without, question). Rows missing from a run (--rows) are skipped.
COMPARISONS = (
    ("simplex", "ddpm", "Simplex instead of Gaussian noise"),
    ("mask", "simplex", "Mask conditioning"),
    ("adaptive", "simplex", "Adaptive threshold (unconditioned)"),
    ("mask+adaptive", "mask", "Adaptive threshold (conditioned)"),
    ("full", "mask+adaptive", "K-ensemble (and the shipped weights, when rows 2-6 use ablation models)"),
    ("full", "no-median", "Median filter of the error map"),
    ("full", "steps-5", "10 instead of 5 reverse steps"),
    ("subset-25", "subset-10", "25 instead of 10 reverse steps (subset)"),
    ("subset-50", "subset-10", "50 instead of 10 reverse steps (subset)"),
    ("full", "baseline", "The full method instead of the intensity baseline"),
)
NO_CHANGE = 0.01  # a metric moving by less than this counts as unchanged
GOALS = {"dice": 0.5, "auroc": 0.95}  # issue goals for the full method on lesion cases / images


def _direction(delta: float) -> int:
    return 0 if np.isnan(delta) or abs(delta) < NO_CHANGE else (1 if delta > 0 else -1)


def verdict(d_dice: float, d_auroc: float) -> str:
    """Earns its place when Dice or image AUROC rises and neither falls (by more than NO_CHANGE)."""
    a, b = _direction(d_dice), _direction(d_auroc)
    if a == b == 0:
        return "no measurable difference"
    if a >= 0 and b >= 0:
        return "earns its place"
    if a <= 0 and b <= 0:
        return "does not earn its place here"
    return "mixed (one metric up, the other down)"


def findings(results: Sequence[RowResult]) -> str:
    """The comparisons the table answers, worked out from the rows (not written by hand), and the goals."""
    by_key = {r.row.key: r for r in results if r.row.key}
    lines = [
        "| Comparison | rows | Dice | Image AUROC | Verdict |",
        "|---|---|---|---|---|",
    ]
    number = {r.row.key: i + 1 for i, r in enumerate(results)}
    for with_key, without_key, question in COMPARISONS:
        if with_key not in by_key or without_key not in by_key:
            continue
        w, wo = by_key[with_key], by_key[without_key]
        d0, d1 = w.summary("dice")[0], wo.summary("dice")[0]
        a0, a1 = w.image["auroc"], wo.image["auroc"]
        lines.append(
            f"| {question} | {number[with_key]} vs {number[without_key]} | {d1:.3f} -> {d0:.3f} "
            f"| {a1:.3f} -> {a0:.3f} | {verdict(d0 - d1, a0 - a1)} |"
        )
    text = "\n".join(lines) + "\n"
    full = by_key.get("full")
    if full is not None:
        dice_m, auroc_m = full.summary("dice")[0], full.image["auroc"]
        met = [
            f"{name} {value:.3f} (goal >= {GOALS[key]}: {'met' if value >= GOALS[key] else 'not met'})"
            for name, key, value in (("Dice", "dice", dice_m), ("image AUROC", "auroc", auroc_m))
        ]
        text += f"\nGoals for the full method (row {number['full']}): " + "; ".join(met) + ".\n"
    text += (
        f"\nA metric counts as changed when it moves by {NO_CHANGE} or more. The Dice means are over a few cases with"
        " large case-to-case spread (the std in the table), so small differences are not significant.\n"
    )
    return text


def figure(results: Sequence[RowResult], cases: Sequence[Case], path: Path, denoiser: ModelDenoiser, seed: int) -> None:
    """Bar chart of Dice and image AUROC per row, and one example case: input, reconstruction, error, truth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from inference.pipeline import PipelineSettings, detect

    fig = plt.figure(figsize=(14, 8))
    ax = fig.add_subplot(2, 1, 1)
    xs = np.arange(len(results))
    dice_m = [r.summary("dice")[0] for r in results]
    dice_s = [r.summary("dice")[1] for r in results]
    img = [r.image["auroc"] for r in results]
    ax.bar(xs - 0.2, dice_m, 0.4, yerr=dice_s, label="Dice (lesion cases, mean ± std)")
    ax.bar(xs + 0.2, img, 0.4, label="Image-level AUROC")
    ax.set_xticks(xs, [f"{i + 1}" for i in xs])
    ax.set_xlabel("row of the table")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="upper left")
    case = next((c for c in cases if c.kind != "none" and c.lesion.any()), cases[0])
    k = int(np.argmax(case.lesion.sum(axis=(1, 2))))
    det = detect(
        case.image[k : k + 1], case.anatomy[k : k + 1], denoiser, PipelineSettings(ensemble=3, seed=seed), "CT"
    )
    panels = [
        ("input", case.image[k], "gray"),
        ("reconstruction (mean)", det.reconstruction[0], "gray"),
        ("anomaly map", det.anomaly_map[0], "magma"),
        ("segmentation", det.segmentation[0].astype(float), "gray"),
        ("ground truth", case.lesion[k].astype(float), "gray"),
    ]
    for i, (title, arr, cmap) in enumerate(panels):
        a = fig.add_subplot(2, 5, 6 + i)
        a.imshow(arr, cmap=cmap)
        a.set_title(f"{title}" if i else f"{title} ({case.kind})")
        a.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(
    model_path: Path,
    out: Path,
    figure_path: Path,
    *,
    lesion_cases: int = 4,
    healthy_cases: int = 2,
    ensemble: int = 3,
    subset_cases: int = 2,
    subset_slices: int = 4,
    every_step_cases: int = 1,
    every_step_slices: int = 1,
    lam: float = 6.0,
    seed: int = 0,
    only_rows: Sequence[int] | None = None,
    ablations: Path | None = None,
    grid_source_size: int = 192,
    slices: int = 12,
) -> list[RowResult]:
    """Run the rows on a fixed-seed held-out set and write the Markdown table and the figure."""
    import platform

    from tqdm import tqdm

    from inference.unet import load_model

    torch.manual_seed(seed)
    model, info = load_model(model_path)
    denoiser = ModelDenoiser(model, info)
    grid = info.config.image_size
    cases = make_cases(seed, lesion_cases, healthy_cases, grid, grid_source_size, slices)
    rows = default_rows(ensemble, subset_cases, subset_slices, every_step_cases, every_step_slices)
    numbered = [(i + 1, r) for i, r in enumerate(rows) if only_rows is None or (i + 1) in only_rows]
    denoisers: dict[str, ModelDenoiser] = {"shipped": denoiser}
    used: dict[str, str] = {"shipped": f"`{info.model_id}` (shipped)"}
    for key, filename in ABLATION_MODELS.items():
        path = ablations / filename if ablations else None
        if path is not None and path.exists():
            abl_model, abl_info = load_model(path)
            if abl_info.config.image_size != grid:
                raise ValueError(f"{path}: model grid {abl_info.config.image_size} differs from the shipped {grid}")
            denoisers[key] = ModelDenoiser(abl_model, abl_info)
            t = abl_info.training
            used[key] = f"`{abl_info.model_id}` ({t.get('steps')} steps, {t.get('noise')}, cond {t.get('conditioned')})"
        else:
            denoisers[key] = denoiser
            used[key] = f"`{info.model_id}` (shipped weights, component switched off at inference only)"
    results = []
    for _, row in tqdm(numbered, desc="rows", unit="row"):
        results.append(evaluate_row(row, cases, denoisers[row.model], seed, lam))
    rows_models = "\n".join(
        f"  - row {n} ({row.label}): {used[row.model]}" for n, row in numbered if row.method != "intensity"
    )
    figure(results, cases, figure_path, denoiser, seed)
    full = next((r for r in results if r.row.max_slices is None and r.row.ensemble > 1 and r.row.median), None)
    by_kind = f'By lesion kind, row "{full.row.label}":\n\n{kind_table(full)}' if full else ""
    training = info.training
    model_arg = f" --model {_rel(model_path)}"
    ablation_arg = f" --ablations {_rel(ablations)}" if ablations else ""
    text = f"""# Evaluation on held-out phantoms

Produced by one command (fixed seed {seed}):

    edgenode evaluate{model_arg}{ablation_arg} \\
        --lesion-cases {lesion_cases} --healthy-cases {healthy_cases} --ensemble {ensemble} \\
        --subset-cases {subset_cases} --subset-slices {subset_slices} \\
        --every-step-cases {every_step_cases} --every-step-slices {every_step_slices} \\
        --source-size {grid_source_size} --slices {slices} --seed {seed}

- Model: `{info.model_id}` (grid {grid}x{grid}, trained {training.get("steps")} steps on healthy phantoms,
  {training.get("noise")} noise, mask-conditioned: {training.get("conditioned")}).
- Held-out set: {lesion_cases} lesion cases (nodule, GGO, consolidation, reticular, mixed in rotation) and
  {healthy_cases} healthy controls, phantom CT {grid_source_size}x{grid_source_size}x{slices} from seeds disjoint
  from training, resampled to the model grid; the anatomy mask is the node's own (`inference.lungmask`).
- Ground truth on the model grid: a pixel is a lesion pixel when >= {GT_FRACTION:.0%} of its area is lesion.
- t_start 250 (of T = 1000), DDIM sampler, lambda = {lam}; the 3x3 median filter of the error map (all rows but the
  last, which shows what it adds), morphology and minimum component size as the pipeline's defaults.
  Pixel metrics: mean (std) over the lesion cases, over the exact lungs together with the node's
  anatomy mask (lesions the node's mask leaves out count as misses); FPR over all cases.
  Image level: every slice of every case is an image (positive: holds lesion pixels); score = the pipeline's slice
  score; F1 of "slice has a segmented pixel".
- Fixed-threshold rows (no adaptive threshold) use the pipeline's `fixed_threshold` (0.05 on the squared error).
- Weights per row (rows 2-6 compare models trained with the same data, steps and seed that differ in one
  component, when those ablation models are given with `--ablations`):
{rows_models}
- Seconds per slice: wall time of the row divided by its slices, on {platform.processor() or platform.machine()}
  with torch {torch.__version__} (CPU threads: {torch.get_num_threads()}, `--threads`); the machine was shared
  with other work, so timings are indicative only.

{markdown_table(results)}
What the rows say (computed from the table):

{findings(results)}
{by_kind}
![Evaluation figure]({figure_path.name})

Rows are numbered from 1 in the figure, in table order.
"""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return results


def _rel(path: Path) -> str:
    """A path relative to the working directory when it is inside it (for the reproducible command line)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
