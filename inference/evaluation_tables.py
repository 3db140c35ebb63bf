"""The evaluation report's tables, worked out from the rows' results (never written by hand).

- `triage_table`: the worklist's decision per row (study AUROC, sensitivity at 90 % specificity, with 95 %
  bootstrap intervals), beside slice AUROC, Dice and pixel AUROC;
- `markdown_table`: every pixel and slice metric per row (the ablation table);
- `kind_table`: the same per lesion kind;
- `findings`: what each ablation comparison says, with the paired bootstrap interval of the study AUROC change;
- `goals`: the issue's goals for the full method, met or by how much not.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inference.evaluate import DEEP_T_START, NODE_T_START, RADIOGRAPH_EARLIER_T_START, RowResult
from inference.study_metrics import BOOTSTRAP_RESAMPLES, paired_difference, study_auroc, with_interval


def fmt(mean: float, std: float) -> str:
    return "n/a" if np.isnan(mean) else f"{mean:.3f} ({std:.3f})"


def _num(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.3f}"


def _label(r: RowResult) -> str:
    return r.row.label + (f" [{r.row.note}]" if r.row.note else "")


def markdown_table(results: Sequence[RowResult], unit: str = "Slice") -> str:
    """Pixel metrics (mean (std) over lesion cases) and `unit`-level metrics per row."""
    head = (
        "| # | Row | Dice | IoU | Precision | Recall | FPR (all cases) | Pixel AUROC | Pixel AUPRC "
        f"| {unit} AUROC | {unit} AUPRC | {unit} F1 | s/slice | cases / slices |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for n, r in enumerate(results, 1):
        cells = [fmt(*r.summary(k)) for k in ("dice", "iou", "precision", "recall")]
        cells.append(fmt(*r.summary("fpr", lesion_only=False)))
        cells += [fmt(*r.summary(k)) for k in ("auroc", "auprc")]
        cells += [_num(r.image[k]) for k in ("auroc", "auprc", "f1")]
        lines.append(
            f"| {n} | {_label(r)} | "
            + " | ".join(cells)
            + f" | {r.seconds_per_slice:.3f} | {r.n_cases} / {r.n_slices} |"
        )
    return head + "\n".join(lines) + "\n"


def triage_table(results: Sequence[RowResult], slices: bool = True) -> str:
    """The triage decision per row; rows run on slice subsets have no study score ('n/a')."""
    slice_head = "Slice AUROC | " if slices else ""
    head = (
        f"| # | Row | Study AUROC [95% CI] | Sensitivity at 90% specificity [95% CI] | score threshold | {slice_head}"
        "Dice | Pixel AUROC | lesion / healthy studies | s/study |\n"
        f"|---|---|---|---|---|{'---|' if slices else ''}---|---|---|---|\n"
    )
    lines = []
    for n, r in enumerate(results, 1):
        s = r.study
        if s is None:
            why = "n/a (slice subset)" if not r.row.whole_studies else "n/a (one class only)"
            study_cells = [why, why, "n/a"]
            counts = f"{r.n_cases} cases (subset)"
        else:
            study_cells = [
                with_interval(s.auroc, s.auroc_ci),
                with_interval(s.sensitivity, s.sensitivity_ci),
                _num(s.threshold),
            ]
            counts = f"{s.n_lesion} / {s.n_healthy}"
        cells = [*study_cells]
        if slices:
            cells.append(_num(r.image["auroc"]))
        cells += [_num(r.summary("dice")[0]), _num(r.summary("auroc")[0])]
        lines.append(f"| {n} | {_label(r)} | " + " | ".join(cells) + f" | {counts} | {r.seconds_per_study:.2f} |")
    return head + "\n".join(lines) + "\n"


def kind_dice(result: RowResult) -> dict[str, float]:
    """Mean Dice per lesion kind (lesion cases with ground truth on the model grid)."""
    out = {}
    for kind in dict.fromkeys(str(c["kind"]) for c in result.per_case if c["lesion"]):
        vals = [float(c["dice"]) for c in result.per_case if c["kind"] == kind and not np.isnan(c["dice"])]
        out[kind] = float(np.mean(vals)) if vals else float("nan")
    return out


def kind_table(results: Sequence[RowResult]) -> str:
    """Per lesion kind and row: triage (that kind's lesion studies vs every healthy study) and pixel metrics."""
    head = (
        "| Lesion kind | Row | lesion / healthy studies | Study AUROC [95% CI] | Sensitivity at 90% spec. [95% CI] "
        "| Dice | Recall | Pixel AUROC |\n|---|---|---|---|---|---|---|---|\n"
    )
    kinds = list(dict.fromkeys(str(c["kind"]) for r in results for c in r.per_case if c["lesion_study"]))
    lines = []
    for kind in kinds:
        for r in results:
            chosen = [c for c in r.per_case if c["kind"] == kind]
            if not chosen:
                continue
            cells = []
            for key in ("dice", "recall", "auroc"):
                vals = [float(c[key]) for c in chosen if not np.isnan(c[key])]
                cells.append(fmt(float(np.mean(vals)), float(np.std(vals))) if vals else "n/a")
            s = r.study_by_kind.get(kind)
            if s is None:
                study = ["n/a", "n/a", "n/a"]
            else:
                study = [
                    f"{s.n_lesion} / {s.n_healthy}",
                    with_interval(s.auroc, s.auroc_ci),
                    with_interval(s.sensitivity, s.sensitivity_ci),
                ]
            lines.append(f"| {kind} | {r.row.label} | " + " | ".join(study + cells) + " |")
    return head + "\n".join(lines) + "\n"


_T_CT, _T_RADIOGRAPH = NODE_T_START["CT"], NODE_T_START["DX"]
# What each comparison asks: (with, without, question). Rows missing from a run (--rows) are skipped.
COMPARISONS = (
    ("simplex", "ddpm", "Simplex instead of Gaussian noise"),
    ("mask", "simplex", "Mask conditioning"),
    ("adaptive", "simplex", "Adaptive threshold (unconditioned)"),
    ("mask+adaptive", "mask", "Adaptive threshold (conditioned)"),
    ("full", "mask+adaptive", "K-ensemble (and the shipped weights, when rows 2-6 use ablation models)"),
    ("full", "no-median", "Median filter of the error map"),
    ("full", "steps-other", "The node's count of reverse steps instead of the other (the rows' labels)"),
    ("subset-25", "subset-10", "25 instead of 10 reverse steps (subset)"),
    ("subset-50", "subset-10", "50 instead of 10 reverse steps (subset)"),
    ("deep", "full", f"All members from t_start {DEEP_T_START} instead of {_T_CT}"),
    ("mixed", "full", f"Mixed depth (members alternate {_T_CT} / {DEEP_T_START}) instead of all from {_T_CT}"),
    (
        "full",
        "radiograph-earlier-depth",
        f"Radiographs from t_start {_T_RADIOGRAPH} instead of {RADIOGRAPH_EARLIER_T_START}",
    ),
    ("full", "baseline", "The full method instead of the threshold baseline"),
)
NO_CHANGE = 0.01  # a metric moving by less than this counts as unchanged


def _direction(delta: float) -> int:
    return 0 if np.isnan(delta) or abs(delta) < NO_CHANGE else (1 if delta > 0 else -1)


def verdict(d_dice: float, d_auroc: float, d_study: float = float("nan")) -> str:
    """Earns its place when Dice, slice AUROC or study AUROC rises and none falls (by more than NO_CHANGE);
    a NaN change (metric not measured, e.g. study AUROC on a slice subset) counts as unchanged."""
    dirs = [_direction(d) for d in (d_dice, d_auroc, d_study)]
    if all(d == 0 for d in dirs):
        return "no measurable difference"
    if all(d >= 0 for d in dirs):
        return "earns its place"
    if all(d <= 0 for d in dirs):
        return "does not earn its place here"
    return "mixed (one metric up, another down)"


def _paired(w: RowResult, wo: RowResult, resamples: int, seed: int) -> tuple[float, float, float]:
    """Study AUROC of w minus wo on the same studies, with its paired bootstrap interval; NaNs when not paired."""
    nan = (float("nan"),) * 3
    if w.study is None or wo.study is None:
        return nan
    a, labels = w.study_scores()
    b, labels_b = wo.study_scores()
    if a.shape != b.shape or not np.array_equal(labels, labels_b):
        return nan
    return paired_difference(study_auroc, a, b, labels, resamples, seed)


def findings(
    results: Sequence[RowResult], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0, unit: str = "Slice"
) -> str:
    """The comparisons the table answers, worked out from the rows (not written by hand)."""
    by_key = {r.row.key: r for r in results if r.row.key}
    lines = [
        f"| Comparison | rows | Dice | {unit} AUROC | Study AUROC | change in study AUROC [95% CI, paired] | Verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    number = {r.row.key: i + 1 for i, r in enumerate(results)}
    for with_key, without_key, question in COMPARISONS:
        if with_key not in by_key or without_key not in by_key:
            continue
        w, wo = by_key[with_key], by_key[without_key]
        d0, d1 = w.summary("dice")[0], wo.summary("dice")[0]
        a0, a1 = w.image["auroc"], wo.image["auroc"]
        s0 = w.study.auroc if w.study else float("nan")
        s1 = wo.study.auroc if wo.study else float("nan")
        diff, lo, hi = _paired(w, wo, resamples, seed)
        change = "n/a" if np.isnan(diff) else f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        lines.append(
            f"| {question} | {number[with_key]} vs {number[without_key]} | {_num(d1)} -> {_num(d0)} "
            f"| {_num(a1)} -> {_num(a0)} | {_num(s1)} -> {_num(s0)} | {change} "
            f"| {verdict(d0 - d1, a0 - a1, s0 - s1)} |"
        )
    return (
        "\n".join(lines)
        + f"\n\nA metric counts as changed when it moves by {NO_CHANGE} or more. The Dice means are over a few dozen"
        " cases with large case-to-case spread (the std in the tables), and a study AUROC change whose paired"
        " interval includes 0 is within resampling noise.\n"
    )


# The goals for the full method, per modality: (name, metric, goal).
GOALS = {
    "CT": (
        ("study AUROC", "study_auroc", 0.95),
        ("slice AUROC", "slice_auroc", 0.90),
        ("Dice", "dice", 0.5),
        ("lowest lesion-kind Dice", "min_kind_dice", 0.3),
    ),
    "DX": (
        ("study AUROC", "study_auroc", 0.90),
        ("Dice", "dice", 0.4),
    ),
}
# "Better than the threshold on every metric": these, full method against the baseline row.
VERSUS_BASELINE = {
    "CT": ("study_auroc", "sensitivity", "slice_auroc", "dice", "pixel_auroc"),
    "DX": ("study_auroc", "sensitivity", "dice", "pixel_auroc"),
}
METRIC_NAMES = {
    "study_auroc": "study AUROC",
    "sensitivity": "sensitivity at 90% specificity",
    "slice_auroc": "slice AUROC",
    "dice": "Dice",
    "pixel_auroc": "pixel AUROC",
    "min_kind_dice": "lowest lesion-kind Dice",
}


def metric(result: RowResult, name: str) -> float:
    """One headline number of a row by name (NaN when the row does not measure it)."""
    if name == "study_auroc":
        return result.study.auroc if result.study else float("nan")
    if name == "sensitivity":
        return result.study.sensitivity if result.study else float("nan")
    if name == "slice_auroc":
        return float(result.image["auroc"])
    if name == "dice":
        return result.summary("dice")[0]
    if name == "pixel_auroc":
        return result.summary("auroc")[0]
    if name == "min_kind_dice":
        values = [v for v in kind_dice(result).values() if not np.isnan(v)]
        return min(values) if values else float("nan")
    raise ValueError(f"unknown metric {name!r}")


def goals(results: Sequence[RowResult], modality: str) -> str:
    """The issue's goals for the full method row on this set, met or missed by how much, and the baseline check."""
    by_key = {r.row.key: r for r in results if r.row.key}
    number = {r.row.key: i + 1 for i, r in enumerate(results)}
    full = by_key.get("full")
    if full is None:
        return "No full-method row in this run: the goals are not checked.\n"
    parts = []
    for name, key, goal in GOALS[modality]:
        value = metric(full, key)
        if np.isnan(value):
            parts.append(f"{name} n/a (goal >= {goal})")
        elif value >= goal:
            parts.append(f"{name} {value:.3f} (goal >= {goal}: met)")
        else:
            parts.append(f"{name} {value:.3f} (goal >= {goal}: not met, short by {goal - value:.3f})")
    if modality == "CT":
        worst = {k: v for k, v in kind_dice(full).items() if not np.isnan(v)}
        if worst:
            kind = min(worst, key=lambda k: worst[k])
            parts[-1] += f", {kind}"
    text = f"Goals for the full method (row {number['full']}): " + "; ".join(parts) + "."
    baseline = by_key.get("baseline")
    if baseline is not None:
        worse = [
            f"{METRIC_NAMES[m]} {metric(full, m):.3f} vs {metric(baseline, m):.3f}"
            for m in VERSUS_BASELINE[modality]
            if not metric(full, m) > metric(baseline, m)
        ]
        if worse:
            text += f" Better than the threshold (row {number['baseline']}) on every metric: no; not better on " + (
                "; ".join(worse) + "."
            )
        else:
            text += f" Better than the threshold (row {number['baseline']}) on every metric: yes."
    return text + "\n"
