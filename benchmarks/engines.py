"""U-Net backends on this machine: per-step latency, images/s, GFLOP/s and the fraction of peak.

One "step" is one U-Net call on a batch (one reverse-diffusion step for K members x slices). Peak is
measured here, in the same process and thread count: a large square matmul in the precision the row's
backend computes in (fp32, bf16 or fp16), timed right before each of its calls, so "of peak" is against
what this machine's units can do in that precision. The fp32, bf16 and int8 matmul peaks are printed
side by side first, with the CPU's model and flags. FLOPs are `inference.unet.count_flops` (2 x MACs of
convolutions, linears and attention; normalisations and activations are not counted, so the fraction
is a lower bound on how busy the cores are).

    PYTHONPATH=. python benchmarks/engines.py                      # small preset, batches 1 7 14 28
    PYTHONPATH=. python benchmarks/engines.py --batches 7 28 --rounds 7 --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engines.onnx_export import cached_onnx  # noqa: E402
from engines.openvino_backend import openvino_precisions, openvino_version  # noqa: E402
from engines.ort_backend import OrtDenoiser, ort_providers  # noqa: E402
from engines.select import build_denoiser, plan_backend  # noqa: E402
from engines.torch_backend import TorchDenoiser  # noqa: E402
from inference.denoiser import Denoiser  # noqa: E402
from inference.hardware import cpu_info  # noqa: E402
from inference.unet import PRESETS, ModelInfo, UNet, count_flops  # noqa: E402

DEFAULT_BATCH = 28  # [inference] max_batch default: what full pipeline calls use


PRECISION_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Row:
    backend: str
    precision: str  # what the backend computes in; its peak is a matmul in the same precision
    batch: int
    seconds: list[float]  # per call, one per round
    peaks: list[float]  # matmul GFLOP/s measured right before each of those calls
    flops_per_image: int

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        return (max(self.seconds) - min(self.seconds)) / self.median_s

    @property
    def images_per_s(self) -> float:
        return self.batch / self.median_s

    @property
    def gflops(self) -> float:
        return self.flops_per_image * self.batch / self.median_s / 1e9

    @property
    def peak(self) -> float:
        return statistics.median(self.peaks)

    @property
    def fraction(self) -> float:
        # Per round, achieved / peak measured in the same moment; the median is robust to load spikes.
        return statistics.median(
            self.flops_per_image * self.batch / s / 1e9 / p for s, p in zip(self.seconds, self.peaks, strict=True)
        )

    def cells(self) -> list[str]:
        return [
            self.backend,
            self.precision,
            str(self.batch),
            f"{self.median_s * 1e3:.1f}",
            f"{self.spread * 100:.0f}%",
            f"{self.images_per_s:.2f}",
            f"{self.gflops:.1f}",
            f"{self.peak:.1f}",
            f"{self.fraction * 100:.0f}%",
        ]


HEADER = ["backend", "precision", "batch", "ms/step", "spread", "images/s", "GFLOP/s", "peak GFLOP/s", "of peak"]


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 3) -> float:
    """Best GFLOP/s (GOP/s for int8) of a size x size matmul: the practical peak for this precision/threads.

    int8 is torch's int8 x int8 -> int32 matmul (`torch._int_mm`, oneDNN VNNI/AMX-INT8 on CPUs)."""
    if dtype == torch.int8:
        a = torch.randint(-64, 64, (size, size), device=device, dtype=torch.int8)
        b = torch.randint(-64, 64, (size, size), device=device, dtype=torch.int8)

        def mm() -> torch.Tensor:
            return torch._int_mm(a, b)
    else:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)

        def mm() -> torch.Tensor:
            return a @ b

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    with torch.inference_mode():
        mm()
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            mm()
            sync()
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def peaks_line(device: torch.device, size: int) -> str:
    """fp32, bf16 and int8 matmul peaks side by side (n/a where this build cannot run one)."""
    cells = []
    dtypes = [torch.float32, torch.bfloat16, torch.int8] + ([torch.float16] if device.type == "cuda" else [])
    for dtype in dtypes:
        name = PRECISION_NAMES.get(dtype, "int8")
        try:
            cells.append(f"{name} {matmul_peak(device, dtype, size):.1f}")
        except (RuntimeError, NotImplementedError) as exc:
            cells.append(f"{name} n/a ({str(exc).splitlines()[0][:60]})")
    return f"matmul peaks {size}^2, GFLOP/s (int8: GOP/s): " + ", ".join(cells)


