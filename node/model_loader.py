"""The worker's model: loaded and checked once per process, pinned to its GPU, run with an OOM retry.

Kept apart from the job runner so that what a worker refuses to run (a model that does not fit the
settings, or the series' modality) has one place, checked before any job is claimed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from node.config import InferenceSettings, Settings
from node.inference_server import triton_endpoint

if TYPE_CHECKING:
    from inference.anomaly_result import AnomalyResult
    from inference.denoiser import Denoiser
    from inference.pipeline import PipelineSettings
    from inference.unet import ModelInfo

log = logging.getLogger(__name__)


def pipeline_settings(inference: InferenceSettings, max_batch: int) -> PipelineSettings:
    """Map the operator's `[inference]` section onto the pipeline's settings."""
    from inference.pipeline import PipelineSettings

    return PipelineSettings(
        t_start=dict(inference.t_start),
        steps=inference.steps,
        ensemble=inference.ensemble,
        threshold_lambda=dict(inference.threshold_lambda),
        max_batch=max_batch,
        seed=inference.seed,
        min_ct_slices=inference.min_ct_slices,
    )


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
    """The worker process's model and backend, loaded on first use (a worker's first job pays for it)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.denoiser: Denoiser | None = None
        self.info: ModelInfo | None = None
        self.max_batch = settings.inference.max_batch  # halved on each CUDA out-of-memory

    def load(self) -> tuple[Denoiser, ModelInfo]:
        """The denoiser and the model's identity; refuses (ValueError) a model that does not fit [inference]."""
        if self.denoiser is None or self.info is None:
            from engines.select import resolve_model_path, select_denoiser
            from inference.pipeline import model_fit_problems
            from inference.unet import read_model_info

            inference = self.settings.inference
            path = resolve_model_path(inference.model)
            info = read_model_info(path)
            problems = model_fit_problems(info.training, pipeline_settings(inference, 1))
            if problems:  # it would run, and produce maps that mean nothing: refuse, saying why
                raise ValueError(f"model {info.model_id} does not fit [inference]: {'; '.join(problems)}")
            self.info = info
            self.denoiser = select_denoiser(
                path,
                device=inference.device,
                backend=inference.backend,
                precision=inference.precision,
                max_batch=inference.max_batch,
                cache_dir=self.settings.data_dir / "engines",
                triton=triton_endpoint(self.settings) if inference.backend == "triton" else None,
            )
        return self.denoiser, self.info

    def analyse(self, paths: Sequence[Path], check: Callable[[], None]) -> AnomalyResult:
        """Run the pipeline on one series' files; on GPU out-of-memory halve the batch and try again."""
        import torch

        from inference.pipeline import run_pipeline

        denoiser, info = self.load()
        while True:
            settings = pipeline_settings(self.settings.inference, self.max_batch)
            try:
                return run_pipeline(paths, denoiser, info, settings, progress=lambda *_: check())
            except torch.cuda.OutOfMemoryError:
                if self.max_batch <= 1:
                    raise
                self.max_batch //= 2
                torch.cuda.empty_cache()
                log.warning("CUDA out of memory: retrying with batches of %d", self.max_batch)
