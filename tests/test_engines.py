"""Torch backend, backend planning and selection on this (CPU) machine; GPU paths in test_engines_gpu.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from engines.base import batch_slices, check_inputs
from engines.openvino_backend import openvino_precisions
from engines.ort_backend import OrtDenoiser
from engines.probe import cpu_candidates
from engines.select import (
    CPU_MICRO_BATCH,
    BackendUnavailable,
    backend_statuses,
    build_denoiser,
    plan_backend,
    resolve_model_path,
    select,
    select_denoiser,
)
from engines.torch_backend import TorchDenoiser
from inference.denoiser import Denoiser
from inference.weights import bundled_model_path
from tests.engine_models import random_batch, rel_error, saved_unet

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a CUDA GPU")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return saved_unet(tmp_path_factory.mktemp("weights"))


def test_batch_slices_cover_the_batch_in_order() -> None:
    assert batch_slices(5, None) == [slice(0, 5)]
    assert batch_slices(5, 8) == [slice(0, 5)]
    assert batch_slices(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]


def test_check_inputs_names_the_problem() -> None:
    x, c, t = random_batch(3, 8)
    assert check_inputs(x, c, t, 3) == 3
    with pytest.raises(ValueError, match=r"x_t must be \(N, 1, H, W\)"):
        check_inputs(x[:, 0], c, t, 3)
    with pytest.raises(ValueError, match=r"t must be \(3,\)"):
        check_inputs(x, c, t[:2], 3)
    with pytest.raises(ValueError, match="outside 1..2"):
        check_inputs(x, c, t, 2)


def test_torch_cpu_fp32_is_the_model(tiny) -> None:
    model, info, _ = tiny
    denoiser = TorchDenoiser(model, info, max_batch=9)
    assert isinstance(denoiser, Denoiser)
    assert denoiser.model_id == info.model_id and denoiser.dtype == torch.float32
    x, c, t = random_batch(9, 32)
    with torch.inference_mode():
        ref = model(x, c, t)
    assert torch.equal(denoiser(x, c, t), ref)
    # Micro-batches and channels_last change the kernels' order of summation, not the result.
    chunked = TorchDenoiser(model, info, max_batch=9, micro_batch=4, channels_last=True)
    assert rel_error(chunked(x, c, t), ref) < 1e-5


def test_torch_backend_leaves_the_callers_model_alone(tiny) -> None:
    model, info, _ = tiny
    TorchDenoiser(model, info, channels_last=True)
    assert all(p.is_contiguous() for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_torch_backend_rejects_impossible_settings(tiny) -> None:
    model, info, _ = tiny
    with pytest.raises(ValueError, match="fp16 is not supported on the CPU"):
        TorchDenoiser(model, info, precision="fp16")
    with pytest.raises(ValueError, match="cuda_graphs needs device 'cuda'"):
        TorchDenoiser(model, info, cuda_graphs=True)
    with pytest.raises(ValueError, match="precision must be one of"):
        TorchDenoiser(model, info, precision="int8")


@no_cuda
def test_cuda_requests_fail_clearly_without_a_gpu(tiny) -> None:
    model, info, _ = tiny
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        TorchDenoiser(model, info, device="cuda")
    with pytest.raises(BackendUnavailable, match="device = 'cuda'"):
        plan_backend(device="cuda")
    with pytest.raises(BackendUnavailable, match="'tensorrt' is not available"):
        plan_backend(backend="tensorrt")


def test_statuses_list_every_backend() -> None:
    names = {s.name: s for s in backend_statuses()}
    assert set(names) == {
        "torch-cpu",
        "torch-cuda",
        "torch-cuda-graphs",
        "onnxruntime-cpu",
        "onnxruntime-cuda",
        "openvino-cpu",
        "tensorrt",
        "triton",
    }
    assert names["torch-cpu"].available and names["onnxruntime-cpu"].available
    assert names["triton"].available  # scripts/setup.sh installs the [triton] extra
    assert names["torch-cuda"].available == torch.cuda.is_available()


@no_cuda
def test_cpu_plans() -> None:
    auto = plan_backend()
    assert (auto.backend, auto.device, auto.precision, auto.cuda_graphs) == ("onnxruntime", "cpu", "fp32", False)
    assert "no CUDA GPU" in auto.reason
    forced = plan_backend(backend="torch")
    assert (forced.backend, forced.device) == ("torch", "cpu") and "[inference] backend = 'torch'" in forced.reason
    with pytest.raises(BackendUnavailable, match="fp16"):
        plan_backend(precision="fp16")
    bf16 = plan_backend(precision="bf16")  # auto backend without a probe: one that can run it
    native = "bf16" in openvino_precisions()
    assert (bf16.backend, bf16.precision) == ("openvino" if native else "torch", "bf16")
    if not native:
        with pytest.raises(BackendUnavailable, match="precision = 'bf16'.*AVX512-BF16 or AMX"):
            plan_backend(backend="openvino", precision="bf16")
    forced = plan_backend(backend="openvino")  # on the CPU, fp32 unless precision says otherwise
    assert (forced.backend, forced.device, forced.precision) == ("openvino", "cpu", "fp32")
    with pytest.raises(BackendUnavailable, match="onnxruntime backend runs the fp32"):
        plan_backend(backend="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="backend must be"):
        plan_backend(backend="tvm")


def test_model_paths_resolve_or_say_what_is_missing(tmp_path: Path, tiny) -> None:
    _, _, path = tiny
    assert resolve_model_path(str(path)) == path
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(tmp_path / "nope.safetensors")
    try:
        bundled = resolve_model_path("bundled")
    except FileNotFoundError as exc:
        assert "inference/weights" in str(exc)
    else:
        assert bundled == bundled_model_path() and bundled.suffix == ".safetensors"


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_select_builds_a_correct_denoiser(backend: str, tiny, tmp_path: Path) -> None:
    model, info, path = tiny
    denoiser = select_denoiser(
        path, backend=backend, device="cpu", max_batch=7, cache_dir=tmp_path, exporter="torchscript"
    )
    assert denoiser.model_id == info.model_id and denoiser.name.startswith(backend)
    x, c, t = random_batch(7, 32)
    with torch.inference_mode():
        ref = model(x, c, t)
    assert rel_error(denoiser(x, c, t), ref) < 1e-4


def test_cpu_onnxruntime_runs_one_single_threaded_run_per_thread(tiny, tmp_path: Path) -> None:
    model, info, _ = tiny
    plan = plan_backend(device="cpu", backend="onnxruntime")
    denoiser = build_denoiser(plan, model, info, max_batch=8, cache_dir=tmp_path, threads=2, exporter="torchscript")
    assert isinstance(denoiser, OrtDenoiser)
    assert (denoiser.workers, denoiser.threads, denoiser.micro_batch) == (2, 1, CPU_MICRO_BATCH)
    x, c, t = random_batch(8, 32)
    with torch.inference_mode():
        ref = model(x, c, t)
    assert rel_error(denoiser(x, c, t), ref) < 1e-4


@pytest.mark.slow
def test_probe_times_every_cpu_candidate_and_logs_why(tiny, caplog: pytest.LogCaptureFixture) -> None:
    model, info, _ = tiny
    with caplog.at_level(logging.INFO, logger="engines.select"):
        selection = select((model, info), device="cpu", max_batch=4, probe="force", exporter="torchscript", threads=1)
    assert selection.probe is not None and "accuracy guard" in selection.reason
    assert {r.candidate for r in selection.probe.rows} == {c.name for c in cpu_candidates()}
    assert selection.plan.backend in selection.denoiser.name and selection.probe.chosen in selection.reason
    assert any("U-Net backend" in r.message and selection.reason in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="probe must be one of"):
        select((model, info), probe="yes")


def test_torch_cpu_bf16_autocast_returns_float32_close_to_fp32(tiny) -> None:
    model, info, _ = tiny
    x, c, t = random_batch(3, 32)
    ref = TorchDenoiser(model, info)(x, c, t)
    low = TorchDenoiser(model, info, precision="bf16")
    out = low(x, c, t)
    assert low.dtype == torch.bfloat16 and low.name == "torch-cpu-bf16"
    assert out.dtype == torch.float32
    assert 0 < rel_error(out, ref) < 5e-2  # really computed in bf16, and still close
