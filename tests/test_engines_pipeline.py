"""Show 2: the pipeline gives the same masks and scores through every fp32 backend select.py can choose here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engines.select import BACKENDS, BackendUnavailable, build_denoiser, plan_backend
from inference.pipeline import PipelineSettings, run_pipeline
from tests.dicomgen import make_ct_series, write_datasets
from tests.engine_models import saved_unet

pytestmark = pytest.mark.slow  # the whole pipeline once per backend


def fp32_plans() -> list:
    """Every (backend, device) select.py would accept with precision fp32 on this machine."""
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    plans = []
    for device in devices:
        for backend in BACKENDS:
            try:
                plans.append(plan_backend(device=device, backend=backend, precision="fp32"))
            except BackendUnavailable:
                continue
    return plans


def test_masks_and_scores_agree_across_fp32_backends(tmp_path: Path) -> None:
    model, info, _ = saved_unet(tmp_path, seed=3)
    files = write_datasets(make_ct_series(4, 48, 48, seed=7), tmp_path / "ct")
    # An untrained model: a low threshold so the masks hold a real decision to agree on.
    settings = PipelineSettings(
        t_start={"CT": 200}, steps=3, ensemble=3, threshold_lambda={"CT": 2.0}, min_component_size=2, seed=11,
        segment_polarity={"CT": "both"},  # an untrained model's errors have no sign to keep to
    )  # fmt: skip
    results = {}
    for plan in fp32_plans():
        denoiser = build_denoiser(plan, model, info, max_batch=8, cache_dir=tmp_path / "engines")
        results[f"{plan.backend}-{plan.device} ({denoiser.name})"] = run_pipeline(files, denoiser, info, settings)
    assert any(k.startswith("torch-cpu") for k in results) and any(k.startswith("onnxruntime-cpu") for k in results)
    (ref_name, ref), *others = results.items()
    assert ref.segmentation.any() and not ref.segmentation.all()  # a real decision to agree on
    for name, got in others:
        assert got.model_id == ref.model_id
        assert np.array_equal(got.anatomy_mask, ref.anatomy_mask), name
        assert np.array_equal(got.segmentation, ref.segmentation), (name, ref_name)
        # Scores come from float sums in different kernels: equal to far better than any reported digit.
        np.testing.assert_allclose(got.slice_scores, ref.slice_scores, rtol=1e-4, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(got.study_score, ref.study_score, rtol=1e-4, err_msg=name)
        np.testing.assert_allclose(got.threshold, ref.threshold, rtol=1e-4, err_msg=name)
        assert got.anomalous_volume_mm3 == ref.anomalous_volume_mm3
