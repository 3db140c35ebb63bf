"""CUDA paths (Show 3): skipped on machines without a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from engines.torch_backend import TorchDenoiser
from tests.engine_models import random_batch, rel_error, saved_unet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return saved_unet(tmp_path_factory.mktemp("weights"))


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_graphs_low_precision_close_to_eager_fp32(tiny, precision: str) -> None:
    model, info, _ = tiny
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("GPU without bf16")
    eager = TorchDenoiser(model, info, device="cuda", precision="fp32", max_batch=28)
    graphs = TorchDenoiser(
        model, info, device="cuda", precision=precision, channels_last=True, cuda_graphs=True, max_batch=28
    )
    for n in (1, 7, 28, 7):  # the second 7 replays the captured graph
        x, c, t = (v.cuda() for v in random_batch(n, 32, seed=n))
        ref = eager(x, c, t)
        out = graphs(x, c, t)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert rel_error(out, ref) <= 1e-2, (precision, n)
    assert len(graphs._graphs) == 3


def test_graph_outputs_are_not_overwritten_by_the_next_call(tiny) -> None:
    model, info, _ = tiny
    graphs = TorchDenoiser(model, info, device="cuda", cuda_graphs=True, max_batch=4)
    a = [v.cuda() for v in random_batch(4, 32, seed=1)]
    b = [v.cuda() for v in random_batch(4, 32, seed=2)]
    first = graphs(*a)
    kept = first.clone()
    graphs(*b)
    assert torch.equal(first, kept)


def test_onnxruntime_cuda_io_binding(tiny, tmp_path) -> None:
    from engines.onnx_export import export_onnx
    from engines.ort_backend import OrtDenoiser, ort_providers

    if "CUDAExecutionProvider" not in ort_providers():
        pytest.skip("onnxruntime without the CUDA execution provider")
    model, info, _ = tiny
    ort = OrtDenoiser(export_onnx(model, info, tmp_path / "m.onnx"), device="cuda", max_batch=7)
    x, c, t = random_batch(7, 32)
    with torch.inference_mode():
        ref = model(x, c, t)
    out = ort(x.cuda(), c.cuda(), t.cuda())
    assert out.device.type == "cuda" and rel_error(out, ref) < 1e-3


def test_the_default_on_a_gpu_is_torch_fp16_with_cuda_graphs() -> None:
    """fp16, not bf16: as fast on an H200 and 7x closer to fp32 (benchmarks/RESULTS.md, the GPU session)."""
    from engines.select import plan_backend

    plan = plan_backend()
    if plan.backend == "tensorrt":
        assert plan.precision == "fp16"
        return
    assert (plan.backend, plan.device, plan.precision, plan.cuda_graphs) == ("torch", "cuda", "fp16", True)
