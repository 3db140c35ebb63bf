"""The worker's model: loaded and checked once per process, pinned to its GPU, run with an OOM retry.

Kept apart from the job runner so that what a worker refuses to run (a model that does not fit the
settings, or the series' modality) has one place, checked before any job is claimed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from node.config import InferenceSettings, Settings

if TYPE_CHECKING:
    from inference.anomaly_result import AnomalyResult
    from inference.denoiser import Denoiser
    from inference.lung_refiner import LungRefiner
    from inference.pipeline import PipelineSettings
    from inference.unet import ModelInfo
    from node.models import ServingModel

log = logging.getLogger(__name__)


def pipeline_settings(inference: InferenceSettings, max_batch: int) -> PipelineSettings:
    """Map the operator's `[inference]` section onto the pipeline's settings."""
    from inference.pipeline import PipelineSettings

    return PipelineSettings(
        t_start=dict(inference.t_start),
        deep_t_start=dict(inference.deep_t_start),
        steps=inference.steps,
        ensemble=inference.ensemble,
        threshold_lambda=dict(inference.threshold_lambda),
        segment_polarity=dict(inference.segment_polarity),
        max_batch=max_batch,
        seed=inference.seed,
        min_ct_slices=inference.min_ct_slices,
    )


def effective_max_batch(inference: InferenceSettings) -> int:
    """Images per U-Net call: `[inference] max_batch`, or the default for the device the backend plan puts the U-Net
    on (a device it cannot plan, e.g. "cuda" without a GPU, is taken as asked: the selection then says why)."""
    from engines.select import BackendUnavailable, plan_backend

    if inference.max_batch is not None or inference.backend == "triton":
        return inference.batch_on("cpu")
    try:
        device = plan_backend(inference.device, inference.backend, inference.precision).device
    except BackendUnavailable:
        device = "cuda" if inference.device == "cuda" else "cpu"
    return inference.batch_on(device)


def load_lung_refiner(inference: InferenceSettings) -> LungRefiner | None:
    """The CT lung refiner `[inference] lung_refiner` names, or None ("off"); a missing or wrong file raises
    (FileNotFoundError, ValueError) so that the worker refuses to start rather than run without it."""
    from inference.lung_refiner import chosen_refiner

    return chosen_refiner(inference.lung_refiner)


def pin_worker_gpu(slot: int, device: str) -> int | None:
    """Make GPU `slot mod count` this process's current CUDA device, so `workers = <number of GPUs>` puts one
    worker on each GPU (every backend runs on the current device). None when the worker runs on the CPU."""
    if device == "cpu":
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    index = slot % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return index


class LoadedModel:
    """The worker process's models, one per modality ([inference] model table), each loaded once on first use
    (a worker's first job pays for it), and the modalities no configured model is trained for."""

    def __init__(self, settings: Settings) -> None:
        from node.models import ModelSet

        self.settings = settings
        self.models = ModelSet(settings)  # each model checked against its training before it serves
        self.max_batch = effective_max_batch(settings.inference)  # halved on each CUDA out-of-memory

    @functools.cached_property
    def lung_refiner(self) -> LungRefiner | None:
        """The CT lung refiner, loaded on first use (None when `[inference] lung_refiner = "off"`) and run by the
        engine chosen for it as for the diffusion model (`engines.refiner`: same device, backend and precision
        settings, its own accuracy guard and probe cache)."""
        from engines.refiner import refiner_selection

        refiner = load_lung_refiner(self.settings.inference)
        if refiner is None:
            return None
        inference = self.settings.inference
        selection = refiner_selection(
            refiner,
            device=inference.device,
            backend=inference.backend,
            precision=inference.precision,
            cache_dir=self.settings.data_dir / "engines",
        )
        return refiner.with_engine(selection.denoiser)

    def load(self) -> tuple[Denoiser, ModelInfo]:
        """Load every configured model that serves a modality; the first one is returned (the start-up log
        line). Refuses (ValueError) a model that does not fit [inference], or no model serving any modality."""
        from node.job_series import IMAGE_MODALITIES

        first = self.models.load_all()
        _ = self.lung_refiner  # a missing refiner stops the start, not the first CT study
        if not first:
            refusals = "; ".join(self.models.refusal(m) for m in IMAGE_MODALITIES)
            raise ValueError(f"no configured model is trained for any modality: {refusals}")
        return first[0].denoiser, first[0].info

    def for_modality(self, modality: str) -> ServingModel | None:
        """The model that analyses this modality, or None (see `refusal`)."""
        return self.models.for_modality(modality)

    def refusal(self, modality: str) -> str:
        """Why no configured model analyses this modality."""
        return self.models.refusal(modality)

    def analyse(self, paths: Sequence[Path], check: Callable[[], None], served: ServingModel) -> AnomalyResult:
        """Run the pipeline on one series' files with its modality's model; on GPU out-of-memory halve the batch
        and try again."""
        import torch

        from inference.pipeline import run_pipeline

        while True:
            settings = pipeline_settings(self.settings.inference, self.max_batch)
            try:
                return run_pipeline(  # the refiner applies to CT series only (anatomy_mask)
                    paths,
                    served.denoiser,
                    served.info,
                    settings,
                    progress=lambda *_: check(),
                    lung_refiner=self.lung_refiner,
                )
            except torch.cuda.OutOfMemoryError:
                if self.max_batch <= 1:
                    raise
                self.max_batch //= 2
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory: retrying with batches of %d", self.max_batch)
