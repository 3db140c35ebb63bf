"""Export the U-Net to ONNX: dynamic batch axis, the timestep as an input tensor, GroupNorm as one op.

torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`) at opset 21 is the default: it writes
each GroupNorm as a single `GroupNormalization` node (the opset-21 definition, per-channel scale and
bias), which ONNX Runtime fuses and TensorRT maps to its normalization layer, and it checks clean
with `onnx.checker`. The legacy TorchScript exporter (`exporter="torchscript"`, opset 17) remains as a
fallback; it writes GroupNorm as Reshape + InstanceNormalization + Mul/Add and needs far fewer
seconds, which is why tests may use it too. Both give the same numbers (tests/test_onnx_export.py).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from inference.unet import ModelInfo, UNet, file_sha256

log = logging.getLogger(__name__)

INPUT_NAMES = ("x_t", "cond", "t")
OUTPUT_NAME = "eps"
DEFAULT_OPSET = {"dynamo": 21, "torchscript": 17}
MAX_EXPORT_BATCH = 4096  # the symbolic batch dimension's upper bound during export

Exporter = Literal["dynamo", "torchscript"]


@dataclass(frozen=True)
class OnnxModel:
    """An exported ONNX file and what it was made from; `sha256` keys everything built from it."""

    path: Path
    sha256: str
    model_id: str
    exporter: str
    opset: int
    dynamic_spatial: bool
    image_size: int

    def sidecar(self) -> Path:
        return self.path.with_suffix(".json")


@functools.cache
def graph_code_version() -> str:
    """What shapes the exported graph besides the weights and options: the U-Net's own code (an upgrade may change
    its forward pass with the same weights) and the versions of the exporting libraries."""
    import inference.unet

    versions = [torch.__version__.split("+")[0]]
    for name in ("onnx", "onnxscript"):
        try:
            versions.append(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            versions.append("")
    code = hashlib.sha256(Path(inference.unet.__file__).read_bytes()).hexdigest()[:16]
    return ",".join([code, *versions])


def export_key(info: ModelInfo, exporter: str, opset: int, dynamic_spatial: bool) -> str:
    """Name of a cached export: same weights + same export options + same U-Net code and exporters = same file."""
    payload = json.dumps([info.sha256, exporter, opset, dynamic_spatial, graph_code_version()], separators=(",", ":"))
    return f"{info.model_id}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def _example_inputs(size: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=gen)
    return x, torch.randn(batch, 1, size, size, generator=gen), torch.rand(batch, generator=gen) * 500


# Loggers that narrate every optimiser pass (and torchvision's absence) at INFO/WARNING during export.
_NOISY_EXPORT_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx._internal.exporter._registration")


@contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved, strict=True):
            lg.setLevel(level)


def _export_dynamo(model: nn.Module, args: tuple[torch.Tensor, ...], path: Path, opset: int, spatial: bool) -> None:
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    image: dict[int, object] = {0: batch}
    if spatial:
        # U-Net levels halve the grid, so spatial sizes are multiples of 2^(levels-1).
        if not isinstance(model, UNet):
            raise TypeError(f"dynamic spatial export needs the U-Net (its levels set the size step), not {model}")
        levels = len(model.config.channel_mults)
        step = 2 ** (levels - 1)
        image[2] = step * torch.export.Dim("h_blocks", min=1, max=4096 // step)
        image[3] = step * torch.export.Dim("w_blocks", min=1, max=4096 // step)
    with warnings.catch_warnings(), _quiet_loggers(*_NOISY_EXPORT_LOGGERS):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=True,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"x_t": image, "cond": image, "t": {0: batch}},
            external_data=False,
            optimize=True,
            verbose=False,
        )


def _export_torchscript(
    model: nn.Module, args: tuple[torch.Tensor, ...], path: Path, opset: int, spatial: bool
) -> None:
    image = {0: "batch", 2: "height", 3: "width"} if spatial else {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={"x_t": image, "cond": image, "t": {0: "batch"}, OUTPUT_NAME: image},
        )


def check_onnx(path: Path) -> None:
    """Raise onnx.checker.ValidationError when the file is not a valid ONNX model."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)


def export_onnx(
    model: nn.Module,
    info: ModelInfo,
    path: Path,
    exporter: Exporter = "dynamo",
    opset: int | None = None,
    dynamic_spatial: bool = False,
) -> OnnxModel:
    """Export `model` (fp32, CPU) to `path`, check it, and write a JSON sidecar with its identity."""
    if exporter not in DEFAULT_OPSET:
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    opset = opset or DEFAULT_OPSET[exporter]
    if opset < 17:
        raise ValueError(f"opset {opset} is too old: >= 17 is needed for a normalization op")
    size = info.config.image_size
    model = copy.deepcopy(model).to("cpu", torch.float32).eval()  # never move the caller's module
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a crash never leaves a half-written model in the cache.
    fd, tmp_name = tempfile.mkstemp(prefix=path.stem, suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        log.info("exporting %s to ONNX (%s exporter, opset %d) -> %s", info.model_id, exporter, opset, path)
        fn = _export_dynamo if exporter == "dynamo" else _export_torchscript
        with torch.no_grad():
            fn(model, _example_inputs(size), tmp, opset, dynamic_spatial)
        check_onnx(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    result = OnnxModel(
        path=path,
        sha256=file_sha256(path),
        model_id=info.model_id,
        exporter=exporter,
        opset=opset,
        dynamic_spatial=dynamic_spatial,
        image_size=size,
    )
    meta = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}
    result.sidecar().write_text(json.dumps(meta, indent=2))
    return result


def cached_onnx(
    model: nn.Module,
    info: ModelInfo,
    cache_dir: Path,
    exporter: Exporter = "dynamo",
    opset: int | None = None,
    dynamic_spatial: bool = False,
) -> OnnxModel:
    """The export for these weights and options from `cache_dir`, exported first if missing or corrupt."""
    opset = opset or DEFAULT_OPSET[exporter]
    path = cache_dir / f"{export_key(info, exporter, opset, dynamic_spatial)}.onnx"
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file():
        try:
            meta = json.loads(sidecar.read_text())
            if meta.get("sha256") == file_sha256(path):
                meta["path"] = path
                return OnnxModel(**meta)
            log.warning("cached ONNX %s does not match its recorded hash; exporting again", path)
        except (ValueError, TypeError) as exc:
            log.warning("unreadable ONNX sidecar %s (%s); exporting again", sidecar, exc)
    return export_onnx(model, info, path, exporter=exporter, opset=opset, dynamic_spatial=dynamic_spatial)
