"""`edgenode evaluate`: the ablation table and figure on held-out phantoms, written to docs/EVALUATION.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from node.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="weights (default: the shipped model)")
    parser.add_argument("--out", type=Path, default=Path("docs/EVALUATION.md"), help="Markdown report")
    parser.add_argument("--figure", type=Path, default=None, help="figure PNG (default: beside the report)")
    parser.add_argument(
        "--ablations", type=Path, default=None, help="folder with ablation-{gaussian,uncond,simplex}.safetensors"
    )
    parser.add_argument("--lesion-cases", type=int, default=4)
    parser.add_argument("--healthy-cases", type=int, default=2)
    parser.add_argument("--source-size", type=int, default=192, help="phantom rows/cols before the model grid")
    parser.add_argument("--slices", type=int, default=12, help="phantom CT slices per case")
    parser.add_argument("--ensemble", type=int, default=3, help="K for the ensemble rows")
    parser.add_argument("--subset-cases", type=int, default=2, help="cases of each kind for the 25/50-step rows")
    parser.add_argument("--subset-slices", type=int, default=4, help="central lung slices per case there")
    parser.add_argument("--every-step-cases", type=int, default=1)
    parser.add_argument("--every-step-slices", type=int, default=1)
    parser.add_argument("--lambda", dest="lam", type=float, default=6.0, help="adaptive threshold lambda (CT default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 is fastest on a busy CPU)"
    )
    parser.add_argument("--rows", default="", help="comma-separated row numbers to run (default: all)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    import torch

    from inference.evaluate import write_report
    from inference.weights import bundled_model_path

    if args.threads > 0:
        torch.set_num_threads(args.threads)

    try:
        model = args.model or bundled_model_path()
    except FileNotFoundError as exc:
        print(f"edgenode evaluate: {exc}")
        return 2
    if not model.exists():
        print(f"edgenode evaluate: model {model} not found")
        return 2
    rows = [int(r) for r in args.rows.split(",") if r.strip()] if args.rows else None
    figure = args.figure or args.out.with_name("evaluation.png")
    write_report(
        model,
        args.out,
        figure,
        lesion_cases=args.lesion_cases,
        healthy_cases=args.healthy_cases,
        ensemble=args.ensemble,
        subset_cases=args.subset_cases,
        subset_slices=args.subset_slices,
        every_step_cases=args.every_step_cases,
        every_step_slices=args.every_step_slices,
        lam=args.lam,
        seed=args.seed,
        only_rows=rows,
        ablations=args.ablations,
        grid_source_size=args.source_size,
        slices=args.slices,
    )
    print(f"wrote {args.out} and {figure}")
    return 0
