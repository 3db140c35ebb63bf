"""Pick the fastest correct backend this machine offers, and say why.

Order on a GPU: TensorRT > torch with CUDA graphs > torch CUDA eager. On a CPU: a short measured probe
(engines/probe.py) over torch fp32/bf16, ONNX Runtime fp32 and OpenVINO fp32/bf16 picks the fastest
candidate that passes the accuracy guard, cached per machine in the engine cache; without a probe the
static preference measured in benchmarks/engines.py. `[inference] backend` / `device` / `precision`
override the choice (a forced backend is built as asked, no probe, fp32 unless `precision` says
otherwise; a forced precision with backend "auto" narrows the probe's candidates to that precision); a
requested backend that cannot run here is an error that says why, never a silent fallback.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engines.onnx_export import Exporter, OnnxModel, cached_onnx
from engines.openvino_backend import OpenVinoDenoiser, openvino_precisions, openvino_version
from engines.ort_backend import OrtDenoiser, ort_providers
from engines.probe import Candidate, Guard, ProbeRecord, cpu_candidates, probe_cpu
from engines.tensorrt_backend import TensorRTDenoiser, tensorrt_version
from engines.torch_backend import TorchDenoiser
from engines.triton_backend import TritonDenoiser, TritonEndpoint, TritonUnavailable, tritonclient_version
from inference.denoiser import Denoiser
from inference.unet import ModelInfo, load_model
from inference.weights import bundled_model_path

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino", "tensorrt")
# Backends that run the U-Net elsewhere: never chosen by "auto" (they need an endpoint), only by name.
REMOTE_BACKENDS = ("triton",)
PROBE_MODES = ("cached", "force", "off")
# CPU preference without a probe, from benchmarks/RESULTS.md (## Engines): ONNX Runtime's fused
# GroupNorm + conv graph beats torch eager on the `small` preset at every batch size measured.
CPU_DEFAULT_BACKEND = "onnxruntime"
# ONNX Runtime on CPUs runs a batch as micro-batches of at most this many images (activations of a
# few images stay in cache), one single-threaded run per CPU thread at a time (CPU data parallelism):
# measured faster than one run splitting each operator across the threads, whose per-operator
# barriers idle the cores on the small preset's short convolutions and norms. torch eager gets no
# micro-batches by default: every extra call multiplies its per-operator thread synchronisation.
CPU_MICRO_BATCH = 7


class BackendUnavailable(RuntimeError):
    """The configured device/backend/precision cannot run on this machine (message says why)."""


@dataclass(frozen=True)
class BackendStatus:
    name: str  # backend-device, e.g. "onnxruntime-cpu"
    available: bool
    detail: str


@dataclass(frozen=True)
class Plan:
    """What will run, decided before anything is loaded."""

    backend: str
    device: str
    precision: str
    cuda_graphs: bool
    reason: str


@dataclass
class Selection:
    denoiser: Denoiser
    plan: Plan
    reason: str  # the plan's reason, plus the probe's outcome when one ran
    probe: ProbeRecord | None = None  # the probe's table (measured now or read from the cache)


def backend_statuses() -> list[BackendStatus]:
    """Every backend-device pair and whether it can run here."""
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name(0) if cuda else ""
    no_gpu = "torch sees no CUDA GPU"
    providers = ort_providers()
    trt = tensorrt_version()
    ov = openvino_version()
    return [
        BackendStatus("torch-cpu", True, f"torch {torch.__version__}, {torch.get_num_threads()} threads"),
        BackendStatus("torch-cuda", cuda, gpu or no_gpu),
        BackendStatus("torch-cuda-graphs", cuda, "capture per batch shape" if cuda else no_gpu),
        BackendStatus(
            "onnxruntime-cpu",
            "CPUExecutionProvider" in providers,
            "CPUExecutionProvider" if providers else "onnxruntime not importable",
        ),
        BackendStatus(
            "onnxruntime-cuda",
            cuda and "CUDAExecutionProvider" in providers,
            "CUDAExecutionProvider" if "CUDAExecutionProvider" in providers else "no CUDAExecutionProvider",
        ),
        BackendStatus(
            "openvino-cpu",
            ov is not None,
            f"OpenVINO {ov}, {'/'.join(openvino_precisions())} on this CPU" if ov else "openvino not installed",
        ),
        BackendStatus(
            "tensorrt",
            cuda and trt is not None,
            (f"TensorRT {trt}" if trt else "tensorrt not installed") + ("" if cuda else f"; {no_gpu}"),
        ),
        _triton_status(),
    ]


def _triton_status() -> BackendStatus:
    version = tritonclient_version()
    detail = f"tritonclient {version} (a Triton server, see [triton])" if version else "tritonclient not installed"
    return BackendStatus("triton", version is not None, detail)


def _available(name: str) -> BackendStatus:
    return next(s for s in backend_statuses() if s.name == name)


def plan_backend(device: str = "auto", backend: str = "auto", precision: str = "auto") -> Plan:
    """Decide backend, device and precision from the request and what this machine has."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if backend not in ("auto", *BACKENDS, *REMOTE_BACKENDS):
        raise ValueError(f"backend must be auto, {', '.join((*BACKENDS, *REMOTE_BACKENDS))}, got {backend!r}")
    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    cuda = torch.cuda.is_available()
    if device == "cuda" and not cuda:
        raise BackendUnavailable("[inference] device = 'cuda' but torch sees no CUDA GPU; set device = 'auto' or 'cpu'")
    if backend == "tensorrt" and device == "cpu":
        raise BackendUnavailable("[inference] backend = 'tensorrt' needs device 'cuda' (or 'auto' on a GPU machine)")
    if backend == "openvino" and device == "cuda":
        raise BackendUnavailable("[inference] backend = 'openvino' runs on the CPU; set device = 'cpu' or 'auto'")
    if backend == "openvino" and device == "auto":
        device, why_device = "cpu", "OpenVINO runs on the CPU"
    elif device == "auto":
        device = "cuda" if cuda else "cpu"
        why_device = "a CUDA GPU is visible" if cuda else "no CUDA GPU is visible"
    else:
        why_device = f"[inference] device = {device!r}"

    if backend == "triton":
        return _plan_triton(device, precision, why_device)
    if backend == "auto":
        if device == "cuda":
            if _available("tensorrt").available and precision != "bf16":
                backend, reason = "tensorrt", "TensorRT is installed (fastest on NVIDIA GPUs)"
            elif precision == "bf16":
                backend, reason = "torch", "bf16 requested: torch with CUDA graphs (TensorRT builds fp16/fp32)"
            else:
                backend, reason = "torch", "TensorRT is not installed; torch with CUDA graphs is next fastest"
        elif precision == "bf16" and "bf16" in openvino_precisions():
            backend, reason = "openvino", "bf16 requested: OpenVINO runs it natively on this CPU"
        elif precision not in ("auto", "fp32"):
            backend, reason = "torch", f"{precision} requested: torch runs it on this CPU"
        else:
            backend = CPU_DEFAULT_BACKEND if _available("onnxruntime-cpu").available else "torch"
            reason = f"CPU preference {backend} without a probe (measured in benchmarks/engines.py)"
    else:
        status = _available(f"{backend}-{device}" if backend != "tensorrt" else "tensorrt")
        if not status.available:
            raise BackendUnavailable(
                f"[inference] backend = {backend!r} is not available on {device}: {status.detail}; "
                "set backend = 'auto' to use what this machine has"
            )
        reason = f"[inference] backend = {backend!r}"

    if precision == "auto":
        # TensorRT, and torch on CUDA: fp16, as fast as bf16 on an H200 and 7x closer to fp32 (anomaly map
        # 2e-3 vs 1.5e-2 of its maximum, Dice 0.995 vs 0.92: benchmarks/RESULTS.md, the GPU session)
        precision = "fp32" if device == "cpu" or backend == "onnxruntime" else "fp16"
    if device == "cpu" and precision == "fp16":
        raise BackendUnavailable("[inference] precision = 'fp16' is not supported on the CPU; use fp32")
    if backend == "onnxruntime" and precision != "fp32":
        raise BackendUnavailable("the onnxruntime backend runs the fp32 export only; set precision = 'fp32'")
    if backend == "openvino" and precision not in openvino_precisions():
        raise BackendUnavailable(
            f"[inference] precision = {precision!r}: OpenVINO runs {'/'.join(openvino_precisions())} on this CPU "
            "(bf16 needs AVX512-BF16 or AMX); set precision = 'fp32' or 'auto'"
        )
    if backend == "tensorrt" and precision == "bf16":
        raise BackendUnavailable("the tensorrt backend builds fp16 or fp32 engines; set precision = 'fp16'")
    cuda_graphs = backend == "torch" and device == "cuda"
    return Plan(backend, device, precision, cuda_graphs, f"{reason}; {why_device}; precision {precision}")


