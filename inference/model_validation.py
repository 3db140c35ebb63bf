"""How a shipped model (and its lambda) was chosen: models side by side on validation phantoms, not held-out sets.

    python -m inference.model_validation --seed 888 --lesion-cases 40 --healthy-cases 50 \
        --model old.safetensors --model inference/weights/chest-ct-small.safetensors --lambdas 6,8,10

Renders studies of the models' modality (CT studies from `make_ct_cases`' stream; radiographs from
`make_radiograph_cases`' for CR/DX models) with a seed the evaluation does not use (checked against both held-out
sets of that modality and every model's training phantoms, as `score_validation` does), runs each model through
the node's `detect` with its own noise spectrum (or --persistence in its place, to try a spectrum without
retraining) on its own grid (each --ensemble K with each --steps count and each --t-start, the node's study
score), and prints per run: study AUROC, sensitivity at 90 % specificity, slice AUROC, the healthy studies'
in-mask RMS reconstruction error, study AUROC per lesion kind, mean lesion Dice at each lambda (the adaptive
threshold's, from the same reconstructions), mean Dice per lesion kind at the node's lambda (the goal has a floor
per kind) and the paired difference in study AUROC to the first run. docs/method.md records the figures that
chose the models.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from inference.heldout import KINDS, Case
from inference.pipeline import SEGMENTATION_SIZES, PipelineSettings, segmentation_sizes
from inference.score_validation import check_disjoint, int_list, parse_validation_args
from inference.study_metrics import paired_difference, sensitivity_at_specificity, study_auroc

if TYPE_CHECKING:
    from inference.unet import ModelInfo


DEFAULT_LAMBDAS = {"CT": "6,8,10", "DX": "2,3,4"}
SIZES_GRID = 64  # the model grid the pipeline's sizes in pixels (median filters, minimum component) were chosen on


def sizes_for_grid(settings: PipelineSettings, grid: int) -> PipelineSettings:
    """`settings` with its pixel sizes scaled from SIZES_GRID to `grid`, keeping their physical extent: median
    windows to the nearest odd width, the minimum component by area."""

    def odd(width: int) -> int:
        return max(1, 2 * round((width * grid / SIZES_GRID - 1) / 2) + 1)

    return replace(
        settings,
        median_size=odd(settings.median_size),
        score_median_size=odd(settings.score_median_size),
        min_component_size=max(1, round(settings.min_component_size * (grid / SIZES_GRID) ** 2)),
    )


def segmentation_arg(text: str) -> dict[str, int]:
    """--segmentation's "key=value,..." as checked sizes."""
    try:
        pairs = dict(item.split("=", 1) for item in text.split(",") if item.strip())
        return segmentation_sizes({k.strip(): int(v) for k, v in pairs.items()})
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def model_modality(info: ModelInfo) -> str:
    """ "CT" or "DX" (a CR/DX model: radiograph phantoms serve both); a file without modality metadata is CT-only,
    as the node takes it."""
    if not info.modalities or "CT" in info.modalities:
        return "CT"
    if {"CR", "DX"} & set(info.modalities):
        return "DX"
    raise ValueError(f"a model for {info.describe_training()}: no validation phantoms of that modality")


@dataclass
class ModelRun:
    """One model's results over the validation studies, in case order."""

    name: str
    study_scores: list[float] = field(default_factory=list)
    slice_scores: list[np.ndarray] = field(default_factory=list)
    slice_truth: list[np.ndarray] = field(default_factory=list)  # on this run's grid: a small lesion may not survive
    healthy_rmse: list[float] = field(default_factory=list)
    dice: dict[float, list[float]] = field(default_factory=dict)  # lambda -> one Dice per lesion study


def segment_dice(
    error: np.ndarray, case: Case, lam: float, settings: PipelineSettings, keep: np.ndarray | None = None
) -> float:
    """The node's segmentation at this lambda (postprocess.detect_anomalies on the detection's error map with the
    settings' cleaning, `keep` as the node's segment polarity gives it), scored inside lungs, anatomy mask and
    lesion as the evaluation does."""
    from inference.evaluate import dice
    from inference.postprocess import detect_anomalies

    seg = detect_anomalies(
        error,
        case.anatomy,
        lam,
        opening=settings.opening,
        closing=settings.closing,
        min_component_size=settings.min_component_size,
        keep=keep,
    ).segmentation
    inside = case.anatomy | case.lung | case.lesion
    return dice(seg[inside], case.lesion[inside])


