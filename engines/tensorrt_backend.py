"""TensorRT 10: build an engine from the exported ONNX, cache it on disk, and run it on torch's buffers.

The build uses one optimisation profile over the batch axis (min 1, opt and max from the settings)
and, in FP16, keeps normalisation and reduction layers in FP32: GroupNorm's sum of squares is where
FP16 overflows. A serialized engine is only valid for one GPU model, TensorRT version and build
configuration, so the cache key covers all of them; a changed key means a new build.

The key and the profile are pure functions (tested without TensorRT); everything that needs
`tensorrt` imports it lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from engines.base import check_inputs
from engines.onnx_export import INPUT_NAMES, OUTPUT_NAME, OnnxModel

log = logging.getLogger(__name__)

TRT_PRECISIONS = ("fp32", "fp16")
DEFAULT_WORKSPACE_BYTES = 4 << 30


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile's batch sizes: the engine accepts min..max and is tuned for opt."""

    min: int
    opt: int
    max: int


def batch_profile(max_batch: int, opt_batch: int | None = None) -> BatchProfile:
    """Profile for batches 1..max_batch, tuned for opt_batch (default: max_batch, what full calls use)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    opt = max_batch if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise ValueError(f"opt_batch {opt} is outside 1..{max_batch}")
    return BatchProfile(1, opt, max_batch)


def profile_shapes(
    profile: BatchProfile, height: int, width: int
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of every network input for `profile` at one image size."""
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
    for name in INPUT_NAMES:
        per_batch = [(b, 1, height, width) if name != "t" else (b,) for b in (profile.min, profile.opt, profile.max)]
        shapes[name] = (per_batch[0], per_batch[1], per_batch[2])
    return shapes


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized engine depends on."""

    onnx_sha256: str
    gpu_name: str
    compute_capability: str  # "8.9"
    tensorrt_version: str
    precision: str
    profile: BatchProfile
    height: int
    width: int

    def digest(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()


def engine_path(cache_dir: Path, key: EngineKey) -> Path:
    return cache_dir / f"{key.digest()}.plan"


def tensorrt_version() -> str | None:
    """Installed TensorRT version, or None when the Python package is not importable."""
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return str(trt.__version__)


def cuda_device_identity(device: torch.device) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def _mark_fp32_layers(network: Any, trt: Any) -> int:
    """Pin normalisation and reduction layers (and their outputs) to FP32; returns how many."""
    keep = {trt.LayerType.NORMALIZATION, trt.LayerType.REDUCE}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in keep:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            if layer.type == trt.LayerType.NORMALIZATION:
                # get_layer returns the base ILayer; the subclass view exposes the internal precision.
                layer.__class__ = trt.INormalizationLayer
                layer.compute_precision = trt.float32
            pinned += 1
    return pinned


def build_engine(
    onnx_model: OnnxModel,
    key: EngineKey,
    out_path: Path,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> Path:
    """Build and serialize an engine for `key` from the ONNX file; written atomically to out_path."""
    import tensorrt as trt

    if key.precision not in TRT_PRECISIONS:
        raise ValueError(f"TensorRT precision must be one of {TRT_PRECISIONS}, got {key.precision!r}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: every network is explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_model.path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_model.path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if key.precision == "fp16":
        if not getattr(builder, "platform_has_fast_fp16", True):  # deprecated in later 10.x releases
            log.warning("this GPU has no fast FP16; the FP16 engine may be slower than FP32")
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _mark_fp32_layers(network, trt)
        log.info("kept %d normalisation/reduction layers in FP32", pinned)

    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(key.profile, key.height, key.width).items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    log.info(
        "building TensorRT %s engine for %s (batch %s); this takes minutes", key.precision, key.gpu_name, key.profile
    )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_model.path} (see the log above)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=out_path.stem, suffix=".plan.tmp", dir=out_path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(memoryview(serialized))
    os.replace(tmp_name, out_path)
    meta = {"model_id": onnx_model.model_id, "onnx": onnx_model.path.name, **asdict(key), "key": key.digest()}
    out_path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return out_path


class TensorRTDenoiser:
    """Runs a cached (or freshly built) TensorRT engine on torch's current CUDA stream.

    Inputs and output are torch CUDA tensors whose addresses are handed to the execution context,
    so data never leaves the GPU. Engine I/O stays float32 (the ONNX's types); FP16 is internal.
    """

    def __init__(
        self,
        onnx_model: OnnxModel,
        cache_dir: Path,
        device: str | torch.device = "cuda",
        precision: str = "fp16",
        max_batch: int = 28,
        opt_batch: int | None = None,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    ) -> None:
        import tensorrt as trt

        self.device = torch.device(device)
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError("TensorRT needs a CUDA device visible to torch")
        if onnx_model.dynamic_spatial:
            raise ValueError("build TensorRT engines from a fixed-size export (dynamic_spatial=False)")
        gpu_name, capability = cuda_device_identity(self.device)
        size = onnx_model.image_size
        self.key = EngineKey(
            onnx_sha256=onnx_model.sha256,
            gpu_name=gpu_name,
            compute_capability=capability,
            tensorrt_version=str(trt.__version__),
            precision=precision,
            profile=batch_profile(max_batch, opt_batch),
            height=size,
            width=size,
        )
        self.path = engine_path(cache_dir, self.key)
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        self.max_batch = max_batch
        self.model_id = onnx_model.model_id
        self.name = f"tensorrt-{precision}"
        self.image_size = size

        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)
        self._engine = None
        if self.path.is_file():
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                log.warning("cached engine %s does not deserialize; rebuilding", self.path)
        if self._engine is None:
            build_engine(onnx_model, self.key, self.path, workspace_bytes)
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise RuntimeError(f"TensorRT engine {self.path} was built but does not deserialize")
        else:
            log.info("using cached TensorRT engine %s", self.path)
        with torch.cuda.device(self.device):
            self._context = self._engine.create_execution_context()
        names = {self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)}
        if names != {*INPUT_NAMES, OUTPUT_NAME}:
            raise RuntimeError(f"engine {self.path} has I/O tensors {sorted(names)}, expected inputs and 'eps'")

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = check_inputs(x_t, cond, t, self.max_batch)
        if x_t.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"engine is built for {self.image_size}x{self.image_size} images, got {tuple(x_t.shape)}")
        tensors = {
            "x_t": x_t.to(self.device, torch.float32).contiguous(),
            "cond": cond.to(self.device, torch.float32).contiguous(),
            "t": t.to(self.device, torch.float32).contiguous(),
        }
        out = torch.empty((n, 1, self.image_size, self.image_size), device=self.device, dtype=torch.float32)
        for name, tensor in tensors.items():
            self._context.set_input_shape(name, tuple(tensor.shape))
            self._context.set_tensor_address(name, tensor.data_ptr())
        self._context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (execute_async_v3 returned False)")
        # No synchronisation: the caching allocator is stream-ordered, so the temporaries above are
        # only reused by later work on this same stream, after TensorRT has read them.
        return out

    def describe(self) -> str:
        return f"{self.name} (engine {self.path.name}, batch profile {self.key.profile})"
