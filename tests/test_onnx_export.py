"""ONNX export (Show 1): checker-valid, dynamic batch, ONNX Runtime agrees with torch in fp32."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from engines.onnx_export import cached_onnx, check_onnx, export_onnx
from engines.ort_backend import OrtDenoiser
from inference.unet import ModelInfo
from tests.engine_models import random_batch, random_unet, rel_error, saved_unet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    model, info, _ = saved_unet(tmp_path_factory.mktemp("weights"))
    return model, info


# The dynamo export takes most of this file's time; the fast tier still runs one (test_engines, through select).
@pytest.fixture(scope="module", params=[pytest.param("dynamo", marks=pytest.mark.slow), "torchscript"])
def exported(request: pytest.FixtureRequest, tiny, tmp_path_factory: pytest.TempPathFactory):
    model, info = tiny
    out = tmp_path_factory.mktemp(f"onnx-{request.param}")
    return export_onnx(model, info, out / "tiny.onnx", exporter=request.param)


def test_export_is_checker_valid_with_a_dynamic_batch_and_normalization_ops(exported) -> None:
    check_onnx(exported.path)  # raises on an invalid model
    proto = onnx.load(str(exported.path))
    assert exported.opset >= 17
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == exported.opset
    ops = {node.op_type for node in proto.graph.node}
    # GroupNorm is a normalization op, not a hand-written mean/variance graph.
    assert "GroupNormalization" in ops if exported.exporter == "dynamo" else "InstanceNormalization" in ops
    assert "ReduceMean" not in ops
    inputs = {i.name: i.type.tensor_type.shape.dim for i in proto.graph.input}
    assert set(inputs) == {"x_t", "cond", "t"}
    for dims in inputs.values():
        assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch
    assert [d.dim_value for d in inputs["x_t"]][1:] == [1, 32, 32]
    assert exported.sidecar().is_file()


def test_onnxruntime_matches_torch_for_batches_1_7_28(exported, tiny) -> None:
    model, _ = tiny
    ort = OrtDenoiser(exported, max_batch=28)
    for n in (1, 7, 28):
        x, c, t = random_batch(n, 32, seed=n)
        with torch.inference_mode():
            ref = model(x, c, t)
        assert ref.abs().mean() > 0.1  # a real signal, not zeros
        out = ort(x, c, t)
        assert out.shape == (n, 1, 32, 32) and out.dtype == torch.float32
        assert rel_error(out, ref) < 1e-4, n


def test_micro_batches_give_the_whole_batch_result(exported) -> None:
    x, c, t = random_batch(9, 32)
    whole = OrtDenoiser(exported, max_batch=9)(x, c, t)
    split = OrtDenoiser(exported, max_batch=9, micro_batch=4)(x, c, t)
    assert rel_error(split, whole) < 1e-6


def test_concurrent_single_threaded_runs_give_the_whole_batch_result(exported, tiny) -> None:
    """What engines.select builds on a CPU: chunks on several threads, reassembled in order."""
    model, _ = tiny
    whole = OrtDenoiser(exported, max_batch=28)
    parallel = OrtDenoiser(exported, max_batch=28, threads=1, micro_batch=7, workers=2)
    assert "2 concurrent runs" in parallel.describe()
    for n in (1, 3, 7, 28):  # 1: no split; 3 and 7: fewer images than micro_batch x workers
        x, c, t = random_batch(n, 32, seed=n)
        with torch.inference_mode():
            ref = model(x, c, t)
        out = parallel(x, c, t)
        assert out.shape == (n, 1, 32, 32)
        assert rel_error(out, whole(x, c, t)) < 1e-6 and rel_error(out, ref) < 1e-4, n
    with pytest.raises(ValueError, match="workers must be >= 1"):
        OrtDenoiser(exported, workers=0)


def test_batch_limit_and_shape_errors_are_clear(exported) -> None:
    ort = OrtDenoiser(exported, max_batch=4)
    x, c, t = random_batch(5, 32)
    with pytest.raises(ValueError, match="max_batch"):
        ort(x, c, t)
    with pytest.raises(ValueError, match="cond must have"):
        ort(x[:2], c[:1], t[:2])


def test_dynamic_spatial_export_runs_other_sizes(tiny, tmp_path: Path) -> None:
    model, info = tiny
    onnx_model = export_onnx(model, info, tmp_path / "s.onnx", exporter="torchscript", dynamic_spatial=True)
    ort = OrtDenoiser(onnx_model)
    for size in (32, 48):
        x, c, t = random_batch(2, size)
        with torch.inference_mode():
            ref = model(x, c, t)
        assert rel_error(ort(x, c, t), ref) < 1e-4


def test_cache_reuses_the_export_and_replaces_a_corrupt_one(tiny, tmp_path: Path) -> None:
    model, info = tiny
    first = cached_onnx(model, info, tmp_path, exporter="torchscript")
    stamp = first.path.stat().st_mtime_ns
    again = cached_onnx(model, info, tmp_path, exporter="torchscript")
    assert again == first and first.path.stat().st_mtime_ns == stamp
    first.path.write_bytes(b"not onnx")
    repaired = cached_onnx(model, info, tmp_path, exporter="torchscript")
    assert repaired.sha256 == first.sha256  # same export, deterministic
    check_onnx(repaired.path)
    changed = ModelInfo(info.name, info.config, "0" * 64)
    other = cached_onnx(random_unet(seed=5), changed, tmp_path, exporter="torchscript")
    assert other.path != first.path  # different weights hash -> different cache entry


def test_export_does_not_touch_the_callers_model(tiny, tmp_path: Path) -> None:
    model, info = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, info, tmp_path / "m.onnx", exporter="torchscript")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_a_changed_unet_code_gets_a_new_export(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import engines.onnx_export

    model, info = tiny
    first = cached_onnx(model, info, tmp_path, exporter="torchscript")
    # an upgrade that changes the U-Net's forward pass but not the weights
    monkeypatch.setattr(engines.onnx_export, "graph_code_version", lambda: "other-code,2.13.0,1.23.2,0.7.2")
    second = cached_onnx(model, info, tmp_path, exporter="torchscript")
    assert second.path != first.path and first.path.is_file()
