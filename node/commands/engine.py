"""`edgenode engine info|build`: what can run the U-Net here, what would be chosen, and the engine cache.

`build` exports the model to ONNX (and builds a TensorRT engine on a GPU machine with TensorRT) into
`<data_dir>/engines/`, so the first job does not pay for it; `info` reads the same directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from node.config import Settings
from node.inference_server import triton_endpoint, uses_triton
from node.model_loader import effective_max_batch

if TYPE_CHECKING:
    from engines.probe import ProbeRecord

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["info", "build"], help="info: backends and cache; build: export + build")
    parser.add_argument(
        "--model", default=None, help="weights file (default: each model in [inference] model; info: CT's probe)"
    )
    parser.add_argument(
        "--exporter",
        choices=["dynamo", "torchscript"],
        default="dynamo",
        help="ONNX exporter (dynamo: opset 21 GroupNormalization; torchscript: opset 17, faster export)",
    )
    parser.add_argument(
        "--probe", action="store_true", help="info: probe the CPU backends again now (timing + accuracy guard)"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    parser.add_argument(
        "--triton-repo",
        type=Path,
        default=None,
        metavar="DIR",
        help="build: also write a Triton model repository there ([triton] model_name; ONNX Runtime, and TensorRT "
        "where built), for a GPU pool serving the nodes",
    )
    parser.add_argument(
        "--triton-instances", type=int, default=1, help="--triton-repo: model instances per GPU (instance_group count)"
    )
    parser.add_argument(
        "--triton-kind",
        choices=["gpu", "cpu"],
        default="gpu",
        help="--triton-repo: where the ONNX Runtime model's instances run (the TensorRT one always on GPUs)",
    )


def engines_dir(settings: Settings) -> Path:
    return settings.data_dir / "engines"


def _cache_lines(cache: Path) -> list[str]:
    if not cache.is_dir():
        return [f"  (empty: {cache} does not exist; run `edgenode engine build`)"]
    lines = []
    for path in sorted(cache.iterdir()):
        if path.suffix not in (".onnx", ".plan", ".blob"):
            continue
        meta_path = path.with_suffix(".json")
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        size_mb = path.stat().st_size / 1e6
        if path.suffix == ".onnx":
            what = f"ONNX {meta.get('exporter', '?')} opset {meta.get('opset', '?')}, model {meta.get('model_id', '?')}"
        elif path.suffix == ".blob":
            what = (
                f"OpenVINO {meta.get('openvino_version', '?')} {meta.get('precision', '?')} on "
                f"{meta.get('cpu_model', '?')} ({' '.join(meta.get('cpu_flags', []))}), "
                f"{meta.get('streams', '?')} streams, model {meta.get('model_id', '?')}"
            )
        else:
            what = (
                f"TensorRT {meta.get('tensorrt_version', '?')} {meta.get('precision', '?')} on "
                f"{meta.get('gpu_name', '?')} (sm {meta.get('compute_capability', '?')}), "
                f"batch {meta.get('profile', '?')}, model {meta.get('model_id', '?')}"
            )
        lines.append(f"  {path.name}  {size_mb:.1f} MB  {what}")
    return lines or [f"  (empty: nothing in {cache})"]


def _cached_probe_lines(args: argparse.Namespace, settings: Settings) -> list[str]:
    """The cached CPU probe for this model, machine and settings, or how to get one."""
    from engines.probe import cpu_candidates, probe_key, read_probe
    from engines.select import resolve_model_path
    from inference.unet import read_model_info

    inf = settings.inference
    try:
        info = read_model_info(resolve_model_path(args.model or inf.model_for("CT")))
    except FileNotFoundError as exc:
        return [f"probe: none ({exc})"]
    key = probe_key(info, cpu_candidates(inf.backend, inf.precision), effective_max_batch(inf), args.threads)
    record = read_probe(engines_dir(settings), info, key)
    if record is None:
        return [
            f"probe: none cached for {info.model_id} on this machine; the first inference worker start runs it "
            "(or `edgenode engine info --probe` now)"
        ]
    return _record_lines(record)


def _record_lines(record: ProbeRecord, indent: str = "") -> list[str]:
    """A cached probe: when, how long, what it chose, and its table."""
    return [f"{indent}probe ({record.probed_at}, {record.probe_s:.1f} s): {record.chosen}", *record.table()]


def _refiner_lines(args: argparse.Namespace, settings: Settings, probes: bool) -> list[str]:
    """The CT lung refiner: which one (or off), and its engine: probed now (--probe) or the cached probe."""
    from engines.refiner import cached_refiner_probe, refiner_selection
    from inference.lung_refiner import load_refiner, refiner_file

    inf = settings.inference
    path = refiner_file(inf.lung_refiner)
    if path is None:
        return ["lung refiner (CT): off, the threshold lung mask alone ([inference] lung_refiner)"]
    try:
        refiner = load_refiner(path)
    except (FileNotFoundError, ValueError, OSError) as exc:
        return [f"lung refiner (CT): {path}: {exc}"]
    lines = [f"lung refiner (CT): {refiner.model_id} ({path})"]
    if args.probe:
        selection = refiner_selection(
            refiner, inf.device, inf.backend, inf.precision, engines_dir(settings), "force", args.threads
        )
        table = selection.probe.table() if selection.probe is not None else []
        return [*lines, f"  probe: {selection.denoiser.name}: {selection.reason}", *table]
    if not probes:
        return lines
    record = cached_refiner_probe(refiner, inf.backend, inf.precision, engines_dir(settings), args.threads)
    if record is None:
        return [*lines, "  probe: none cached; the first inference worker start runs it"]
    return [*lines, *_record_lines(record, indent="  ")]


def _model_lines(settings: Settings) -> list[str]:
    """Which model analyses which modality, and which modalities none does (their series are skipped)."""
    from node.models import modality_plans

    return [plan.line() for plan in modality_plans(settings)]


def _info(args: argparse.Namespace, settings: Settings) -> int:
    from engines.select import BackendUnavailable, backend_statuses, plan_backend, select
    from inference.hardware import cpu_info

    inf = settings.inference
    print(f"CPU: {cpu_info().describe()}")
    print("backends:")
    for status in backend_statuses():
        print(f"  {'yes' if status.available else 'no ':3}  {status.name:18} {status.detail}")
    try:
        plan = plan_backend(inf.device, inf.backend, inf.precision)
    except BackendUnavailable as exc:
        print(f"chosen: none: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print("models ([inference] model, checked against what each was trained for):")
    for line in _model_lines(settings):
        print(f"  {line}")
    print(f"chosen: {plan.backend} on {plan.device} ({plan.precision}{', CUDA graphs' if plan.cuda_graphs else ''})")
    print(f"  why: {plan.reason}")
    probes = plan.device == "cpu" and inf.backend == "auto"
    if args.probe:
        try:
            selection = select(
                args.model or inf.model_for("CT"),
                device=inf.device,
                backend=inf.backend,
                precision=inf.precision,
                max_batch=effective_max_batch(inf),
                cache_dir=engines_dir(settings),
                probe="force",
                threads=args.threads,
                exporter=args.exporter,
                triton=triton_endpoint(settings) if uses_triton(settings) else None,
            )
        except (BackendUnavailable, RuntimeError) as exc:  # e.g. no candidate of a forced precision passed
            print(f"probe: failed: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"probe: {selection.denoiser.name}: {selection.reason}")
        if selection.probe is not None:
            print("\n".join(selection.probe.table()))
    elif probes:
        print("\n".join(_cached_probe_lines(args, settings)))
    print("\n".join(_refiner_lines(args, settings, probes)))
    print(f"cache {engines_dir(settings)}:")
    print("\n".join(_cache_lines(engines_dir(settings))))
    return EXIT_OK


def _build(args: argparse.Namespace, settings: Settings) -> int:
    """Build for --model, else for each distinct model the [inference] model table names."""
    sources = [args.model] if args.model else list(dict.fromkeys(settings.inference.model.values()))
    for source in sources:
        code = _build_one(args, settings, source)
        if code != EXIT_OK:
            return code
    return EXIT_OK


def _build_one(args: argparse.Namespace, settings: Settings, source: str) -> int:
    import torch

    from engines.onnx_export import cached_onnx
    from engines.select import backend_statuses, load_source, time_call
    from engines.tensorrt_backend import TensorRTDenoiser
    from engines.triton_backend import tritonclient_version

    inf = settings.inference
    max_batch = effective_max_batch(inf)
    cache = engines_dir(settings)
    start = time.perf_counter()

    def step(n: int, total: int, text: str) -> None:
        print(f"[{n}/{total}] {text} ({time.perf_counter() - start:.1f} s)", flush=True)

    trt_ok = next(s for s in backend_statuses() if s.name == "tensorrt").available and inf.device != "cpu"
    if args.triton_repo is not None and tritonclient_version() is None:
        print("edgenode: --triton-repo needs tritonclient: pip install edgenode[triton]", file=sys.stderr)
        return EXIT_USAGE
    total = (4 if trt_ok else 3) + (args.triton_repo is not None)
    step(1, total, f"loading model {source}")
    model, info = load_source(source)
    step(2, total, f"exporting {info.model_id} to ONNX ({args.exporter}) into {cache}")
    onnx_model = cached_onnx(model, info, cache, exporter=args.exporter)
    print(f"  {onnx_model.path.name}: opset {onnx_model.opset}, sha256 {onnx_model.sha256[:16]}, checker OK")
    step(3, total, "checking ONNX Runtime against torch on a random batch")
    from engines.ort_backend import OrtDenoiser

    size = info.config.image_size
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 1, size, size, generator=gen), torch.randn(2, 1, size, size, generator=gen)
    t = torch.rand(2, generator=gen) * 500
    with torch.inference_mode():
        ref = model.eval()(x, c, t)
    got = OrtDenoiser(onnx_model, threads=args.threads)(x, c, t)
    rel = float((got - ref).norm() / ref.norm().clamp_min(1e-12))
    print(f"  relative error onnxruntime vs torch: {rel:.2e}")
    if rel > 1e-4:
        print(f"edgenode: exported model disagrees with torch (relative error {rel:.2e} > 1e-4)", file=sys.stderr)
        return EXIT_FAILED
    if trt_ok:
        step(4, total, "building the TensorRT engine (minutes on first build)")
        precision = inf.precision if inf.precision in ("fp16", "fp32") else "fp16"
        engine = TensorRTDenoiser(onnx_model, cache, precision=precision, max_batch=max_batch)
        print(f"  {engine.describe()}: {time_call(engine, max_batch, size, repeats=5) * 1e3:.1f} ms per call")
        plan = engine.path
    else:
        print("  TensorRT: not built (needs tensorrt and a CUDA GPU)")
        plan = None
    if args.triton_repo is not None:
        from engines.triton_repo import write_repository

        step(total, total, f"writing the Triton model repository {args.triton_repo}")
        written = write_repository(
            args.triton_repo,
            onnx_model,
            info,
            settings.triton.model_name,
            max_batch,
            instances=args.triton_instances,
            kind=f"KIND_{args.triton_kind.upper()}",
            plan=plan,
        )
        for repo_model in written:
            print(
                f"  {repo_model.directory}: {repo_model.platform}, max batch {max_batch}, "
                f"weights sha256 {info.sha256[:16]}"
            )
    print(f"done in {time.perf_counter() - start:.1f} s; cache {cache}:")
    print("\n".join(_cache_lines(cache)))
    return EXIT_OK


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return _info(args, settings) if args.action == "info" else _build(args, settings)
    except FileNotFoundError as exc:
        print(f"edgenode: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:  # not an edgenode model, bad option combination
        print(f"edgenode: {exc}", file=sys.stderr)
        return EXIT_USAGE
