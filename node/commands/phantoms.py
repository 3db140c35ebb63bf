"""`edgenode phantoms OUT`: write synthetic chest studies (DICOM + ground truth) to drive the node with."""

from __future__ import annotations

import argparse
from pathlib import Path

from node.config import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="output folder; one sub-folder per study")
    parser.add_argument("--modality", choices=["ct", "dx", "cr"], default="ct")
    parser.add_argument("--count", type=int, default=1, help="number of studies (default 1)")
    parser.add_argument(
        "--lesions",
        choices=["none", "nodule", "ggo", "consolidation", "reticular", "mixed"],
        default="mixed",
        help="lesion type painted into the lungs (none: healthy controls)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same subjects")
    parser.add_argument("--size", type=int, default=512, help="rows and columns (default 512)")
    parser.add_argument("--slices", type=int, default=80, help="CT slices per series (default 80)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from inference.phantoms import write_study

    if args.count < 1 or args.size < 32 or args.slices < 1:
        print("edgenode phantoms: --count >= 1, --size >= 32 and --slices >= 1 are required")
        return 2
    for index in range(args.count):
        folder = write_study(args.out, args.modality, args.seed, index, args.lesions, args.size, args.slices)
        print(folder)
    return 0
