"""The exported U-Net in OpenVINO Runtime on the CPU: fp32, or bf16 where the CPU has bf16 units.

OpenVINO compiles the cached ONNX export (engines.onnx_export) for this CPU; `INFERENCE_PRECISION_HINT`
bf16 runs the convolutions and matmuls on AVX512-BF16/AMX units (inputs, outputs and the API stay
float32). A call's batch is cut into one chunk per stream and the chunks run as concurrent asynchronous
infer requests, one stream per CPU thread, for the same reason ONNX Runtime runs one single-threaded
session per thread (engines.ort_backend): the small U-Net's operators are too short to split across
cores without every core waiting at each operator's end.

Compiled models are cached in the engine cache like TensorRT plans: the file name is a hash of the ONNX
file's SHA-256, the OpenVINO version, the precision, the stream/thread layout and this CPU's model and
flags, so new weights, an upgrade or another CPU compile again; a blob that fails to import is recompiled.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from engines.base import PRECISIONS, batch_slices, check_inputs
from engines.onnx_export import INPUT_NAMES, OnnxModel
from inference.hardware import cpu_info

log = logging.getLogger(__name__)

OV_PRECISIONS = ("fp32", "bf16")
_HINT = {"fp32": "f32", "bf16": "bf16"}


@functools.cache
def openvino_version() -> str | None:
    """OpenVINO's version ("2026.4.1"), or None when it is not installed."""
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version().split("-")[0]


@functools.cache
def openvino_precisions() -> tuple[str, ...]:
    """Precisions OpenVINO's CPU plugin runs natively here (bf16 only on CPUs with bf16 units); () without it."""
    if openvino_version() is None:
        return ()
    import openvino

    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return ("fp32", "bf16") if "BF16" in capabilities else ("fp32",)


@dataclass(frozen=True)
class CompiledKey:
    """Everything a compiled (exported) OpenVINO model depends on."""

    onnx_sha256: str
    openvino_version: str
    precision: str
    streams: int
    threads: int
    cpu_model: str
    cpu_flags: tuple[str, ...]

    def digest(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode()).hexdigest()


class OpenVinoDenoiser:
    """Runs an exported U-Net with OpenVINO on the CPU.

    `threads` is the CPU threads to use (None: torch's count); each becomes one stream with one thread,
    fed by its own asynchronous infer request. `micro_batch` caps the images per request (None: a
    call's batch split evenly over the streams). `cache_dir` holds the compiled model (None: no cache).
    """

    def __init__(
        self,
        onnx_model: OnnxModel,
        cache_dir: Path | None,
        precision: str = "fp32",
        max_batch: int = 28,
        threads: int | None = None,
        micro_batch: int | None = None,
    ) -> None:
        if openvino_version() is None:
            raise RuntimeError("the openvino backend needs the openvino package (pip install openvino)")
        if precision not in OV_PRECISIONS:
            raise ValueError(f"the openvino backend runs {' or '.join(OV_PRECISIONS)}, got {precision!r}")
        if precision not in openvino_precisions():
            raise RuntimeError(f"OpenVINO cannot run {precision} on this CPU ({cpu_info().describe()})")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        import openvino

        self.device = torch.device("cpu")
        self.precision = precision
        self.dtype = PRECISIONS[precision]
        self.max_batch = max_batch
        self.micro_batch = micro_batch
        self.model_id = onnx_model.model_id
        self.onnx_model = onnx_model
        self.streams = max(1, threads or torch.get_num_threads())
        self.name = f"openvino-cpu-{precision}"
        cpu = cpu_info()
        self.key = CompiledKey(
            onnx_model.sha256,
            openvino_version() or "",
            precision,
            self.streams,
            self.streams,
            cpu.model,
            tuple(sorted(cpu.flags)),
        )
        self._core = openvino.Core()
        self._config = {
            "INFERENCE_PRECISION_HINT": _HINT[precision],
            "PERFORMANCE_HINT": "THROUGHPUT",
            "NUM_STREAMS": str(self.streams),
            "INFERENCE_NUM_THREADS": str(self.streams),
        }
        self.compiled = self._load_or_compile(cache_dir)
        names = [i.get_names() for i in self.compiled.inputs]  # a tensor can carry several names
        if len(names) != len(INPUT_NAMES) or not all(any(n in found for found in names) for n in INPUT_NAMES):
            raise ValueError(f"{onnx_model.path} has inputs {names}, expected {list(INPUT_NAMES)}")
        self._queue = openvino.AsyncInferQueue(self.compiled, self.streams)
        self._queue.set_callback(self._done)
        self._out: np.ndarray | None = None

    def blob_path(self, cache_dir: Path) -> Path:
        return cache_dir / f"{self.model_id}-openvino-{self.precision}-{self.key.digest()[:16]}.blob"

    def _load_or_compile(self, cache_dir: Path | None):
        blob = self.blob_path(cache_dir) if cache_dir is not None else None
        if blob is not None and blob.is_file():
            try:
                return self._core.import_model(blob.read_bytes(), "CPU", self._config)
            except Exception as exc:  # noqa: BLE001 - a truncated or foreign blob: compile again
                log.warning("cached OpenVINO model %s does not import (%s); compiling again", blob, exc)
        log.info(
            "compiling %s for OpenVINO %s (%s, %d streams)",
            self.onnx_model.path.name,
            self.key.openvino_version,
            self.precision,
            self.streams,
        )
        compiled = self._core.compile_model(str(self.onnx_model.path), "CPU", self._config)
        if blob is not None:
            self._store(compiled, blob)
        return compiled

    def _store(self, compiled, blob: Path) -> None:
        """Write the compiled model beside its target and rename, so a crash never leaves half a blob."""
        blob.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=blob.stem, suffix=".tmp", dir=blob.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(compiled.export_model().getvalue())
            os.replace(tmp, blob)
        finally:
            Path(tmp).unlink(missing_ok=True)
        meta = {**asdict(self.key), "model_id": self.model_id, "onnx": self.onnx_model.path.name}
        meta["cpu_flags"] = cpu_info().speed_flags  # the sidecar lists the flags that matter; the key hashes all
        blob.with_suffix(".json").write_text(json.dumps(meta, indent=2))

    def _done(self, request, rows: slice) -> None:
        assert self._out is not None
        self._out[rows] = request.get_output_tensor(0).data

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n = check_inputs(x_t, cond, t, self.max_batch)
        x = x_t.detach().to("cpu", torch.float32).contiguous().numpy()
        c = cond.detach().to("cpu", torch.float32).contiguous().numpy()
        tt = t.detach().to("cpu", torch.float32).contiguous().numpy()
        chunk = min(self.micro_batch or n, math.ceil(n / self.streams))
        self._out = np.empty(x.shape, dtype=np.float32)
        try:
            for s in batch_slices(n, chunk):
                self._queue.start_async({"x_t": x[s], "cond": c[s], "t": tt[s]}, s)
            self._queue.wait_all()
            return torch.from_numpy(self._out)
        finally:
            self._out = None

    def describe(self) -> str:
        extra = f", micro-batch {self.micro_batch}" if self.micro_batch else ""
        return f"{self.name} (OpenVINO {self.key.openvino_version}, {self.streams} streams x 1 thread{extra})"