def _plan_triton(device: str, precision: str, why_device: str) -> Plan:
    """The U-Net runs on the server; `device` is where the sampler's tensors live, float32 crosses the wire."""
    status = _triton_status()
    if not status.available:
        raise BackendUnavailable(
            "[inference] backend = 'triton' needs tritonclient: pip install edgenode[triton] "
            "(or set backend = 'auto' to run the U-Net here)"
        )
    if precision not in ("auto", "fp32"):
        raise BackendUnavailable(
            "[inference] precision: with backend = 'triton' the served model decides its precision; set 'auto'"
        )
    reason = f"[inference] backend = 'triton' ({status.detail}); the sampler runs here: {why_device}"
    return Plan("triton", device, "fp32", False, reason)


def resolve_model_path(spec: str | Path) -> Path:
    """`[inference] model`: "bundled" (the .safetensors in inference/weights/) or a file path."""
    if str(spec) == "bundled":
        return bundled_model_path()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist ([inference] model)")
    return path


ModelSource = str | Path | tuple[nn.Module, ModelInfo]


def load_source(source: ModelSource) -> tuple[nn.Module, ModelInfo]:
    if isinstance(source, tuple):
        return source
    return load_model(resolve_model_path(source), device="cpu")


def _onnx(model: nn.Module, info: ModelInfo, cache_dir: Path, exporter: Exporter) -> OnnxModel:
    try:
        return cached_onnx(model, info, cache_dir, exporter=exporter)
    except Exception as exc:  # the dynamo exporter can fail on exotic setups; the legacy one rarely does
        if exporter != "dynamo":
            raise
        log.warning("dynamo ONNX export failed (%s); falling back to the TorchScript exporter", exc)
        return cached_onnx(model, info, cache_dir, exporter="torchscript")