def mask_line(cases: Sequence[Case]) -> str:
    """What the anatomy mask holds, on the model grid: the lesion voxels inside it (all, and per kind) and the share
    of the healthy studies' masks that is not lung (where the model, told "lung", would draw lung)."""
    lesion = [c for c in cases if c.lesion_study]
    healthy = [c for c in cases if not c.lesion_study]

    def held(group: Sequence[Case]) -> str:
        total = sum(int(c.lesion.sum()) for c in group)
        return f"{sum(int((c.lesion & c.anatomy).sum()) for c in group) / total:.3f}" if total else "-"

    kinds = ", ".join(f"{k} {held([c for c in lesion if c.kind == k])}" for k in KINDS)
    masked = sum(int(c.anatomy.sum()) for c in healthy)
    outside = sum(int((c.anatomy & ~c.lung).sum()) for c in healthy)
    share = f"{outside / masked:.3f}" if masked else "-"
    return f"Mask: lesion voxels inside {held(lesion)} ({kinds}); healthy masks not lung {share}"


def table(
    runs: Sequence[ModelRun], cases: Sequence[Case], lambdas: Sequence[float], node_lambda: float, resamples: int
) -> str:
    from inference.evaluate import auroc

    labels = np.array([c.lesion_study for c in cases])
    kinds = np.array([c.kind for c in cases])
    lesion_kinds = kinds[labels]
    first = np.array(runs[0].study_scores)
    head = "| model | study AUROC | sens. at 90 % spec. | slice AUROC | healthy RMSE | "
    head += " | ".join(
        [f"{k} study AUROC" for k in KINDS]
        + [f"Dice lambda {lam:g}" for lam in lambdas]
        + [f"{k} Dice (lambda {node_lambda:g})" for k in KINDS]
    )
    head += " | study AUROC vs the first [95 % CI] |"
    lines = [head, "|---|" + "---:|" * (4 + 2 * len(KINDS) + len(lambdas) + 1)]
    for run in runs:
        s = np.array(run.study_scores)
        by_kind = []
        for k in KINDS:
            keep = (kinds == k) | ~labels
            by_kind.append(f"{study_auroc(s[keep], labels[keep]):.3f}" if (kinds == k).any() else "-")
        diff, lo, hi = paired_difference(study_auroc, s, first, labels, resamples, 0)
        dice_cells = [f"{np.mean(run.dice[lam]):.3f}" if run.dice[lam] else "-" for lam in lambdas]
        kind_dice = np.array(run.dice[node_lambda])
        for k in KINDS:
            dice_cells.append(f"{kind_dice[lesion_kinds == k].mean():.3f}" if (lesion_kinds == k).any() else "-")
        lines.append(
            f"| {run.name} | {study_auroc(s, labels):.3f} | {sensitivity_at_specificity(s, labels):.3f} | "
            f"{auroc(np.concatenate(run.slice_scores), np.concatenate(run.slice_truth)):.3f} | "
            f"{np.mean(run.healthy_rmse):.4f} | "
            + " | ".join(by_kind + dice_cells)
            + f" | {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    import torch

    from inference.evaluate import ModelDenoiser
    from inference.heldout import make_ct_cases, make_radiograph_cases
    from inference.lung_refiner import chosen_refiner, refiner_phantom_seeds
    from inference.pipeline import detect, model_fit_problems, segment_keep
    from inference.train import model_training_seeds
    from inference.unet import load_model

    parser = argparse.ArgumentParser(prog="python -m inference.model_validation", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, action="append", required=True, help="weights; repeat to compare")
    parser.add_argument("--lambdas", help="adaptive-threshold lambdas to score Dice at (default: CT 6,8,10; DX 2,3,4)")
    parser.add_argument(
        "--steps",
        type=int_list,
        help="reverse steps per member (default: the node's); a list runs each model with each",
    )
    parser.add_argument(
        "--t-start",
        type=int_list,
        help="diffuse each slice to this timestep (default: the node's for the modality); a list runs each with each",
    )
    parser.add_argument("--persistence", type=float, help="diffuse with this simplex persistence, not the model's")
    parser.add_argument(
        "--segment-polarity", choices=["both", "denser"], help="what the segmentation outlines (default: the node's)"
    )
    parser.add_argument(
        "--scale-sizes",
        action="store_true",
        help=f"scale the median filters and minimum component from the {SIZES_GRID} grid to each model's grid "
        "(models that carry no sizes of their own)",
    )
    parser.add_argument(
        "--segmentation",
        type=segmentation_arg,
        help="segmentation pixel sizes instead of each model's, e.g. median_size=1,opening=0,closing=0,"
        "min_component_size=9 (keys: " + ", ".join(SEGMENTATION_SIZES) + ")",
    )
    parser.add_argument("--radiograph-size", type=int, default=256, help="radiograph phantoms' native size")
    parser.add_argument(
        "--lung-refiner",
        default="bundled",
        help='CT lung refiner: "bundled" (the node\'s default), a path, or "off" (the threshold mask alone)',
    )
    args = parse_validation_args(parser, argv, lesion_cases=40, healthy_cases=50, several_ensembles=True)
    step_counts = args.steps or [PipelineSettings().steps]
    starts: list[int | None] = list(args.t_start) if args.t_start else [None]
    torch.set_num_threads(args.threads)
    loaded = [load_model(p) for p in args.model]
    modality = {model_modality(info) for _, info in loaded}
    if len(modality) != 1:
        parser.error("the models are for different modalities (CT and CR/DX): compare models of one")
    modality_name = modality.pop()
    lambdas = [float(v) for v in (args.lambdas or DEFAULT_LAMBDAS[modality_name]).split(",") if v.strip()]
    node_lambda = PipelineSettings().lambda_for(modality_name)

    def run_settings(info: ModelInfo, members: int, steps: int, t_start: int | None) -> PipelineSettings:
        """One run's settings: the node's for the model, with the command line's overrides."""
        settings = PipelineSettings(ensemble=members, steps=steps).for_model(info.training)
        if args.persistence is not None:
            settings = replace(settings, persistence=args.persistence)
        if t_start is not None:
            settings = replace(settings, t_start={**settings.t_start, modality_name: t_start})
        if args.segment_polarity is not None:
            settings = replace(settings, segment_polarity={modality_name: args.segment_polarity})
        if args.scale_sizes and "segmentation" not in info.training:  # a model's own sizes are for its grid
            settings = sizes_for_grid(settings, info.config.image_size)
        if args.segmentation:
            settings = settings.with_segmentation(args.segmentation)
        return settings

    plans = []  # every run, planned (and a start a model was not trained for refused) before any rendering
    for (model, info), members, steps, t_start in itertools.product(loaded, args.ensemble, step_counts, starts):
        settings = run_settings(info, members, steps, t_start)
        if t_start is not None and (problems := model_fit_problems(info.training, settings)):
            parser.error(f"--t-start {t_start} for {info.model_id}: " + "; ".join(problems))
        plans.append((model, info, members, steps, t_start, settings))
    refiner = chosen_refiner(args.lung_refiner) if modality_name == "CT" else None

    def render(grid: int) -> list[Case]:
        if modality_name == "CT":
            return make_ct_cases(
                args.seed, args.lesion_cases, args.healthy_cases, grid, args.source_size, args.slices, refiner=refiner
            )
        return make_radiograph_cases(args.seed, args.lesion_cases, args.healthy_cases, grid, args.radiograph_size)

    # The same phantoms on each model's own grid (a study's truth and scores do not depend on the grid, so the
    # paired study AUROC difference holds across grids; Dice is scored on each model's grid, as the evaluation does).
    cases_on = {grid: render(grid) for grid in sorted({info.config.image_size for _, info in loaded})}
    if len({tuple(c.seed for c in cases) for cases in cases_on.values()}) != 1:
        raise RuntimeError("the validation studies differ between grids")
    runs = []
    start = time.perf_counter()
    for model, info, members, steps, t_start, settings in plans:
        cases = cases_on[info.config.image_size]
        check_disjoint(cases, model_training_seeds(info.training))
        if refiner is not None:
            check_disjoint(cases, sorted(refiner_phantom_seeds(refiner.info)))
        grid = info.config.image_size
        variant = f"persistence {settings.persistence:g}, outlines {settings.polarity_for(modality_name)}"
        if t_start is not None:
            variant = f"t_start {t_start}, " + variant
        if args.scale_sizes or args.segmentation or "segmentation" in info.training:
            variant += f", medians {settings.median_size}/{settings.score_median_size}"
            variant += f", opening/closing {settings.opening}/{settings.closing}"
            variant += f", components >= {settings.min_component_size}"
        name = f"{info.model_id} ({grid}x{grid} grid, {variant}, K = {members}, {steps} steps)"
        run = ModelRun(name, dice={lam: [] for lam in {*lambdas, node_lambda}})
        denoiser = ModelDenoiser(model, info)
        for n, case in enumerate(cases, 1):
            det = detect(case.image, case.anatomy, denoiser, settings, modality_name)
            run.study_scores.append(det.study_score)
            run.slice_scores.append(det.slice_scores)
            run.slice_truth.append(np.asarray(case.lesion.any(axis=(1, 2))))
            if case.lesion_study:
                keep = segment_keep(settings, modality_name, case.image, det.reconstruction)
                for lam in run.dice:
                    run.dice[lam].append(segment_dice(det.anomaly_map, case, lam, settings, keep))
            else:
                inside = case.anatomy.astype(bool)
                run.healthy_rmse.append(float(np.sqrt(np.mean((case.image - det.reconstruction)[inside] ** 2))))
            if n % 10 == 0 or n == len(cases):
                out(f"{name}: {n}/{len(cases)} studies ({time.perf_counter() - start:.0f} s)")
        runs.append(run)
    labels = np.array([c.lesion_study for c in cases])
    studies = f"{labels.sum()} lesion / {(~labels).sum()} healthy studies"
    out(f"\nValidation seed {args.seed}: {studies}")
    how = "lung fields" if modality_name != "CT" else "threshold mask"
    out(mask_line(cases) + (f" (refined by {refiner.model_id})" if refiner is not None else f" ({how})"))
    out(table(runs, cases, lambdas, node_lambda, args.bootstrap))
    return 0


if __name__ == "__main__":
    sys.exit(main())
