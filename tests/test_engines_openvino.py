"""OpenVINO backend (agreement with torch fp32, compiled-model cache), the accuracy guard and the probe cache."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from engines.onnx_export import OUTPUT_NAME, OnnxModel, cached_onnx
from engines.openvino_backend import OpenVinoDenoiser, openvino_precisions
from engines.probe import (
    REFERENCE,
    Candidate,
    cpu_candidates,
    guard_detection,
    guard_verdict,
    probe_cpu,
    probe_key,
    same_ranking,
)
from engines.select import Plan, build_denoiser, select
from engines.torch_backend import TorchDenoiser
from inference.hardware import cpu_info, parse_cpuinfo
from inference.unet import file_sha256
from tests.engine_models import random_batch, rel_error, saved_unet

no_bf16 = pytest.mark.skipif("bf16" not in openvino_precisions(), reason="this CPU has no bf16 units (OpenVINO)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    return saved_unet(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory: pytest.TempPathFactory) -> OnnxModel:
    model, info, _ = tiny
    return cached_onnx(model, info, tmp_path_factory.mktemp("onnx"), exporter="torchscript")


def test_openvino_fp32_agrees_with_torch_and_reuses_its_compiled_model(
    tiny, exported: OnnxModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, info, _ = tiny
    x, c, t = random_batch(7, 32)
    with torch.inference_mode():
        ref = model(x, c, t)
    with caplog.at_level(logging.INFO, logger="engines.openvino_backend"):
        first = OpenVinoDenoiser(exported, tmp_path, "fp32", max_batch=8, threads=2)
    assert any("compiling" in r.message for r in caplog.records)
    assert first.name == "openvino-cpu-fp32" and first.model_id == info.model_id and first.dtype == torch.float32
    out = first(x, c, t)  # 7 images on 2 streams: chunks of 4 and 3, reassembled in order
    assert out.dtype == torch.float32 and rel_error(out, ref) < 1e-4
    blobs = sorted(tmp_path.glob("*.blob"))
    assert len(blobs) == 1 and blobs[0].with_suffix(".json").is_file()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="engines.openvino_backend"):
        again = OpenVinoDenoiser(exported, tmp_path, "fp32", max_batch=8, threads=2)
    assert not any("compiling" in r.message for r in caplog.records)  # imported from the cache
    assert rel_error(again(x, c, t), ref) < 1e-4
    # Another layout (one stream) is another compiled model; a corrupt blob is compiled again.
    OpenVinoDenoiser(exported, tmp_path, "fp32", max_batch=8, threads=1)
    assert len(list(tmp_path.glob("*.blob"))) == 2
    blobs[0].write_bytes(b"not a compiled model")
    with caplog.at_level(logging.WARNING, logger="engines.openvino_backend"):
        rebuilt = OpenVinoDenoiser(exported, tmp_path, "fp32", max_batch=8, threads=2)
    assert any("does not import" in r.message for r in caplog.records)
    assert rel_error(rebuilt(x, c, t), ref) < 1e-4


@no_bf16
def test_openvino_bf16_is_really_bf16_and_close_to_fp32(tiny, exported: OnnxModel, tmp_path: Path) -> None:
    model, _, _ = tiny
    x, c, t = random_batch(8, 32)
    with torch.inference_mode():
        ref = model(x, c, t)
    low = OpenVinoDenoiser(exported, tmp_path, "bf16", max_batch=8, threads=2)
    assert low.dtype == torch.bfloat16 and low.name == "openvino-cpu-bf16"
    assert 0 < rel_error(low(x, c, t), ref) < 1e-2


def test_openvino_rejects_what_it_cannot_run(exported: OnnxModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="runs fp32 or bf16"):
        OpenVinoDenoiser(exported, tmp_path, "fp16")
    if "bf16" not in openvino_precisions():
        with pytest.raises(RuntimeError, match="cannot run bf16 on this CPU"):
            OpenVinoDenoiser(exported, tmp_path, "bf16")


def test_cpu_flags_are_parsed_and_candidates_follow_them() -> None:
    amx = parse_cpuinfo("model name\t: Intel Xeon\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_int8\n")
    assert amx.model == "Intel Xeon" and amx.bf16_units and amx.int8_units
    assert amx.speed_flags == ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"]
    old = parse_cpuinfo("model name : Old CPU\nflags : fpu sse2 avx2\n")
    assert not old.bf16_units and old.speed_flags == ["avx2"]
    names = [c.name for c in cpu_candidates()]
    assert names[0] == "torch-fp32" and "onnxruntime-fp32" in names and "openvino-fp32" in names
    assert ("torch-bf16" in names) == cpu_info().bf16_units
    assert ("openvino-bf16" in names) == ("bf16" in openvino_precisions())
    assert [c.name for c in cpu_candidates(precision="fp32")] == ["torch-fp32", "onnxruntime-fp32", "openvino-fp32"]
    assert [c.name for c in cpu_candidates(backend="openvino", precision="fp32")] == ["openvino-fp32"]


def perturbed_onnx(source: OnnxModel, directory: Path) -> OnnxModel:
    """The same export with eps += 0.2 * cond appended to the graph: a real model that is wrong inside the mask."""
    graph_model = onnx.load(str(source.path))
    graph = graph_model.graph
    (out,) = graph.output
    raw = "eps_unperturbed"
    for node in graph.node:
        node.output[:] = [raw if o == OUTPUT_NAME else o for o in node.output]
    graph.initializer.append(helper.make_tensor("perturb_scale", TensorProto.FLOAT, [], [0.2]))
    graph.node.extend(
        [
            helper.make_node("Mul", ["cond", "perturb_scale"], ["perturb"]),
            helper.make_node("Add", [raw, "perturb"], [OUTPUT_NAME]),
        ]
    )
    path = directory / "perturbed.onnx"
    onnx.save(graph_model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return replace(source, path=path, sha256=file_sha256(path))


@pytest.mark.slow
def test_guard_passes_real_backends_and_rejects_a_perturbed_one(tiny, exported: OnnxModel, tmp_path: Path) -> None:
    model, info, _ = tiny
    size = info.config.image_size
    # One thread: torch eager on a shared 2-core machine waits at every operator's barrier with two.
    ref = guard_detection(TorchDenoiser(model, info, max_batch=28, threads=1), size)
    assert ref.slice_scores.size == 8 and np.all(ref.slice_scores > 0)
    assert guard_verdict(ref, ref).passed

    good = OpenVinoDenoiser(exported, tmp_path, "fp32", max_batch=28, threads=1)
    assert guard_verdict(ref, guard_detection(good, size)).passed

    broken_model = perturbed_onnx(exported, tmp_path)
    broken = OpenVinoDenoiser(broken_model, tmp_path, "fp32", max_batch=28, threads=1)
    verdict = guard_verdict(ref, guard_detection(broken, size))
    assert not verdict.passed and "FAIL" in verdict.describe(), verdict

    # In a probe (precision forced, so torch fp32 is only the reference): the broken model is never chosen.
    with pytest.raises(RuntimeError, match="no candidate passed the accuracy guard.*FAIL"):
        probe_cpu(
            info,
            [Candidate("openvino", "fp32")],
            lambda c: broken if c.backend == "openvino" else TorchDenoiser(model, info, max_batch=28, threads=1),
            max_batch=28,
            threads=1,
            cache_dir=None,
        )


def test_ranking_ignores_swaps_within_the_tolerance() -> None:
    ref = np.array([1.0, 1.005, 3.0])
    assert same_ranking(ref, np.array([1.004, 1.001, 3.01]))  # the first two are within 2 %: may swap
    assert not same_ranking(ref, np.array([1.0, 1.005, 0.9]))


@pytest.mark.slow
def test_probe_is_cached_per_machine_and_model(tiny, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, info, _ = tiny
    cache = tmp_path / "engines"

    def choose(**kw: object):
        return select(
            (model, info), device="cpu", precision="fp32", cache_dir=cache, exporter="torchscript", threads=1, **kw
        )

    with caplog.at_level(logging.INFO, logger="engines.select"):
        first = choose(max_batch=8)
    assert first.probe is not None and "cached" not in first.reason
    assert [r.candidate for r in first.probe.rows if r.chosen] == [first.probe.chosen]
    assert sorted(r.candidate for r in first.probe.rows) == ["onnxruntime-fp32", "openvino-fp32", "torch-fp32"]
    assert first.denoiser.name.startswith(first.plan.backend) and first.plan.precision == "fp32"
    assert any("accuracy guard vs torch-fp32" in r.message for r in caplog.records)  # the table is logged
    (stored,) = cache.glob("probe-*.json")
    written = stored.stat().st_mtime_ns

    second = choose(max_batch=8)  # a restart: same model, machine, versions, settings
    assert "cached probe" in second.reason and second.probe == first.probe
    assert second.denoiser.name == first.denoiser.name
    assert stored.stat().st_mtime_ns == written

    third = choose(max_batch=4)  # a changed key probes again
    assert "cached" not in third.reason and len(list(cache.glob("probe-*.json"))) == 2
    forced = choose(max_batch=8, probe="force")
    assert "cached" not in forced.reason and stored.stat().st_mtime_ns != written

    key = probe_key(info, cpu_candidates(precision="fp32"), 8, 1)
    assert {"model_sha256", "cpu_model", "cpu_flags", "torch", "onnxruntime", "openvino"} <= set(key)
    other_machine = {**key, "cpu_flags": [*key["cpu_flags"], "amx_bf16"]}
    assert other_machine != key


def test_a_forced_backend_skips_the_probe(tiny, tmp_path: Path) -> None:
    model, info, _ = tiny
    chosen = select((model, info), backend="openvino", max_batch=4, cache_dir=tmp_path, exporter="torchscript")
    assert chosen.probe is None and chosen.denoiser.name == "openvino-cpu-fp32"
    assert "[inference] backend = 'openvino'" in chosen.reason
    assert not list(tmp_path.glob("probe-*.json"))
    plan = Plan("openvino", "cpu", "fp32", False, "")
    built = build_denoiser(plan, model, info, 4, tmp_path, threads=1, exporter="torchscript")
    x, c, t = random_batch(4, 32)
    with torch.inference_mode():
        assert rel_error(built(x, c, t), model(x, c, t)) < 1e-4
    assert REFERENCE.name == "torch-fp32"