def build_denoiser(
    plan: Plan,
    model: nn.Module,
    info: ModelInfo,
    max_batch: int,
    cache_dir: Path | None,
    threads: int | None = None,
    micro_batch: int | None = None,
    exporter: Exporter = "dynamo",
    triton: TritonEndpoint | None = None,
) -> Denoiser:
    """Instantiate what `plan` says. ONNX/TensorRT artefacts go to cache_dir (a temporary one if None).

    `threads` is the CPU threads to use (None: torch's count, one per physical core); ONNX Runtime
    on a CPU uses them as that many concurrent single-threaded runs. `triton` is where the triton
    backend's server is.
    """
    if plan.backend == "triton":
        return _triton_denoiser(plan, info, max_batch, triton)
    if plan.backend == "torch":
        return TorchDenoiser(
            model,
            info,
            device=plan.device,
            precision=plan.precision,
            channels_last=True,  # faster on CUDA (tensor cores) and, measured, for torch on CPUs too
            cuda_graphs=plan.cuda_graphs,
            max_batch=max_batch,
            micro_batch=micro_batch if plan.device == "cpu" else None,
            threads=threads,
        )
    if cache_dir is None:
        # The session/engine is built from the file and keeps no reference to it afterwards.
        with tempfile.TemporaryDirectory(prefix="edgenode-engines-") as tmp:
            return build_denoiser(plan, model, info, max_batch, Path(tmp), threads, micro_batch, exporter)
    onnx_model = _onnx(model, info, cache_dir, exporter)
    if plan.backend == "openvino":
        return OpenVinoDenoiser(
            onnx_model, cache_dir, plan.precision, max_batch=max_batch, threads=threads, micro_batch=micro_batch
        )
    if plan.backend == "onnxruntime":
        if plan.device != "cpu":
            return OrtDenoiser(onnx_model, device=plan.device, max_batch=max_batch, threads=threads)
        return OrtDenoiser(
            onnx_model,
            device="cpu",
            max_batch=max_batch,
            threads=1,
            micro_batch=micro_batch or CPU_MICRO_BATCH,
            workers=threads or torch.get_num_threads(),
        )
    return TensorRTDenoiser(onnx_model, cache_dir, device=plan.device, precision=plan.precision, max_batch=max_batch)


