"""The CT lung refiner on the engines: probed like the diffusion model, with its own guard (its lung mask must
match torch fp32's), cached apart from the diffusion model's probe, and loaded so by the node's worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engines.probe import Candidate, probe_cpu
from engines.refiner import (
    GUARD_NAME,
    RefinerGuard,
    cached_refiner_probe,
    guard_volume,
    refiner_backend,
    refiner_selection,
)
from engines.torch_backend import TorchDenoiser
from inference.lung_refiner import SLICES_PER_CALL, load_refiner
from inference.weights import lung_refiner_path
from node.config import NodeSettings, Settings
from node.model_loader import LoadedModel


class NegatedLogits:
    """A backend that computes the wrong thing: the refiner's logits with their sign flipped."""

    def __init__(self, inner: TorchDenoiser) -> None:
        self.inner = inner
        self.name, self.device, self.dtype, self.max_batch = "negated", inner.device, inner.dtype, inner.max_batch
        self.model_id = inner.model_id

    def __call__(self, x: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -self.inner(x, cond, t)


def test_the_guard_passes_the_reference_and_fails_a_backend_that_changes_the_lung() -> None:
    refiner = load_refiner(lung_refiner_path())
    guard = RefinerGuard(refiner)
    reference = TorchDenoiser(refiner.model, refiner.info, max_batch=SLICES_PER_CALL, threads=1)
    ref = guard.run(reference)
    hu, mask = guard_volume()
    assert ref.shape[0] == hu.shape[0] and ref.any() and mask.any()
    assert guard.verdict(ref, ref).passed and guard.summary(ref) == {"lung_voxels": int(ref.sum())}
    verdict = guard.verdict(ref, guard.run(NegatedLogits(reference)))
    assert not verdict.passed and verdict.describe().startswith("FAIL: lung mask Dice")
    with pytest.raises(RuntimeError, match="no candidate passed the accuracy guard.*lung mask Dice"):
        probe_cpu(  # precision forced (torch fp32 only the reference): the wrong backend is never chosen
            refiner.info,
            [Candidate("torch", "bf16")],
            lambda c: NegatedLogits(reference) if c.precision == "bf16" else reference,
            max_batch=SLICES_PER_CALL,
            threads=1,
            cache_dir=None,
            guard=guard,
        )


def test_triton_serves_the_diffusion_model_only_so_the_refiner_runs_here() -> None:
    assert refiner_backend("triton") == "auto" and refiner_backend("openvino") == "openvino"


@pytest.mark.slow
def test_the_refiner_is_probed_cached_apart_and_its_engine_gives_the_eager_mask(tmp_path: Path) -> None:
    refiner = load_refiner(lung_refiner_path())
    cache = tmp_path / "engines"
    first = refiner_selection(refiner, device="cpu", cache_dir=cache, threads=1)
    assert first.probe is not None and first.probe.key["guard"] == GUARD_NAME
    assert "accuracy guard" in first.reason
    assert {r.candidate for r in first.probe.rows} >= {"torch-fp32"}
    (stored,) = cache.glob(f"probe-{refiner.model_id}-*.json")
    second = refiner_selection(refiner, device="cpu", cache_dir=cache, threads=1)
    assert "cached probe" in second.reason and second.probe == first.probe
    assert cached_refiner_probe(refiner, "auto", "auto", cache, 1) == first.probe  # what engine info shows

    hu, mask = guard_volume()
    engined = refiner.with_engine(first.denoiser)
    eager, fast = refiner.refine(hu, mask), engined.refine(hu, mask)
    assert (fast >= mask).all()  # it only adds, on any engine
    added_eager, added_fast = eager & ~mask, fast & ~mask
    overlap = 2 * (added_eager & added_fast).sum() / max(1, added_eager.sum() + added_fast.sum())
    assert added_eager.sum() > 0 and overlap >= 0.98, overlap
    assert stored.is_file()


@pytest.mark.slow
def test_the_worker_runs_the_refiner_on_the_engine_chosen_for_it(tmp_path: Path) -> None:
    settings = Settings(node=NodeSettings(data_dir=tmp_path))
    loaded = LoadedModel(settings).lung_refiner
    assert loaded is not None and loaded.engine is not None
    assert loaded.model_id == load_refiner(lung_refiner_path()).model_id
    assert list((tmp_path / "engines").glob(f"probe-{loaded.model_id}-*.json"))  # probed and cached there
    hu, mask = guard_volume()
    assert np.array_equal(loaded.refine(hu, mask) | mask, loaded.refine(hu, mask))
    forced = refiner_selection(loaded, device="cpu", backend="torch", precision="fp32")
    assert forced.probe is None and forced.denoiser.name.startswith("torch")  # a forced backend: no probe


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_refiner_runs_there_and_gives_the_eager_mask() -> None:
    refiner = load_refiner(lung_refiner_path())
    selection = refiner_selection(refiner, device="auto")
    assert selection.denoiser.device.type == "cuda"
    hu, mask = guard_volume()
    eager, on_gpu = refiner.refine(hu, mask) & ~mask, refiner.with_engine(selection.denoiser).refine(hu, mask) & ~mask
    assert eager.sum() > 0 and 2 * (eager & on_gpu).sum() / (eager.sum() + on_gpu.sum()) >= 0.98
