"""The entry point: every result object for one series' AnomalyResult, in the order they are sent."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from db.models import ResultKind
from inference.anomaly_result import AnomalyResult
from node.config import ResultsSettings
from node.results.common import ModelIdentity, SeriesResult
from node.results.sc import heatmap_images
from node.results.seg import binary_seg, fractional_segs
from node.results.sr import measurement_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResultObject:
    """One produced DICOM object and what it is."""

    kind: ResultKind
    dataset: Dataset


def write_results(
    result: AnomalyResult,
    sources: Sequence[Dataset],
    job_key: str,
    settings: ResultsSettings,
    model_info: Mapping[str, Any] | Any,
) -> list[ResultObject]:
    """Build every result object for one series' AnomalyResult (SEG first: the SR references it).

    `sources` must hold the result's source images (others are ignored); `job_key` seeds the derived UIDs, so
    the same key writes the same SOP Instance UIDs again; `model_info` is a ModelInfo or a dict naming the model.
    """
    series = SeriesResult.of(result, sources, job_key, settings, ModelIdentity.of(model_info, result.model_id))
    objects: list[ResultObject] = []
    seg = binary_seg(series)
    if seg is not None:
        objects.append(ResultObject(ResultKind.SEG, seg))
    objects.extend(ResultObject(kind, ds) for kind, ds in fractional_segs(series))
    objects.extend(ResultObject(ResultKind.SC, ds) for ds in heatmap_images(series))
    objects.append(ResultObject(ResultKind.SR, measurement_report(series, seg)))
    log.info(
        "results for series %s (job %s): %s",
        result.series_instance_uid,
        job_key,
        ", ".join(f"{o.kind} {o.dataset.SOPInstanceUID}" for o in objects),
    )
    return objects
