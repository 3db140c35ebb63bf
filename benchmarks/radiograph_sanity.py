"""Sanity check of a radiograph model: do phantom radiographs with lesions score higher than healthy ones?

Not the evaluation (docs/EVALUATION.md has that): a quick look, right after training, that the pipeline works
end to end on held-out phantoms. Held-out: case seeds come from `--seed` (default 7001), disjoint from training's
(`splitmix64(data_seed, i)` in inference/train.py, data seed 0), rendered with the typical acquisition variation
at `--size` pixels, as DX DICOM through the node's own loader (`run_pipeline`: lung fields, model grid, the
ensemble at the node's defaults K = 7, 5 steps, t_start 25, lambda 3). Per case: the study score and the
lesion Dice; the table gives each kind's mean score and Dice, the image AUROC (lesion vs healthy) of the model's
study score, and that of a brightness baseline inside the lung fields (the 99th percentile of the image there).

    PYTHONPATH=. python benchmarks/radiograph_sanity.py --model path/to/chest-rx-small.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.evaluate import ModelDenoiser, auroc, dice  # noqa: E402
from inference.phantoms import radiograph_dataset, synthetic_study  # noqa: E402
from inference.pipeline import PipelineSettings, run_pipeline  # noqa: E402
from inference.radiograph_phantoms import make_radiograph  # noqa: E402
from inference.simplex import splitmix64  # noqa: E402
from inference.unet import load_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=7001)
    parser.add_argument("--lesion-cases", type=int, default=12)
    parser.add_argument("--healthy-cases", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, info = load_model(args.model)
    denoiser = ModelDenoiser(model, info)
    settings = PipelineSettings()
    kinds = ["nodule", "consolidation", "ggo", "mixed"]
    cases = [("none", i) for i in range(args.healthy_cases)]
    cases += [(kinds[i % len(kinds)], args.healthy_cases + i) for i in range(args.lesion_cases)]
    grid = info.config.image_size
    print(f"load before: {os.getloadavg()}; model {info.model_id} ({grid} grid), {args.threads} threads")
    rows: list[tuple[str, float, float, float, float]] = []
    with tempfile.TemporaryDirectory(prefix="edgenode-rx-sanity-") as tmp:
        for kind, index in cases:
            seed = splitmix64(args.seed, index) % 2**31
            rx = make_radiograph(seed, args.size, args.size, kind)
            path = Path(tmp) / f"{index}.dcm"
            radiograph_dataset(rx, synthetic_study(args.seed, index), "DX").save_as(path, enforce_file_format=True)
            start = time.perf_counter()
            result = run_pipeline([path], denoiser, info, settings)
            seconds = time.perf_counter() - start
            lungs = result.anatomy_mask[0]
            bright = float(np.percentile(rx.image[lungs], 99)) if lungs.any() else 0.0
            lesion_dice = dice(result.segmentation[0], rx.lesion_mask) if rx.lesion_mask.any() else float("nan")
            rows.append((kind, result.study_score, lesion_dice, bright, seconds))
            print(f"{kind:13s} case {index:2d}: score {result.study_score:.4f} dice {lesion_dice:.3f} {seconds:.1f} s")
    labels = np.array([kind != "none" for kind, *_ in rows])
    scores, baseline = np.array([r[1] for r in rows]), np.array([r[3] for r in rows])
    print("\n| cases | n | mean score | mean lesion Dice |")
    print("|---|---|---|---|")
    for kind in ["none", *kinds]:
        picked = [r for r in rows if r[0] == kind]
        if picked:
            dices = [r[2] for r in picked if not np.isnan(r[2])]
            mean_dice = f"{np.mean(dices):.3f}" if dices else "-"
            print(f"| {kind} | {len(picked)} | {np.mean([r[1] for r in picked]):.4f} | {mean_dice} |")
    print(
        f"\nimage AUROC, lesion vs healthy: model study score {auroc(scores, labels):.3f}, "
        f"brightness baseline (99th percentile in the lung fields) {auroc(baseline, labels):.3f}"
    )
    print(f"seconds per radiograph (torch fp32, this script): median {np.median([r[4] for r in rows]):.2f}")
    print(f"load after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
