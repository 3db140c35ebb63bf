"""TensorRT: cache key and profile logic everywhere; building and running where tensorrt and a GPU exist."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from engines.tensorrt_backend import BatchProfile, EngineKey, batch_profile, engine_path, profile_shapes
from tests.engine_models import random_batch, rel_error, saved_unet


def _key(**changes: object) -> EngineKey:
    key = EngineKey(
        onnx_sha256="a" * 64,
        gpu_name="NVIDIA L4",
        compute_capability="8.9",
        tensorrt_version="10.3.0",
        precision="fp16",
        profile=BatchProfile(1, 28, 28),
        height=128,
        width=128,
    )
    return dataclasses.replace(key, **changes)


def test_batch_profile() -> None:
    assert batch_profile(28) == BatchProfile(1, 28, 28)
    assert batch_profile(28, 7) == BatchProfile(1, 7, 28)
    with pytest.raises(ValueError, match="outside 1..28"):
        batch_profile(28, 29)
    with pytest.raises(ValueError, match="max_batch"):
        batch_profile(0)


def test_profile_shapes_cover_every_input() -> None:
    shapes = profile_shapes(BatchProfile(1, 7, 28), 128, 96)
    assert shapes["x_t"] == ((1, 1, 128, 96), (7, 1, 128, 96), (28, 1, 128, 96))
    assert shapes["cond"] == shapes["x_t"]
    assert shapes["t"] == ((1,), (7,), (28,))


def test_cache_key_changes_with_everything_the_engine_depends_on(tmp_path: Path) -> None:
    base = _key()
    assert base.digest() == _key().digest()  # stable
    variants = [
        _key(onnx_sha256="b" * 64),
        _key(gpu_name="NVIDIA A100-SXM4-80GB"),
        _key(compute_capability="8.0"),
        _key(tensorrt_version="10.4.0"),
        _key(precision="fp32"),
        _key(profile=BatchProfile(1, 14, 28)),
        _key(height=256, width=256),
    ]
    digests = {v.digest() for v in variants}
    assert len(digests) == len(variants) and base.digest() not in digests
    path = engine_path(tmp_path / "engines", base)
    assert path.parent == tmp_path / "engines" and path.name == f"{base.digest()}.plan"


@pytest.fixture
def trt_env(tmp_path: Path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("TensorRT needs a CUDA GPU")
    from engines.onnx_export import export_onnx

    model, info, _ = saved_unet(tmp_path)
    return model, export_onnx(model, info, tmp_path / "tiny.onnx"), tmp_path / "engines"


def test_fp16_engine_matches_fp32_torch_and_is_cached(trt_env) -> None:
    from engines.tensorrt_backend import TensorRTDenoiser

    model, onnx_model, cache = trt_env
    engine = TensorRTDenoiser(onnx_model, cache, precision="fp16", max_batch=8)
    assert engine.path.is_file() and engine.path.with_suffix(".json").is_file()
    model = model.cuda()
    for n in (1, 5, 8):
        x, c, t = (v.cuda() for v in random_batch(n, 32, seed=n))
        with torch.inference_mode():
            ref = model(x, c, t)
        out = engine(x, c, t)
        assert out.device.type == "cuda" and out.dtype == torch.float32
        assert rel_error(out, ref) <= 1e-2
    stamp = engine.path.stat().st_mtime_ns
    again = TensorRTDenoiser(onnx_model, cache, precision="fp16", max_batch=8)
    assert again.path == engine.path and engine.path.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    other = TensorRTDenoiser(onnx_model, cache, precision="fp16", max_batch=4)
    assert other.path != engine.path  # a different profile is a different engine
