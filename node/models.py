"""Which model serves which modality: `[inference] model` per modality, checked against what each model was
trained for (its metadata), loaded once per worker.

A model never analyses a modality it was not trained for: the bundled chest CT model is not run on a chest
radiograph just because `model = "bundled"` names it for every modality. Such a series is skipped (the worker
audits `series.skipped` with `refusal()`'s reason) and nothing is sent for it.

A model file without modality metadata (written before edgenode recorded it) is treated as CT-only, with a
warning in the log: every model edgenode trained before then was a CT model, so a site's own fine-tuned CT model
keeps working after an upgrade, and a radiograph is never analysed with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from node.config import Settings

if TYPE_CHECKING:
    from inference.denoiser import Denoiser
    from inference.unet import ModelInfo

log = logging.getLogger(__name__)

MODALITIES = ("CT", "CR", "DX")
LEGACY_MODALITIES = ("CT",)  # what a model without modality metadata is taken to be trained for


def trained_modalities(info: ModelInfo) -> tuple[str, ...]:
    """The modalities a model may analyse: its metadata's, or CT for a file that predates the metadata."""
    return info.modalities or LEGACY_MODALITIES


@dataclass(frozen=True)
class ServingModel:
    """A loaded model and its engine, as a worker runs it."""

    source: str  # as configured: "bundled" or a path
    info: ModelInfo
    denoiser: Denoiser


@dataclass(frozen=True)
class ModalityPlan:
    """What happens to a series of one modality: the model that analyses it, or why none does."""

    modality: str
    source: str
    info: ModelInfo | None  # None: the configured file could not be read
    refusal: str  # empty when `info` analyses it

    def line(self) -> str:
        """One line for `edgenode engine info`."""
        if self.info is None:
            return f"{self.modality}: {self.source}: {self.refusal}"
        trained = self.info.describe_training()
        if self.refusal:
            return f"{self.modality}: not analysed ({self.refusal}); received, audited as skipped, nothing sent"
        return f"{self.modality}: {self.info.model_id} (trained for {trained})"


def read_info(source: str) -> ModelInfo:
    from engines.select import resolve_model_path
    from inference.unet import read_model_info

    return read_model_info(resolve_model_path(source))


def plan_modality(modality: str, source: str, info: ModelInfo | None) -> ModalityPlan:
    if info is None:
        return ModalityPlan(modality, source, None, "model file missing or unreadable")
    if modality in trained_modalities(info):
        return ModalityPlan(modality, source, info, "")
    trained = ", ".join(trained_modalities(info))
    legacy = " (no modality metadata: taken as CT-only)" if not info.modalities else ""
    why = f"no model trained for {modality} (the configured model {info.model_id} is trained for {trained}{legacy})"
    return ModalityPlan(modality, source, info, why)


def modality_plans(settings: Settings) -> list[ModalityPlan]:
    """Per modality, the configured model and whether it analyses that modality (reads metadata only)."""
    infos: dict[str, ModelInfo | None] = {}
    for source in dict.fromkeys(settings.inference.model.values()):
        try:
            infos[source] = read_info(source)
        except (FileNotFoundError, ValueError, OSError):
            infos[source] = None
    sources = {m: settings.inference.model_for(m) for m in MODALITIES}
    return [plan_modality(m, source, infos[source]) for m, source in sources.items()]


class ModelSet:
    """The worker's models: each configured file that serves at least one modality, loaded (and its backend
    chosen) once, on first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loaded: dict[str, ServingModel] = {}
        self._plans: dict[str, ModalityPlan] | None = None

    def plans(self) -> dict[str, ModalityPlan]:
        """Per modality: which model analyses it, or why none does. Missing model files raise here (a worker
        without its configured models must not claim jobs)."""
        if self._plans is None:
            infos: dict[str, ModelInfo] = {}
            for source in dict.fromkeys(self.settings.inference.model.values()):
                infos[source] = read_info(source)
                if not infos[source].modalities:
                    log.warning(
                        "model %s has no modality metadata (written before edgenode recorded it): treated as trained "
                        "for CT only; CR/DX series are not analysed with it",
                        infos[source].model_id,
                    )
            self._plans = {
                m: plan_modality(m, self.settings.inference.model_for(m), infos[self.settings.inference.model_for(m)])
                for m in MODALITIES
            }
        return self._plans

    def load_all(self) -> list[ServingModel]:
        """Load every model that serves a modality (the first job, or the worker's start, pays for it)."""
        serving = [p for p in self.plans().values() if not p.refusal]
        for plan in serving:
            self._load(plan)
        return [self._loaded[s] for s in dict.fromkeys(p.source for p in serving)]

    def for_modality(self, modality: str) -> ServingModel | None:
        """The model that analyses this modality, or None (see `refusal`)."""
        plan = self.plans().get(modality)
        if plan is None or plan.refusal:
            return None
        return self._load(plan)

    def refusal(self, modality: str) -> str:
        plan = self.plans().get(modality)
        return plan.refusal if plan is not None else f"no model is configured for {modality}"

    def _load(self, plan: ModalityPlan) -> ServingModel:
        if plan.source in self._loaded:
            return self._loaded[plan.source]
        from engines.select import resolve_model_path, select_denoiser
        from inference.pipeline import model_fit_problems
        from node.inference_server import triton_endpoint
        from node.model_loader import effective_max_batch, pipeline_settings

        assert plan.info is not None
        info = plan.info
        inference = self.settings.inference
        served = [m for m, p in self.plans().items() if p.source == plan.source and not p.refusal]
        ps = pipeline_settings(inference, 1)
        ps = replace(
            ps,
            t_start={m: t for m, t in ps.t_start.items() if m in served},
            deep_t_start={m: t for m, t in ps.deep_t_start.items() if m in served},
        )
        problems = model_fit_problems(info.training, ps)
        if problems:  # it would run, and produce maps that mean nothing: refuse, saying why
            raise ValueError(f"model {info.model_id} does not fit [inference]: {'; '.join(problems)}")
        denoiser = select_denoiser(
            resolve_model_path(plan.source),
            device=inference.device,
            backend=inference.backend,
            precision=inference.precision,
            max_batch=effective_max_batch(inference),
            cache_dir=self.settings.data_dir / "engines",
            triton=triton_endpoint(self.settings) if inference.backend == "triton" else None,
        )
        log.info("model %s serves %s (trained for %s)", info.model_id, ", ".join(served), info.describe_training())
        self._loaded[plan.source] = ServingModel(plan.source, info, denoiser)
        return self._loaded[plan.source]
