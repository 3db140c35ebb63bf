"""Series files -> AnomalyResult, through any Denoiser: load, mask, model grid, ensemble, threshold, map back.

`detect` is the model-grid core (arrays in, arrays out) that the evaluation calls without DICOM; `run_pipeline`
wraps it with loading, masking and the mapping back to the source grid. Every switch the ablations need is a
field of PipelineSettings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from inference.anomaly_result import AnomalyResult
from inference.denoiser import Denoiser
from inference.diffusion import LinearSchedule, Sampler, strided_timesteps
from inference.ensemble import ensemble_reconstruct
from inference.lung_refiner import LungRefiner
from inference.lungmask import anatomy_mask
from inference.postprocess import detect_anomalies, median_filtered
from inference.simplex import NoiseSource
from inference.unet import ModelInfo
from inference.volume import (
    fill_left_out_slices,
    from_model_grid,
    load_series,
    mask_from_grid,
    to_model_grid_with_mask,
)

Progress = Callable[[str, float], None]
SegmentPolarity = Literal["both", "denser"]


SEGMENTATION_SIZES = ("median_size", "score_median_size", "opening", "closing", "min_component_size")  # pixels


def segmentation_sizes(sizes: object) -> dict[str, int]:
    """A model's `segmentation` metadata (or an override) checked: known keys, whole numbers >= 0, an odd median
    (1 = off). ValueError names what is wrong."""
    if not isinstance(sizes, dict):
        raise ValueError(f"segmentation sizes must be a table, not {sizes!r}")
    unknown = sorted(set(sizes) - set(SEGMENTATION_SIZES))
    if unknown:
        raise ValueError(f"unknown segmentation sizes {unknown}; known: {', '.join(SEGMENTATION_SIZES)}")
    checked: dict[str, int] = {}
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"segmentation {key} must be a whole number >= 0, not {value!r}")
        checked[key] = value
    for key in ("median_size", "score_median_size"):
        if checked.get(key, 1) % 2 == 0:
            raise ValueError(f"segmentation {key} must be odd (1 = off), not {checked[key]}")
    return checked


@dataclass
class PipelineSettings:
    """Everything that changes what the pipeline computes (node config maps onto it; evaluation ablates it)."""

    # Radiographs start shallow: the radiograph model's error on healthy lung fields grows with depth faster than
    # what it heals of a lesion (validation radiographs, docs/method.md "Radiograph depth").
    t_start: dict[str, int] = field(default_factory=lambda: {"CT": 250, "CR": 25, "DX": 25})
    # A mixed-depth ensemble for these modalities: every other member (1, 3, ...) starts this deep instead.
    deep_t_start: dict[str, int] = field(default_factory=dict)
    # visited timesteps = U-Net calls per member (ignored when stride is set); 5 scores as 10 on validation phantoms
    # with the shipped CT model and the radiograph model (docs/method.md) at half the time
    steps: int = 5
    stride: int | None = None  # visit every stride-th timestep instead
    ensemble: int = 7
    threshold_lambda: dict[str, float] = field(default_factory=lambda: {"CT": 8.0, "CR": 3.0, "DX": 3.0})
    # What the segmentation outlines: "denser" = only voxels denser than the reconstruction (opacities; CT Dice
    # 0.30 -> 0.35 on validation phantoms, docs/method.md), "both" = any large error. The scores use both always.
    segment_polarity: dict[str, SegmentPolarity] = field(
        default_factory=lambda: {"CT": "denser", "CR": "both", "DX": "both"}
    )
    max_batch: int | None = None  # cap below the denoiser's own max_batch (None: the denoiser's)
    seed: int = 0
    sampler: Sampler = "ddim"
    noise: Literal["simplex", "gaussian"] = "simplex"
    octaves: int = 6
    base_frequency: float = 2**-6
    persistence: float = 0.8
    use_mask_condition: bool = True  # False: the condition channel is zeros (ablation / unconditioned model)
    adaptive_threshold: bool = True  # False: fixed_threshold instead of mean + lambda * std outside the mask
    fixed_threshold: float = 0.05
    restrict_to_mask: bool = True
    median_size: int = 3  # per-slice median filter of the error map, model-grid pixels (1: off)
    score_median_size: int = 5  # the same for the map the slice scores pool (postprocess.py)
    opening: int = 1
    closing: int = 1
    min_component_size: int = 4  # voxels on the model grid
    clip: bool = True
    schedule_T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    min_ct_slices: int = 3  # fewer usable CT slices (after leaving damaged ones out): the series is not analysed

    def t_start_for(self, modality: str) -> int:
        return int(self.t_start.get(modality, self.t_start.get("CT", 250)))

    def lambda_for(self, modality: str) -> float:
        return float(self.threshold_lambda.get(modality, 3.0))

    def polarity_for(self, modality: str) -> SegmentPolarity:
        return self.segment_polarity.get(modality, "both")

    def for_model(self, training: dict[str, object]) -> PipelineSettings:
        """These settings with the simplex spectrum the model was trained with (its metadata's `noise_spectrum`)
        and the pixel sizes of the maps' filters and cleaning chosen for its grid (its metadata's `segmentation`,
        if any).

        A model predicts the noise it saw in training, so the spectrum belongs to the model, not the site; a model
        without the key was trained with the defaults. The median filter, opening / closing and minimum component
        are in model-grid pixels, so what suits a 64 grid erases a 96 grid's thin findings (docs/method.md): a
        model chosen with other sizes carries them."""
        settings = self.with_segmentation(segmentation_sizes(training.get("segmentation", {})))
        spectrum = training.get("noise_spectrum")
        if not isinstance(spectrum, dict):
            return settings
        return replace(
            settings,
            octaves=int(spectrum.get("octaves", self.octaves)),
            base_frequency=float(spectrum.get("base_frequency", self.base_frequency)),
            persistence=float(spectrum.get("persistence", self.persistence)),
        )

    def with_segmentation(self, sizes: dict[str, int]) -> PipelineSettings:
        """These settings with some of SEGMENTATION_SIZES replaced (checked by `segmentation_sizes`)."""
        checked = segmentation_sizes(sizes)
        return replace(
            self,
            median_size=checked.get("median_size", self.median_size),
            score_median_size=checked.get("score_median_size", self.score_median_size),
            opening=checked.get("opening", self.opening),
            closing=checked.get("closing", self.closing),
            min_component_size=checked.get("min_component_size", self.min_component_size),
        )

    def noise_source(self) -> NoiseSource:
        return NoiseSource(self.noise, self.octaves, self.base_frequency, self.persistence)

    def schedule(self) -> LinearSchedule:
        return LinearSchedule(self.schedule_T, self.beta_start, self.beta_end)

    def timesteps(self, modality: str) -> list[int]:
        t_start = self.t_start_for(modality)
        if t_start >= self.schedule_T:
            raise ValueError(f"t_start {t_start} for {modality} must be below the schedule's T = {self.schedule_T}")
        return strided_timesteps(t_start, steps=self.steps, stride=self.stride)

    def deeper_timesteps(self, modality: str) -> list[list[int]]:
        """The mixed-depth ensemble's second schedule, or none ([]) when the modality has no deep start."""
        deep = self.deep_t_start.get(modality)
        if deep is None:
            return []
        if not self.t_start_for(modality) < deep < self.schedule_T:
            raise ValueError(f"deep t_start {deep} for {modality} must lie between t_start and T = {self.schedule_T}")
        return [strided_timesteps(deep, steps=self.steps, stride=self.stride)]


