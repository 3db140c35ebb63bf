"""How the study score was chosen: candidate scores side by side on validation phantoms, not the held-out sets.

    python -m inference.score_validation --seed 888 --lesion-cases 100 --healthy-cases 50

Renders CT studies from `make_ct_cases`' stream with a seed the evaluation does not use (checked: none of them is a
seed of either held-out set of the evaluation's seed 0, or a training seed of the model), reconstructs each study
once with the node's defaults (except the ensemble size), and scores the same reconstructions every candidate way:
the error map's median filter (3 x 3, 5 x 5) times the per-slice statistic (99th percentile over the adaptive
threshold alpha, as the node scored before; root of the mean of the 20 largest values, as it scores now). Prints
study AUROC, sensitivity at 90 % specificity and slice AUROC per candidate, and each one's paired difference in
study AUROC to the node's score. docs/method.md records the figures that chose the node's score.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inference.heldout import MAX_TRIES, Case, assert_held_out, heldout_seed
from inference.postprocess import median_filtered, slice_scores
from inference.study_metrics import paired_difference, sensitivity_at_specificity, study_auroc

EVALUATION_SEED = 0  # the held-out sets' seed (docs/EVALUATION.md): a validation seed must differ from it
CANDIDATE_MEDIANS = (3, 5)
EVALUATION_MAX_CASES = 60  # per kind of study and set: above what docs/EVALUATION.md's command draws (30 and 15)


def percentile_over_alpha(score_map: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    """The node's previous slice score: 99th percentile of the in-mask map over alpha (0 without mask voxels)."""
    return np.array([np.percentile(s[m], 99) / alpha if m.any() else 0.0 for s, m in zip(score_map, mask, strict=True)])


@dataclass
class Candidate:
    """A way to score: the map's median size and the per-slice statistic; slice scores collected per study."""

    median: int
    statistic: str  # "p99/alpha" or "top20"
    per_study: list[np.ndarray] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.median}x{self.median} median, {self.statistic}"

    def add(self, squared_error: np.ndarray, mask: np.ndarray, alpha: float) -> None:
        """One study's slice scores; `alpha` is the node's threshold for the study (its detection's)."""
        score_map = median_filtered(squared_error, self.median)
        if self.statistic == "top20":
            self.per_study.append(slice_scores(score_map, mask))
        else:
            self.per_study.append(percentile_over_alpha(score_map, mask, max(alpha, 1e-12)))

    def study_scores(self) -> np.ndarray:
        return np.array([s.max() if s.size else 0.0 for s in self.per_study])


def evaluation_seeds(lesion_cases: int, healthy_cases: int, modality: str = "CT") -> set[int]:
    """Every seed the evaluation's sets of this modality ("CT" or "DX") can draw (each planned study may try
    MAX_TRIES seeds)."""
    draws = (lesion_cases + healthy_cases) * MAX_TRIES
    return {heldout_seed(modality, r, EVALUATION_SEED, i) for r in ("training", "shifted") for i in range(draws)}


def check_disjoint(cases: Sequence[Case], training: Sequence[int]) -> None:
    seeds = [c.seed for c in cases]
    for modality in sorted({c.modality for c in cases}):
        assert_held_out(
            seeds,
            evaluation_seeds(EVALUATION_MAX_CASES, EVALUATION_MAX_CASES, modality),
            "validation set vs the evaluation's held-out sets",
        )
    assert_held_out(seeds, training, "validation set vs the model's training phantoms")


def int_list(text: str) -> list[int]:
    """A comma-separated list of positive integers ("3,7")."""
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def parse_validation_args(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    lesion_cases: int,
    healthy_cases: int,
    several_ensembles: bool = False,
) -> argparse.Namespace:
    """The options every validation tool shares (seed, studies, K, phantom size, threads, bootstrap), parsed;
    refuses the evaluation's seed. With `several_ensembles`, --ensemble takes a list (args.ensemble: list[int])."""
    parser.add_argument("--seed", type=int, required=True, help="validation seed (not the evaluation's 0)")
    parser.add_argument("--lesion-cases", type=int, default=lesion_cases)
    parser.add_argument("--healthy-cases", type=int, default=healthy_cases)
    if several_ensembles:
        parser.add_argument(
            "--ensemble", type=int_list, default=[3], help="members K (default 3); a list runs each model with each"
        )
    else:
        parser.add_argument("--ensemble", type=int, default=3, help="members K")
    parser.add_argument("--source-size", type=int, default=192)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.seed == EVALUATION_SEED:
        parser.error(f"seed {EVALUATION_SEED} draws the evaluation's held-out sets: choose another")
    return args


def table(candidates: Sequence[Candidate], labels: np.ndarray, slice_truth: np.ndarray, resamples: int) -> str:
    from inference.evaluate import auroc

    node = candidates[-1].study_scores()
    lines = [
        "| score | study AUROC | sensitivity at 90 % specificity | slice AUROC | study AUROC vs the node's [95 % CI] |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in candidates:
        s = c.study_scores()
        diff, lo, hi = paired_difference(study_auroc, s, node, labels, resamples, 0)
        slices = auroc(np.concatenate(c.per_study), slice_truth)
        lines.append(
            f"| {c.name} | {study_auroc(s, labels):.3f} | {sensitivity_at_specificity(s, labels):.3f} | "
            f"{slices:.3f} | {diff:+.3f} [{lo:+.3f}, {hi:+.3f}] |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    import torch

    from inference.evaluate import ModelDenoiser
    from inference.heldout import make_ct_cases
    from inference.pipeline import PipelineSettings, detect
    from inference.train import model_training_seeds
    from inference.unet import load_model

    parser = argparse.ArgumentParser(prog="python -m inference.score_validation", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("inference/weights/chest-ct-small.safetensors"))
    args = parse_validation_args(parser, argv, lesion_cases=100, healthy_cases=50)
    torch.set_num_threads(args.threads)
    model, info = load_model(args.model)
    denoiser = ModelDenoiser(model, info)
    cases = make_ct_cases(
        args.seed, args.lesion_cases, args.healthy_cases, info.config.image_size, args.source_size, args.slices
    )
    check_disjoint(cases, model_training_seeds(info.training))
    settings = PipelineSettings(ensemble=args.ensemble).for_model(info.training)
    # the node's own score last: every paired difference is taken against it
    candidates = [Candidate(m, "p99/alpha") for m in CANDIDATE_MEDIANS] + [Candidate(3, "top20")]
    candidates.append(Candidate(settings.score_median_size, "top20"))
    start = time.perf_counter()
    for n, case in enumerate(cases, 1):
        det = detect(case.image, case.anatomy, denoiser, settings, "CT")
        squared = ((case.image - det.reconstruction) ** 2).astype(np.float32)
        for c in candidates:
            c.add(squared, case.anatomy, det.threshold)
        if not np.allclose(candidates[-1].per_study[-1], det.slice_scores, rtol=1e-5, atol=1e-8):
            raise AssertionError("the last candidate must be the node's own slice scores")
        if n % 10 == 0 or n == len(cases):
            out(f"{n}/{len(cases)} studies reconstructed ({time.perf_counter() - start:.0f} s)")
    labels = np.array([c.lesion_study for c in cases])
    slice_truth = np.concatenate([c.lesion.any(axis=(1, 2)) for c in cases])
    out(
        f"\nValidation seed {args.seed}: {labels.sum()} lesion / {(~labels).sum()} healthy studies, K = {args.ensemble}"
    )
    out(table(candidates, labels, slice_truth, args.bootstrap))
    return 0


if __name__ == "__main__":
    sys.exit(main())
