"""Time to encode the result set of one CT series: SEG, fractional SEGs, SC heatmaps, SR (build + Part 10 bytes).

    PYTHONPATH=. python benchmarks/results_encode.py [--slices 80] [--size 512] [--heatmaps 5] [--repeat 3]

The input is a synthetic chest CT (tests/dicomgen.py) with a spherical lesion and a smooth anomaly map around
it, i.e. what the writers get from the pipeline. Each object kind is timed separately (median of --repeat
runs); "build" is the highdicom/numpy/matplotlib work, "encode" is writing the Part 10 bytes that go to the
spool and the network.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.anomaly_result import AnomalyResult  # noqa: E402
from node.config import ResultsSettings  # noqa: E402
from node.results.common import ModelIdentity, SeriesResult  # noqa: E402
from node.results.sc import heatmap_images  # noqa: E402
from node.results.seg import binary_seg, fractional_segs  # noqa: E402
from node.results.sr import measurement_report  # noqa: E402
from tests.dicomgen import make_ct_series  # noqa: E402


def synthetic_result(sources: list, radius_mm: float = 15.0) -> AnomalyResult:
    n, rows, cols = len(sources), sources[0].Rows, sources[0].Columns
    spacing, thickness = float(sources[0].PixelSpacing[0]), float(sources[0].SliceThickness)
    z = (np.arange(n) - n / 2)[:, None, None] * thickness
    y = (np.arange(rows) - rows * 0.45)[None, :, None] * spacing
    x = (np.arange(cols) - cols * 0.3)[None, None, :] * spacing
    dist = np.sqrt(z**2 + y**2 + x**2)
    anomaly = np.exp(-((dist / radius_mm) ** 2)).astype(np.float32)
    seg = anomaly > 0.5
    scores = anomaly.reshape(n, -1).max(axis=1)
    return AnomalyResult(
        model_id="bench-000000000000",
        modality="CT",
        series_instance_uid=str(sources[0].SeriesInstanceUID),
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in sources],
        anatomy_mask=np.ones(seg.shape, bool),
        anomaly_map=anomaly,
        uncertainty_map=(0.1 * anomaly).astype(np.float32),
        segmentation=seg,
        threshold=0.25,
        slice_scores=scores.astype(np.float32),
        study_score=float(scores.max()),
        anomalous_volume_mm3=float(seg.sum() * spacing * spacing * thickness),
        mean_uncertainty=0.05,
        pixel_spacing_mm=(spacing, spacing),
        slice_thickness_mm=thickness,
    )


def part10(datasets: list) -> int:
    size = 0
    for ds in datasets:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        size += buffer.tell()
    return size


def timed(fn: Callable[[], list]) -> tuple[float, float, list]:
    start = time.perf_counter()
    out = fn()
    built = time.perf_counter()
    size = part10(out)
    return built - start, time.perf_counter() - built, [len(out), size]


def run_once(series: SeriesResult, heatmaps: int) -> dict[str, list[float]]:
    """Build and encode every object kind once, SEG first (the SR references it)."""
    out: dict[str, list[float]] = {}
    seg: list = []

    def binary() -> list:
        seg[:] = [binary_seg(series)]
        return list(seg)

    stages: list[tuple[str, Callable[[], list]]] = [
        ("seg (binary)", binary),
        ("seg (2 fractional)", lambda: [ds for _, ds in fractional_segs(series)]),
        (f"sc heatmaps (top {heatmaps})", lambda: heatmap_images(series)),
        ("sr (TID 1500)", lambda: [measurement_report(series, seg[0])]),
    ]
    for name, fn in stages:
        build, encode, (count, size) = timed(fn)
        out[name] = [build, encode, count, size]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=80)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--heatmaps", type=int, default=5, help="top-N SC heatmaps (0 = every slice)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    print(f"making a {args.slices}-slice {args.size}x{args.size} CT series ...", file=sys.stderr)
    sources = make_ct_series(args.slices, args.size, args.size, spacing=0.7, thickness=2.5)
    result = synthetic_result(sources)
    settings = ResultsSettings(
        heatmap_slices=args.heatmaps, fractional_anomaly_seg=True, fractional_uncertainty_seg=True
    )
    model = ModelIdentity(name="bench", version=result.model_id)
    frames_with_findings = int(result.segmentation.reshape(args.slices, -1).any(axis=1).sum())

    rows: dict[str, list[list[float]]] = {}
    for _ in tqdm(range(args.repeat), desc="runs", file=sys.stderr):
        series = SeriesResult.of(result, sources, "bench-job", settings, model)
        for name, row in run_once(series, args.heatmaps or args.slices).items():
            rows.setdefault(name, []).append(row)

    print(
        f"\nresult set of a {args.slices}-slice {args.size}x{args.size} CT "
        f"({frames_with_findings} slices with findings), median of {args.repeat} run(s)\n"
    )
    header = f"{'object kind':<26}{'objects':>8}{'build s':>10}{'encode s':>10}{'total s':>10}{'MB':>9}"
    print(header)
    print("-" * len(header))
    total_build = total_encode = 0.0
    for name, runs in rows.items():
        build = statistics.median(r[0] for r in runs)
        encode = statistics.median(r[1] for r in runs)
        total_build, total_encode = total_build + build, total_encode + encode
        count, size = runs[0][2], runs[0][3]
        print(f"{name:<26}{count:>8}{build:>10.3f}{encode:>10.3f}{build + encode:>10.3f}{size / 1e6:>9.2f}")
    print("-" * len(header))
    print(f"{'all':<26}{'':>8}{total_build:>10.3f}{total_encode:>10.3f}{total_build + total_encode:>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