@dataclass
class ModelGridDetection:
    """detect()'s output on the model grid, (Z, S, S) arrays."""

    reconstruction: np.ndarray
    anomaly_map: np.ndarray
    uncertainty_map: np.ndarray
    segmentation: np.ndarray
    threshold: float
    slice_scores: np.ndarray
    study_score: float
    anomalous_fraction: float
    timings: dict[str, float]


class _CappedDenoiser:
    """The same denoiser with a lower max_batch (settings.max_batch), without touching the engine."""

    def __init__(self, inner: Denoiser, max_batch: int) -> None:
        self.inner = inner
        self.name, self.device, self.dtype, self.model_id = inner.name, inner.device, inner.dtype, inner.model_id
        self.max_batch = max_batch

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.inner(x_t, cond, t)


def model_fit_problems(training: dict[str, object], settings: PipelineSettings) -> list[str]:
    """Where the settings would run a model outside what it was trained for (its `training` metadata): other
    noise, a condition it never saw (or none where it expects one), or a start deeper than its training reached.
    Keys the metadata lacks are not checked."""
    problems = []
    noise = training.get("noise")
    if noise is not None and noise != settings.noise:
        problems.append(f"it was trained with {noise} noise, the settings use {settings.noise}")
    conditioned = training.get("conditioned")
    if conditioned is not None and bool(conditioned) != settings.use_mask_condition:
        trained = "with" if conditioned else "without"
        used = "with" if settings.use_mask_condition else "without"
        problems.append(f"it was trained {trained} the anatomy-mask condition, the settings run it {used}")
    t_max = training.get("t_max")
    if isinstance(t_max, int | float):
        deep = {m: t for m, t in (settings.t_start | settings.deep_t_start).items() if t > t_max}
        if deep:
            problems.append(f"it was trained on timesteps up to {int(t_max)}, t_start asks for {deep}")
    return problems