def _triton_denoiser(plan: Plan, info: ModelInfo, max_batch: int, endpoint: TritonEndpoint | None) -> Denoiser:
    """A server that is down now is no reason to stop the worker (jobs wait and retry); another model is."""
    if endpoint is None:
        raise ValueError("backend 'triton' needs the server's endpoint ([triton] settings)")
    denoiser = TritonDenoiser(endpoint, info, device=plan.device, max_batch=max_batch, verify=False)
    try:
        denoiser.verify()
    except TritonUnavailable as exc:
        log.warning("%s; jobs wait and are retried until it serves the model", exc)
    return denoiser


def time_call(denoiser: Denoiser, batch: int, size: int, repeats: int = 1) -> float:
    """Seconds per call on random inputs of one batch, after one warm-up call."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=gen).to(denoiser.device)
    c = torch.randn(batch, 1, size, size, generator=gen).to(denoiser.device)
    t = (torch.rand(batch, generator=gen) * 500).to(denoiser.device)
    denoiser(x, c, t)
    sync = torch.cuda.synchronize if denoiser.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        denoiser(x, c, t)
    sync()
    return (time.perf_counter() - start) / repeats


def select(
    source: ModelSource,
    device: str = "auto",
    backend: str = "auto",
    precision: str = "auto",
    max_batch: int = 28,
    cache_dir: Path | None = None,
    probe: str = "cached",
    threads: int | None = None,
    micro_batch: int | None = None,
    exporter: Exporter = "dynamo",
    triton: TritonEndpoint | None = None,
    guard: Guard | None = None,
) -> Selection:
    """Plan, load and build the denoiser.

    On a CPU with backend "auto", `probe` "cached" (the default) reuses the probe's cached
    outcome for this model and machine and probes when there is none, "force" probes again, "off" takes
    the static preference. `guard`: what a candidate must reproduce (default: the diffusion model's findings).
    """
    if probe not in PROBE_MODES:
        raise ValueError(f"probe must be one of {', '.join(PROBE_MODES)}, got {probe!r}")
    plan = plan_backend(device, backend, precision)
    model, info = load_source(source)
    candidates = cpu_candidates(backend, precision) if plan.device == "cpu" and backend == "auto" else []
    if probe == "off" or len(candidates) < 2:
        denoiser = build_denoiser(plan, model, info, max_batch, cache_dir, threads, micro_batch, exporter, triton)
        log.info("U-Net backend: %s for %s; %s", denoiser.name, info.model_id, plan.reason)
        return Selection(denoiser, plan, plan.reason)

    with tempfile.TemporaryDirectory(prefix="edgenode-probe-") as tmp:  # one export for every candidate
        work_dir = cache_dir or Path(tmp)

        def build(candidate: Candidate) -> Denoiser:
            candidate_plan = Plan(candidate.backend, "cpu", candidate.precision, False, "")
            return build_denoiser(candidate_plan, model, info, max_batch, work_dir, threads, micro_batch, exporter)

        outcome = probe_cpu(info, candidates, build, max_batch, threads, cache_dir, force=probe == "force", guard=guard)
    record = outcome.record
    how = f"cached probe of {record.probed_at}" if outcome.cached else f"probe ({record.probe_s:.1f} s)"
    reason = (
        f"{record.chosen}: the fastest of {len(record.rows)} CPU candidates that passed the accuracy guard "
        f"({how}); precision {record.precision}"
    )
    plan = Plan(record.backend, "cpu", record.precision, False, reason)
    log.info(
        "U-Net backend: %s for %s; %s\n%s", outcome.denoiser.name, info.model_id, reason, "\n".join(record.table())
    )
    return Selection(outcome.denoiser, plan, reason, record)


def select_denoiser(source: ModelSource, **kwargs: object) -> Denoiser:
    """The Denoiser that `select` picks (its reason is logged)."""
    return select(source, **kwargs).denoiser  # type: ignore[arg-type]
