"""`edgenode evaluate`: docs/EVALUATION.md on held-out phantoms: CT and radiograph sections, both held-out sets,
the triage (study-level) metrics and the ablation table, with one progress line per row on stderr."""

from __future__ import annotations

import argparse
from pathlib import Path

from node.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="CT weights (default: the shipped model)")
    parser.add_argument(
        "--model-cr",
        type=Path,
        default=None,
        help="radiograph (CR/DX) weights; without them the radiograph sections show the threshold baseline only",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/EVALUATION.md"), help="Markdown report")
    parser.add_argument("--figure", type=Path, default=None, help="figure PNG (default: beside the report)")
    parser.add_argument(
        "--ablations", type=Path, default=None, help="folder with ablation-{gaussian,uncond,simplex}.safetensors"
    )
    parser.add_argument("--lesion-cases", type=int, default=30, help="lesion studies per modality and held-out set")
    parser.add_argument("--healthy-cases", type=int, default=15, help="healthy studies per modality and set")
    parser.add_argument("--source-size", type=int, default=192, help="CT phantom rows/cols before the model grid")
    parser.add_argument("--slices", type=int, default=16, help="CT phantom slices per study")
    parser.add_argument("--radiograph-size", type=int, default=256, help="radiograph phantom rows/cols")
    parser.add_argument("--ensemble", type=int, default=3, help="K for the ensemble rows")
    parser.add_argument("--subset-cases", type=int, default=3, help="cases of each kind for the 25/50-step rows")
    parser.add_argument("--subset-slices", type=int, default=6, help="central lung slices per case there")
    parser.add_argument("--every-step-cases", type=int, default=2)
    parser.add_argument("--every-step-slices", type=int, default=2)
    parser.add_argument("--lambda", dest="lam", type=float, default=8.0, help="adaptive threshold lambda (CT default)")
    parser.add_argument(
        "--lambda-cr", dest="lam_cr", type=float, default=3.0, help="adaptive threshold lambda (CR/DX default)"
    )
    parser.add_argument(
        "--lung-refiner",
        default="bundled",
        help='CT lung refiner: "bundled" (the node\'s default), a path, or "off" (the threshold mask alone)',
    )
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the study intervals")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is fastest on a busy CPU)"
    )
    parser.add_argument("--rows", default="", help="comma-separated CT row numbers to run (default: all)")
    parser.add_argument(
        "--sets", default="training,shifted", help="held-out sets: training (A) and/or shifted (B, out of distribution)"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    import torch

    from inference.evaluation_report import write_report
    from inference.lung_refiner import refiner_file
    from inference.weights import bundled_model_path

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    try:
        model = args.model or bundled_model_path()
    except FileNotFoundError as exc:
        print(f"edgenode evaluate: {exc}")
        return 2
    for path in (model, args.model_cr):
        if path is not None and not path.exists():
            print(f"edgenode evaluate: model {path} not found")
            return 2
    try:
        rows = [int(r) for r in args.rows.split(",") if r.strip()] if args.rows else None
    except ValueError:
        print(f"edgenode evaluate: --rows {args.rows!r}: comma-separated row numbers expected")
        return 2
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not sets or not set(sets) <= {"training", "shifted"}:
        print(f"edgenode evaluate: --sets {args.sets!r}: choose training and/or shifted")
        return 2
    refiner = refiner_file(args.lung_refiner)
    if refiner is not None and not refiner.is_file():
        print(f"edgenode evaluate: lung refiner {refiner} not found")
        return 2
    figure = args.figure or args.out.with_name("evaluation.png")
    try:
        write_report(
            model,
            args.out,
            figure,
            radiograph_model=args.model_cr,
            lesion_cases=args.lesion_cases,
            healthy_cases=args.healthy_cases,
            ensemble=args.ensemble,
            subset_cases=args.subset_cases,
            subset_slices=args.subset_slices,
            every_step_cases=args.every_step_cases,
            every_step_slices=args.every_step_slices,
            lam=args.lam,
            lam_radiograph=args.lam_cr,
            seed=args.seed,
            only_rows=rows,
            ablations=args.ablations,
            grid_source_size=args.source_size,
            slices=args.slices,
            radiograph_size=args.radiograph_size,
            sets=sets,
            resamples=args.bootstrap,
            lung_refiner=refiner,
        )
    except ValueError as exc:  # a model that is not for CR/DX, a set that is not held out
        print(f"edgenode evaluate: {exc}")
        return 2
    print(f"wrote {args.out} and {figure}")
    return 0
