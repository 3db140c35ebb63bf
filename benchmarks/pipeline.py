"""Per-study inference time at the node's default settings, for each U-Net backend this machine offers.

One phantom chest CT with nodules (80 x 512x512 by default) goes through `inference.pipeline.run_pipeline`
as a worker runs it: the bundled model, `[inference]` defaults (ensemble 7, 5 steps, lambda 8), batches of
`--max-batch` images per U-Net call. With `--modality dx`, one phantom PA chest radiograph (2048 x 2048 by
default, typical acquisition variation, nodules) instead, with a radiograph model: `--model`, or with
`--grids 64 96 128` untrained models of `--preset` on those grids, one table each (the time does not depend on
the weights), to choose the radiograph model's grid.

The table splits each study's seconds into the U-Net (reverse diffusion, noise, ensemble), the lung mask (with the
CT lung refiner, `--lung-refiner`, whose U-Net runs on the row's backend) and the rest (load, model grid,
threshold, map back), gives the U-Net images/s, and compares each backend's result with the first row's (the fp32
reference): the largest anomaly-map difference relative to that map's maximum, the Dice of the segmentations, and
the study score.

On a CPU it runs every candidate of `engines.select`'s probe this CPU can run (torch fp32 first, the reference,
then ONNX Runtime fp32, OpenVINO fp32, and torch/OpenVINO bf16 where the CPU has bf16 units), all in one run;
on a GPU torch fp32, bf16/fp16 with CUDA graphs (what `select` picks without TensorRT), ONNX Runtime's CUDA
provider and TensorRT when present. The CPU's model and flags are printed with the table.
Run: PYTHONPATH=. python benchmarks/pipeline.py [--repeats 2] [--max-batch 28 560] [--slices 80]
     PYTHONPATH=. python benchmarks/pipeline.py --modality dx --grids 64 96 128 [--size 2048]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engines.probe import cpu_candidates  # noqa: E402
from engines.select import (  # noqa: E402
    BackendUnavailable,
    Plan,
    backend_statuses,
    build_denoiser,
    load_source,
    plan_backend,
)
from inference.anomaly_result import AnomalyResult  # noqa: E402
from inference.hardware import cpu_info  # noqa: E402
from inference.lung_refiner import SLICES_PER_CALL, LungRefiner, chosen_refiner  # noqa: E402
from inference.phantoms import ct_datasets, make_ct, radiograph_dataset, synthetic_study  # noqa: E402
from inference.pipeline import PipelineSettings, run_pipeline  # noqa: E402
from inference.radiograph_phantoms import make_radiograph  # noqa: E402
from inference.unet import PRESETS, ModelInfo, UNet, save_model  # noqa: E402


@dataclass
class Row:
    name: str
    max_batch: int
    seconds: list[float]  # whole pipeline, per repeat
    unet: list[float]  # `reconstruct` stage, per repeat
    mask: list[float]  # `mask` stage (the lung mask, with the CT lung refiner when it runs), per repeat
    images: int  # U-Net image evaluations per study
    result: AnomalyResult

    def cells(self, reference: AnomalyResult) -> list[str]:
        total, unet, mask = (statistics.median(v) for v in (self.seconds, self.unet, self.mask))
        scale = float(reference.anomaly_map.max()) or 1.0
        diff = float(np.abs(self.result.anomaly_map - reference.anomaly_map).max()) / scale
        a, b = self.result.segmentation, reference.segmentation
        denominator = int(a.sum()) + int(b.sum())
        dice = 2 * int((a & b).sum()) / denominator if denominator else 1.0
        return [
            self.name,
            str(self.max_batch),
            f"{total:.2f}",
            f"{unet:.2f}",
            f"{mask:.2f}",
            f"{total - unet - mask:.2f}",
            f"{self.images / unet:.0f}",
            f"{diff:.1e}",
            f"{dice:.4f}",
            f"{self.result.study_score:.4f}",
        ]


DEFAULT_MAX_BATCH = 28  # [inference] max_batch default
HEADER = [
    "backend",
    "max batch",
    "study s",
    "U-Net s",
    "mask s",
    "rest s",
    "U-Net images/s",
    "map diff",
    "Dice",
    "score",
]


def plans(device: str) -> dict[str, Plan]:
    """The backends worth comparing on this device, fp32 reference first."""
    if device == "cpu":
        return {f"{c.backend}-cpu-{c.precision}": plan_backend("cpu", c.backend, c.precision) for c in cpu_candidates()}
    found = {"torch-cuda-fp32-graphs": plan_backend("cuda", "torch", "fp32")}
    low = ["bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp16"]
    for precision in low:
        found[f"torch-cuda-{precision}-graphs"] = plan_backend("cuda", "torch", precision)
    available = {s.name for s in backend_statuses() if s.available}
    if "onnxruntime-cuda" in available:
        found["onnxruntime-cuda"] = plan_backend("cuda", "onnxruntime", "fp32")
    if "tensorrt" in available:
        found["tensorrt-fp16"] = plan_backend("cuda", "tensorrt", "fp16")
    return found


def print_table(rows: list[Row]) -> None:
    cells = [row.cells(rows[0].result) for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(HEADER)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) + " |")


def phantom_files(folder: Path, modality: str, size: int, slices: int) -> list[Path]:
    """The timed study: a CT series with nodules, or one PA radiograph with nodules."""
    if modality == "ct":
        phantom = make_ct(7, size, size, slices, "nodule")
        datasets = ct_datasets(phantom, synthetic_study(0, 7))
        print(f"phantom CT: {slices} x {size}x{size}, {int(phantom.lesion_mask.sum())} lesion voxels")
    else:
        rx = make_radiograph(7, size, size, "nodule")
        datasets = [radiograph_dataset(rx, synthetic_study(0, 7), "DX")]
        assert rx.acquisition is not None
        print(f"phantom DX: {size}x{size} ({rx.acquisition.describe()}), {int(rx.lesion_mask.sum())} lesion pixels")
    files = []
    for i, ds in enumerate(datasets):
        files.append(folder / f"{i:04d}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    return files


def grid_models(folder: Path, preset: str, grids: list[int]) -> list[str]:
    """Untrained CR/DX models of `preset` on each grid, for timing only."""
    paths = []
    for grid in grids:
        torch.manual_seed(0)
        path = folder / f"untrained-{preset}-{grid}.safetensors"
        save_model(UNet(replace(PRESETS[preset], image_size=grid)), path, f"timing-{preset}-{grid}", {}, ("CR", "DX"))
        paths.append(str(path))
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modality", choices=["ct", "dx"], default="ct")
    parser.add_argument("--model", default="bundled", help="weights file ([inference] model; default: bundled)")
    parser.add_argument("--grids", type=int, nargs="*", default=None, help="untrained models on these grids instead")
    parser.add_argument("--preset", default="small", help="the untrained models' preset (with --grids)")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[DEFAULT_MAX_BATCH])
    parser.add_argument("--repeats", type=int, default=2, help="timed studies per backend, after one warm-up")
    parser.add_argument("--slices", type=int, default=80)
    parser.add_argument("--size", type=int, default=None, help="rows = columns (default: CT 512, DX 2048)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these backends (names in the table)")
    parser.add_argument(
        "--lung-refiner", default="bundled", help='CT lung refiner: "bundled" (the node\'s default), a path, or "off"'
    )
    args = parser.parse_args()

    defaults = PipelineSettings()  # = the node's [inference] defaults (tests/test_config.py)
    modality = "CT" if args.modality == "ct" else "DX"
    refiner = chosen_refiner(args.lung_refiner) if modality == "CT" else None  # a CT mask's, not a radiograph's
    size = args.size or (512 if args.modality == "ct" else 2048)
    chosen = plans(args.device)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only}
    print(f"load before: {os.getloadavg()}; {os.cpu_count()} CPUs, torch {torch.__version__}")
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    print(f"CPU: {cpu_info().describe()}")
    print(
        f"[inference] defaults: ensemble {defaults.ensemble}, steps {defaults.steps}, "
        f"t_start {defaults.t_start_for(modality)}, lambda {defaults.lambda_for(modality)}, "
        f"lung refiner {refiner.model_id if refiner is not None else 'off'}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="edgenode-bench-pipeline-") as tmp:
        folder = Path(tmp)
        files = phantom_files(folder, args.modality, size, args.slices)
        sources = grid_models(folder, args.preset, args.grids) if args.grids else [args.model]
        for source in sources:
            model, info = load_source(source)
            print(f"\nmodel {info.model_id}: {info.config.image_size}x{info.config.image_size} grid", flush=True)
            rows = time_backends(files, model, info, chosen, args.max_batch, args.repeats, defaults, folder, refiner)
            print()
            print_table(rows)
    print("\nmap diff: max |anomaly map - first row's| / max of the first row's; Dice and score against the first row")
    print(f"load after: {os.getloadavg()}")
    return 0


def time_backends(
    files: list[Path],
    model: torch.nn.Module,
    info: ModelInfo,
    chosen: dict[str, Plan],
    max_batches: list[int],
    repeats: int,
    defaults: PipelineSettings,
    folder: Path,
    refiner: LungRefiner | None = None,
) -> list[Row]:
    rows: list[Row] = []
    runs = [(name, plan, b) for b in max_batches for name, plan in chosen.items()]
    with tqdm(total=len(runs) * (repeats + 1), desc="studies", unit="study", file=sys.stderr) as bar:
        for name, plan, max_batch in runs:
            try:
                denoiser = build_denoiser(plan, model, info, max_batch, folder / "engines")
                # the refiner on the row's backend too (the node probes it on its own; benchmarks/RESULTS.md)
                row_refiner = None
                if refiner is not None:
                    refiner_net = build_denoiser(plan, refiner.model, refiner.info, SLICES_PER_CALL, folder / "engines")
                    row_refiner = refiner.with_engine(refiner_net)
            except BackendUnavailable as exc:
                print(f"{name}: skipped ({exc})", file=sys.stderr)
                bar.update(repeats + 1)
                continue
            settings = replace(defaults, max_batch=max_batch)
            # warm-up: export, graph capture, kernel choice
            run_pipeline(files, denoiser, info, settings, lung_refiner=row_refiner)
            bar.update()
            row = Row(name, max_batch, [], [], [], 0, None)  # type: ignore[arg-type]
            for _ in range(repeats):
                start = time.perf_counter()
                result = run_pipeline(files, denoiser, info, settings, lung_refiner=row_refiner)
                row.seconds.append(time.perf_counter() - start)
                row.unet.append(result.timings["reconstruct"])
                row.mask.append(result.timings["mask"])
                bar.update()
            row.result = result
            row.images = defaults.ensemble * defaults.steps * result.anatomy_mask.shape[0]  # every slice
            rows.append(row)
            del denoiser
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
