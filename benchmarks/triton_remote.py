"""What a remote U-Net costs: per call and per study, the triton backend against local ONNX Runtime.

Both run the same ONNX export of the same weights; the server here is PyTriton's tritonserver on 127.0.0.1
running that export in ONNX Runtime on this machine's CPUs (tests/triton_server.py, in the venv the tests
make under .cache/), so the difference between the rows is the remote call itself: serialisation, gRPC over
loopback, Triton's queue and dynamic batcher, the python backend's hand-over. `--url` measures an existing
server instead (it must serve this model, e.g. a repository from `edgenode engine build --triton-repo`); then
the difference also holds the other machine's speed. Results of both are compared (max |eps| difference).

(Not named triton.py: a script's folder comes first on sys.path, and benchmarks/triton.py would shadow the
`triton` package that torch imports, for every script in benchmarks/.)
Run: PYTHONPATH=. python benchmarks/triton_remote.py [--calls 20] [--batch 28] [--slices 80] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engines.onnx_export import cached_onnx  # noqa: E402
from engines.ort_backend import OrtDenoiser  # noqa: E402
from engines.select import CPU_MICRO_BATCH, load_source  # noqa: E402
from engines.triton_backend import MODEL_ID_PARAMETER, MODEL_SHA256_PARAMETER, TritonDenoiser, TritonEndpoint  # noqa: E402
from inference.phantoms import ct_datasets, make_ct, synthetic_study  # noqa: E402
from inference.pipeline import PipelineSettings, run_pipeline  # noqa: E402

MODEL_NAME = "edgenode-unet"


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled", help="weights file ([inference] model; default: bundled)")
    parser.add_argument("--url", default=None, help="an existing Triton gRPC endpoint (default: start PyTriton's)")
    parser.add_argument("--batch", type=int, default=28, help="images per U-Net call ([inference] max_batch)")
    parser.add_argument("--calls", type=int, default=20, help="timed U-Net calls per row (median)")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 4], help="[triton] in_flight values")
    parser.add_argument("--slices", type=int, default=80, help="phantom CT slices for the per-study rows")
    parser.add_argument("--size", type=int, default=512, help="phantom CT image size")
    parser.add_argument("--repeats", type=int, default=2, help="timed studies per row (median)")
    parser.add_argument("--ensemble", type=int, default=None, help="default: [inference] ensemble (7)")
    parser.add_argument("--steps", type=int, default=None, help="default: [inference] steps (10)")
    parser.add_argument("--threads", type=int, default=None, help="local ONNX Runtime concurrent runs (default: cores)")
    args = parser.parse_args()

    model, info = load_source(args.model)
    size = info.config.image_size
    print(f"load before: {os.getloadavg()}; {os.cpu_count()} CPUs, torch {torch.__version__}, model {info.model_id}")
    with tempfile.TemporaryDirectory(prefix="edgenode-bench-triton-") as tmp:
        folder = Path(tmp)
        onnx = cached_onnx(model, info, folder / "engines")
        workers = args.threads or torch.get_num_threads()
        local = OrtDenoiser(
            onnx, max_batch=args.batch, threads=1, micro_batch=CPU_MICRO_BATCH, workers=workers
        )  # what engines.select builds on a CPU
        server = None
        url = args.url
        if url is None:
            from tests.triton_support import pytriton_python, pytriton_server

            parameters = {MODEL_SHA256_PARAMETER: info.sha256, MODEL_ID_PARAMETER: info.model_id}
            server = pytriton_server(
                pytriton_python(), onnx.path, MODEL_NAME, parameters, folder / "server.log", max_batch=args.batch
            )
            print("starting PyTriton's tritonserver on 127.0.0.1 ...", flush=True)
            server.start()
            url = server.url
        try:
            denoisers = {f"onnxruntime-cpu x{workers} (local)": local}
            for n in args.in_flight:
                endpoint = TritonEndpoint(url=url, model_name=MODEL_NAME, in_flight=n)
                denoisers[f"triton in_flight {n}"] = TritonDenoiser(endpoint, info, max_batch=args.batch)

            gen = torch.Generator().manual_seed(0)
            x = torch.randn(args.batch, 1, size, size, generator=gen)
            c = (torch.rand(args.batch, 1, size, size, generator=gen) > 0.5).float()
            t = torch.rand(args.batch, generator=gen) * 250
            reference = local(x, c, t)
            per_call = {}
            for name, denoiser in denoisers.items():
                per_call[name] = median_seconds(lambda d=denoiser: d(x, c, t), args.calls)
                diff = float((denoiser(x, c, t) - reference).abs().max())
                print(f"{name}: {per_call[name] * 1e3:.2f} ms per {args.batch}-image call, max |eps diff| {diff:.2e}")

            phantom = make_ct(7, args.size, args.size, args.slices, "nodule")
            files = []
            for i, ds in enumerate(ct_datasets(phantom, synthetic_study(0, 7))):
                files.append(folder / f"{i:04d}.dcm")
                ds.save_as(files[-1], enforce_file_format=True)
            settings = replace(PipelineSettings(), max_batch=args.batch)
            settings = replace(
                settings, ensemble=args.ensemble or settings.ensemble, steps=args.steps or settings.steps
            )
            per_study = {}
            for name, denoiser in denoisers.items():
                per_study[name] = median_seconds(
                    lambda d=denoiser: run_pipeline(files, d, info, settings), args.repeats
                )
                print(f"{name}: {per_study[name]:.2f} s per study", file=sys.stderr, flush=True)
            images = settings.ensemble * settings.steps * args.slices
        finally:
            if server is not None:
                server.stop()

    base = next(iter(denoisers))
    print()
    print(
        f"U-Net calls of {args.batch} x 2 x {size} x {size}; study: {args.slices} x {args.size}x{args.size} CT at the"
    )
    print(
        f"[inference] settings (ensemble {settings.ensemble}, steps {settings.steps}): {images} U-Net images per study"
    )
    print()
    print("| backend | ms per call | overhead ms per call | s per study | overhead s per study |")
    print("|---|---|---|---|---|")
    for name in denoisers:
        print(
            f"| {name} | {per_call[name] * 1e3:.2f} | {(per_call[name] - per_call[base]) * 1e3:.2f} "
            f"| {per_study[name]:.3f} | {per_study[name] - per_study[base]:.3f} |"
        )
    print(f"\nload after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