def segment_keep(
    settings: PipelineSettings, modality: str, image: np.ndarray, reconstruction: np.ndarray
) -> np.ndarray | None:
    """The voxels the segmentation may hold under the modality's `segment_polarity` (None: any)."""
    return image > reconstruction if settings.polarity_for(modality) == "denser" else None


def detect(
    volume_norm: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    denoiser: Denoiser,
    settings: PipelineSettings,
    modality: str = "CT",
    progress: Progress | None = None,
) -> ModelGridDetection:
    """Anomaly detection on model-grid arrays: volume_norm (Z, S, S) in [-1, 1], mask (Z, S, S) bool."""
    timings: dict[str, float] = {}
    x0 = torch.as_tensor(np.asarray(volume_norm, dtype=np.float32))
    mask_np = np.asarray(mask, dtype=bool)
    if x0.ndim != 3 or x0.shape != mask_np.shape:
        raise ValueError(f"volume {tuple(x0.shape)} and mask {mask_np.shape} must both be (Z, H, W)")
    cond = torch.from_numpy(mask_np.astype(np.float32)) if settings.use_mask_condition else torch.zeros_like(x0)
    if settings.max_batch is not None and settings.max_batch < denoiser.max_batch:
        denoiser = _CappedDenoiser(denoiser, settings.max_batch)

    start = time.perf_counter()
    ens = ensemble_reconstruct(
        x0,
        cond,
        denoiser,
        settings.schedule(),
        settings.timesteps(modality),
        members=settings.ensemble,
        sampler=settings.sampler,
        noise=settings.noise_source(),
        seed=settings.seed,
        clip=settings.clip,
        progress=(lambda f: progress("reconstruct", f)) if progress else None,
        deeper=settings.deeper_timesteps(modality),
    )
    timings["reconstruct"] = time.perf_counter() - start

    start = time.perf_counter()
    squared = ens.anomaly_map.numpy()
    error = median_filtered(squared, settings.median_size)
    same = settings.score_median_size == settings.median_size
    scored = error if same else median_filtered(squared, settings.score_median_size)
    det = detect_anomalies(
        error,
        mask_np,
        settings.lambda_for(modality),
        adaptive_threshold=settings.adaptive_threshold,
        fixed_threshold=settings.fixed_threshold,
        restrict_to_mask=settings.restrict_to_mask,
        opening=settings.opening,
        closing=settings.closing,
        min_component_size=settings.min_component_size,
        score_map=scored,
        keep=segment_keep(settings, modality, x0.numpy(), ens.mean.numpy()),
    )
    timings["postprocess"] = time.perf_counter() - start
    return ModelGridDetection(
        reconstruction=ens.mean.numpy(),
        anomaly_map=error,
        uncertainty_map=ens.std.numpy(),
        segmentation=det.segmentation,
        threshold=det.threshold,
        slice_scores=det.slice_scores,
        study_score=det.study_score,
        anomalous_fraction=det.anomalous_fraction,
        timings=timings,
    )


