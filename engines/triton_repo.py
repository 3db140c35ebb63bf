"""Write a Triton model repository for the node's model: what a GPU pool serves to every node.

Layout (Triton's): `<repo>/<name>/config.pbtxt` + `<repo>/<name>/1/model.onnx` for ONNX Runtime, and, where a
TensorRT plan was built, `<repo>/<name>-tensorrt/config.pbtxt` + `1/model.plan`. Both configs batch
dynamically (requests of several workers and nodes merged up to `max_batch`), run `instances` copies of the
model per GPU, take the timestep as dims [1] reshaped to the scalar the U-Net expects, and carry the
weights' SHA-256 as the parameter `edgenode_model_sha256`, which every node checks before it trusts the
model (engines/triton_backend.py). The configs are built as tritonclient's ModelConfig protobuf and
written in its text format, so they are what Triton parses.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from engines.onnx_export import INPUT_NAMES, OUTPUT_NAME, OnnxModel
from engines.triton_backend import MODEL_ID_PARAMETER, MODEL_SHA256_PARAMETER
from inference.unet import ModelInfo

DEFAULT_QUEUE_DELAY_US = 2000  # how long Triton may hold a request to merge it with others
DEFAULT_INSTANCES = 1


@dataclass(frozen=True)
class RepoModel:
    """One model written into the repository."""

    name: str
    platform: str
    directory: Path


def model_config(
    name: str,
    platform: str,
    info: ModelInfo,
    max_batch: int,
    instances: int = DEFAULT_INSTANCES,
    kind: str = "KIND_GPU",
    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
    default_model_filename: str = "",
) -> object:
    """The ModelConfig protobuf of one served U-Net (platform "onnxruntime_onnx" or "tensorrt_plan")."""
    from tritonclient.grpc import model_config_pb2 as pb

    if max_batch < 1 or instances < 1:
        raise ValueError(f"max_batch and instances must be >= 1, got {max_batch} and {instances}")
    size = info.config.image_size
    config = pb.ModelConfig(name=name, platform=platform, max_batch_size=max_batch)
    if default_model_filename:
        config.default_model_filename = default_model_filename
    for input_name in INPUT_NAMES:
        tensor = config.input.add(name=input_name, data_type=pb.TYPE_FP32)
        if input_name == "t":
            tensor.dims.append(1)  # one timestep per image; the U-Net takes (N,), so drop the axis
            tensor.reshape.SetInParent()
        else:
            tensor.dims.extend([1, size, size])
    config.output.add(name=OUTPUT_NAME, data_type=pb.TYPE_FP32, dims=[1, size, size])
    # Preferred sizes: the node's micro-batch multiples up to max_batch, so merged requests fill them.
    preferred = sorted({b for b in (max_batch // 4, max_batch // 2, max_batch) if b >= 1})
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    config.instance_group.add(count=instances, kind=getattr(pb.ModelInstanceGroup, kind))
    config.parameters[MODEL_SHA256_PARAMETER].string_value = info.sha256
    config.parameters[MODEL_ID_PARAMETER].string_value = info.model_id
    return config


def config_text(config: object) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse_config(text: str) -> object:
    """A config.pbtxt parsed as Triton parses it (google.protobuf.text_format.ParseError if it is not valid)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    return text_format.Parse(text, pb.ModelConfig())


def _write_model(repo: Path, name: str, config: object, artefact: Path, filename: str) -> RepoModel:
    """<repo>/<name>/{config.pbtxt, 1/<filename>}, replaced whole so Triton never polls a half-written model."""
    final = repo / name
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=repo))
    try:
        (staging / "1").mkdir()
        shutil.copyfile(artefact, staging / "1" / filename)
        (staging / "config.pbtxt").write_text(config_text(config))
        if final.exists():
            old = repo / f".{name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return RepoModel(name, config.platform, final)  # type: ignore[attr-defined]


def write_repository(
    repo: Path,
    onnx_model: OnnxModel,
    info: ModelInfo,
    model_name: str,
    max_batch: int,
    instances: int = DEFAULT_INSTANCES,
    kind: str = "KIND_GPU",
    plan: Path | None = None,
) -> list[RepoModel]:
    """Write the ONNX Runtime model (and the TensorRT one when `plan` is given) into `repo`."""
    if onnx_model.model_id != info.model_id:
        raise ValueError(f"the ONNX export is of {onnx_model.model_id}, not {info.model_id}")
    repo.mkdir(parents=True, exist_ok=True)
    onnx_config = model_config(model_name, "onnxruntime_onnx", info, max_batch, instances, kind)
    written = [_write_model(repo, model_name, onnx_config, onnx_model.path, "model.onnx")]
    if plan is not None:
        # A plan runs only on the GPU model and TensorRT version it was built with: Triton's must match.
        trt_config = model_config(f"{model_name}-tensorrt", "tensorrt_plan", info, max_batch, instances, "KIND_GPU")
        written.append(_write_model(repo, f"{model_name}-tensorrt", trt_config, plan, "model.plan"))
    return written
