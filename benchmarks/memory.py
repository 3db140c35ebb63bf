"""Peak memory of one series through the inference pipeline, by series length (worker sizing).

For each slice count a phantom chest CT (512x512 slices) is written to disk by one process; a fresh process
then loads the bundled model, builds the CPU backend and runs `inference.pipeline.run_pipeline` on it. The
table gives that process's peak resident memory before and after the pipeline: the difference is what a
series of that length adds to a worker. Ensemble and steps do not change it (the full-resolution arrays
dominate), so they are kept at 1 to make the run quick.
Run: PYTHONPATH=. python benchmarks/memory.py [--slices 80 240 480]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_series(folder: Path, slices: int) -> None:
    from inference.phantoms import ct_datasets, make_ct, synthetic_study

    folder.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(ct_datasets(make_ct(7, 512, 512, slices, "nodule"), synthetic_study(0, 7))):
        ds.save_as(folder / f"{i:04d}.dcm", enforce_file_format=True)


def measure(folder: Path) -> dict[str, float]:
    from engines.select import build_denoiser, load_source, plan_backend
    from inference.pipeline import PipelineSettings, run_pipeline

    model, info = load_source("bundled")
    with tempfile.TemporaryDirectory() as cache:
        denoiser = build_denoiser(plan_backend("cpu", "onnxruntime"), model, info, 28, Path(cache))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        run_pipeline(sorted(folder.glob("*.dcm")), denoiser, info, PipelineSettings(ensemble=1, steps=1))
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"before_mb": before, "after_mb": after}


def run_child(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, nargs="+", default=[80, 240, 480])
    parser.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, folder = args.child
        if mode == "write":
            write_series(Path(folder), args.count)
        else:
            print(json.dumps(measure(Path(folder))))
        return 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgenode-bench-memory-") as tmp:
        for slices in tqdm(args.slices, desc="series", unit="series", file=sys.stderr):
            folder = Path(tmp) / f"ct{slices}"
            run_child("--child", "write", str(folder), "--count", str(slices))
            rows.append((slices, json.loads(run_child("--child", "measure", str(folder)))))
    print("| slices (512x512) | peak RSS before, MB | peak RSS after, MB | added by the series, MB | per slice, MB |")
    print("|---:|---:|---:|---:|---:|")
    for slices, m in rows:
        added = m["after_mb"] - m["before_mb"]
        print(f"| {slices} | {m['before_mb']:.0f} | {m['after_mb']:.0f} | {added:.0f} | {added / slices:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