def run_pipeline(
    files: Sequence[Path],
    denoiser: Denoiser,
    model_info: ModelInfo,
    settings: PipelineSettings,
    progress: Progress | None = None,
    lung_refiner: LungRefiner | None = None,
) -> AnomalyResult:
    """One series' files -> AnomalyResult on the source grid (slice k <-> source_sop_instance_uids[k]);
    `lung_refiner` refines a CT series' lung mask (`inference.lung_refiner`)."""

    def report(stage: str, fraction: float) -> None:
        if progress is not None:
            progress(stage, fraction)

    settings = settings.for_model(model_info.training)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    report("load", 0.0)
    volume = load_series(files, min_ct_slices=settings.min_ct_slices)
    timings["load"] = time.perf_counter() - start
    # Left-out slices leave gaps: the analysis runs on the regular slice grid with each gap interpolated (the 3D
    # lung mask and component sizes assume evenly spaced slices) and reports only the real slices.
    real = volume.slots
    if real is not None:
        volume.pixels = fill_left_out_slices(volume.pixels, real)

    start = time.perf_counter()
    report("mask", 0.0)
    mask = anatomy_mask(
        volume.pixels, volume.modality, volume.pixel_spacing, volume.normal, volume.slice_spacing, lung_refiner
    )
    timings["mask"] = time.perf_counter() - start

    start = time.perf_counter()
    # consume: the source intensities are not needed again, so their buffer is normalised in place and released
    grid, grid_mask, mapping = to_model_grid_with_mask(volume, mask, model_info.config.image_size, consume=True)
    timings["resample"] = time.perf_counter() - start

    det = detect(grid, grid_mask, denoiser, settings, volume.modality, progress=report)
    timings.update(det.timings)

    start = time.perf_counter()
    # Interpolation can undershoot zero; clamp in place (np.clip would copy 80 x 512 x 512 floats twice).
    anomaly = from_model_grid(det.anomaly_map, mapping)
    np.maximum(anomaly, 0.0, out=anomaly)
    uncertainty = from_model_grid(det.uncertainty_map, mapping)
    np.maximum(uncertainty, 0.0, out=uncertainty)
    segmentation = mask_from_grid(det.segmentation, mapping)
    if settings.restrict_to_mask:
        segmentation &= mask
    slice_scores, study_score, anomalous_fraction = det.slice_scores, det.study_score, det.anomalous_fraction
    if real is not None:  # back to the real slices: the interpolated ones are never reported or scored
        anomaly, uncertainty, segmentation, mask = anomaly[real], uncertainty[real], segmentation[real], mask[real]
        slice_scores = slice_scores[real]
        study_score = float(slice_scores.max()) if slice_scores.size else 0.0
        in_mask = int(grid_mask[real].sum())
        anomalous_fraction = float(det.segmentation[real].sum() / in_mask) if in_mask else 0.0
    timings["map_back"] = time.perf_counter() - start
    report("done", 1.0)

    inside = segmentation if segmentation.any() else mask
    mean_uncertainty = float(uncertainty[inside].mean()) if inside.any() else 0.0
    modality = volume.modality
    recorded = {
        **asdict(settings),
        "t_start": settings.t_start_for(modality),
        "deep_t_start": settings.deep_t_start.get(modality),
        "threshold_lambda": settings.lambda_for(modality),
        "segment_polarity": settings.polarity_for(modality),
        "timesteps": settings.timesteps(modality),
        "engine": denoiser.name,
        "lung_refiner": lung_refiner.model_id if lung_refiner is not None and modality == "CT" else "",
    }
    return AnomalyResult(
        model_id=model_info.model_id,
        modality=modality,
        series_instance_uid=volume.series_instance_uid,
        source_sop_instance_uids=list(volume.sop_instance_uids),
        anatomy_mask=mask,
        anomaly_map=anomaly,  # float32 already (from_model_grid): no 80 MB copies
        uncertainty_map=uncertainty,
        segmentation=segmentation,
        threshold=det.threshold,
        slice_scores=slice_scores.astype(np.float32),
        study_score=study_score,
        anomalous_volume_mm3=float(segmentation.sum()) * volume.voxel_volume_mm3,
        mean_uncertainty=mean_uncertainty,
        pixel_spacing_mm=volume.pixel_spacing,
        slice_thickness_mm=volume.slice_thickness,
        timings=timings,
        settings=recorded,
        anomalous_fraction=anomalous_fraction,
        left_out=list(volume.left_out),
        source_headers=list(volume.headers),
        source_paths=list(volume.paths),
    )