class Inputs:
    """Random inputs per batch size, on the denoiser's device, made once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}

    def get(self, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        key = (batch, str(device))
        if key not in self._cache:
            gen = torch.Generator().manual_seed(batch)
            x = torch.randn(batch, 1, self.size, self.size, generator=gen)
            c = (torch.rand(batch, 1, self.size, self.size, generator=gen) > 0.5).float()
            t = torch.rand(batch, generator=gen) * 500
            self._cache[key] = (x.to(device), c.to(device), t.to(device))
        return self._cache[key]


def time_call(denoiser: Denoiser, inputs: tuple[torch.Tensor, ...]) -> float:
    sync = torch.cuda.synchronize if denoiser.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    denoiser(*inputs)
    sync()
    return time.perf_counter() - start


def cpu_variants(
    model: UNet, info: ModelInfo, cache: Path, threads: int, max_batch: int, micro: list[int]
) -> dict[str, Callable[[], Denoiser]]:
    variants: dict[str, Callable[[], Denoiser]] = {
        "torch-cpu-fp32": lambda: TorchDenoiser(model, info, max_batch=max_batch, threads=threads),
        "torch-cpu-fp32-cl": lambda: TorchDenoiser(
            model, info, max_batch=max_batch, threads=threads, channels_last=True
        ),
    }
    for m in micro:
        variants[f"torch-cpu-fp32 mb{m}"] = lambda m=m: TorchDenoiser(
            model, info, max_batch=max_batch, threads=threads, micro_batch=m
        )
    if cpu_info().bf16_units:  # emulated bf16 is slower than fp32: only where the CPU has bf16 units
        variants["torch-cpu-bf16-cl"] = lambda: TorchDenoiser(
            model, info, max_batch=max_batch, threads=threads, channels_last=True, precision="bf16"
        )
    for precision in openvino_precisions():
        # What engines.select builds: one stream (and async request) per thread.
        variants[f"openvino-cpu-{precision}"] = lambda p=precision: build_denoiser(
            plan_backend("cpu", "openvino", p), model, info, max_batch, cache, threads=threads
        )
    if "CPUExecutionProvider" in ort_providers():
        onnx_model = cached_onnx(model, info, cache)
        variants["onnxruntime-cpu"] = lambda: OrtDenoiser(onnx_model, max_batch=max_batch, threads=threads)
        for m in micro:
            variants[f"onnxruntime-cpu mb{m}"] = lambda m=m: OrtDenoiser(
                onnx_model, max_batch=max_batch, threads=threads, micro_batch=m
            )
            # What engines.select builds on a CPU: `threads` concurrent single-threaded runs.
            variants[f"onnxruntime-cpu mb{m} x{threads}"] = lambda m=m: build_denoiser(
                plan_backend("cpu", "onnxruntime"), model, info, max_batch, cache, threads=threads, micro_batch=m
            )
    return variants


def cuda_variants(model: UNet, info: ModelInfo, cache: Path, max_batch: int) -> dict[str, Callable[[], Denoiser]]:
    low = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    variants: dict[str, Callable[[], Denoiser]] = {
        "torch-cuda-fp32": lambda: TorchDenoiser(model, info, device="cuda", max_batch=max_batch),
        # What engines.select builds on a GPU without TensorRT.
        f"torch-cuda-{low}-cl-graphs": lambda: build_denoiser(
            plan_backend("cuda", "torch", low), model, info, max_batch, cache
        ),
    }
    try:
        import tensorrt  # noqa: F401

        from engines.tensorrt_backend import TensorRTDenoiser

        onnx_model = cached_onnx(model, info, cache)
        variants["tensorrt-fp16"] = lambda: TensorRTDenoiser(onnx_model, cache, precision="fp16", max_batch=max_batch)
    except ImportError:
        pass
    return variants


def print_table(rows: list[Row]) -> None:
    widths = [max(len(h), *(len(r.cells()[i]) for r in rows)) for i, h in enumerate(HEADER)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row.cells(), widths, strict=True)) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 7, 14, 28])
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per variant and batch (interleaved)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--micro-batch", type=int, nargs="*", default=[7], help="CPU micro-batch sizes to try")
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants (names in the table)")
    parser.add_argument("--matmul", type=int, default=2048, help="side of the peak-measuring matmul (CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = PRESETS[args.preset]
    flops = count_flops(config)
    torch.manual_seed(0)
    model = UNet(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.05)
    info = ModelInfo(name=f"bench-{args.preset}", config=config, sha256="0" * 64)
    max_batch = max(args.batches)
    print(f"load before: {os.getloadavg()}; {os.cpu_count()} CPUs, {args.threads} threads, torch {torch.__version__}")
    print(f"CPU: {cpu_info().describe()}; OpenVINO {openvino_version() or 'not installed'}")
    print(f"preset {args.preset}: {config.image_size}x{config.image_size}, {flops / 1e9:.2f} GFLOP per image")
    print(f"chosen by engines.select (no probe): {plan_backend(device=args.device).reason}", flush=True)

    with tempfile.TemporaryDirectory(prefix="edgenode-bench-") as tmp:
        cache = Path(tmp)
        if args.device == "cuda":
            peak_size = 8192
            variants = cuda_variants(model, info, cache, max_batch)
        else:
            peak_size = args.matmul
            variants = cpu_variants(model, info, cache, args.threads, max_batch, args.micro_batch)
        device = torch.device(args.device)
        print(peaks_line(device, peak_size), flush=True)
        print(f"peak per row: a {peak_size}^2 matmul in the row's precision, before every timed call", flush=True)
        if args.only:
            variants = {k: v for k, v in variants.items() if k in args.only}
        denoisers = {name: make() for name, make in variants.items()}
        inputs = Inputs(config.image_size)
        precisions = {name: PRECISION_NAMES[d.dtype] for name, d in denoisers.items()}
        dtypes = {v: k for k, v in PRECISION_NAMES.items()}
        rows = {(name, b): Row(name, precisions[name], b, [], [], flops) for b in args.batches for name in denoisers}
        for denoiser in denoisers.values():  # warm-up: allocation, kernel choice, graph capture
            for b in args.batches:
                denoiser(*inputs.get(b, device))
        # Rounds interleave every variant, so a load change on a shared machine hits them all alike.
        with tqdm(total=args.rounds * len(rows), desc="timing", unit="call", file=sys.stderr) as bar:
            for _ in range(args.rounds):
                for (name, b), row in rows.items():
                    row.peaks.append(matmul_peak(device, dtypes[row.precision], peak_size, repeats=1))
                    row.seconds.append(time_call(denoisers[name], inputs.get(b, device)))
                    bar.update()
        rows_list = sorted(rows.values(), key=lambda r: (list(denoisers).index(r.backend), r.batch))
    print()
    print_table(rows_list)
    default = [r for r in rows_list if r.batch == DEFAULT_BATCH]
    if default:
        best = min(default, key=lambda r: r.median_s)
        print(
            f"\nfastest at the default batch {DEFAULT_BATCH}: {best.backend} ({best.precision}) {best.gflops:.1f} "
            f"GFLOP/s = {best.fraction * 100:.0f}% of the {best.precision} matmul peak measured alongside "
            f"(median {best.peak:.1f} GFLOP/s)"
        )
    print(f"load after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
