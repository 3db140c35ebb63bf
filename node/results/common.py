"""What every result object of one series shares: the model's identity, derived UIDs and the source references.

Each object is a new series in the source study, with Manufacturer "edgenode" (ingest uses it to recognise the
node's own output coming back) and the model identity in Contributing Equipment (IHE AI Results). UIDs are derived
from the job key, the source series, the object kind and an index, so writing the same job again yields the same
SOP Instance UIDs: a resend replaces, never duplicates, at the PACS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from db.models import ResultKind
from inference.anomaly_result import AnomalyResult
from node.config import ResultsSettings

MANUFACTURER = "edgenode"
DEVICE_MODEL_NAME = "edgenode anomaly detector"
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root; UIDs are unique by their hashed entropy
ALGORITHM_FAMILY = codes.DCM.ArtificialIntelligence

SERIES_NUMBERS = {
    ResultKind.SEG: 9001,
    ResultKind.SEG_ANOMALY: 9002,
    ResultKind.SEG_UNCERTAINTY: 9003,
    ResultKind.SC: 9004,
    ResultKind.SR: 9005,
}
SERIES_DESCRIPTIONS = {
    ResultKind.SEG: "AI anomaly segmentation",
    ResultKind.SEG_ANOMALY: "AI anomaly map (fractional)",
    ResultKind.SEG_UNCERTAINTY: "AI uncertainty map (fractional)",
    ResultKind.SC: "AI anomaly heatmap - not for diagnostic use",
    ResultKind.SR: "AI anomaly report",
}
# Copied from the source so the result sits beside it in every viewer (General Study / Patient / Series).
COPIED_ATTRIBUTES = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "BodyPartExamined",
    "Laterality",
)
SERIES_ONLY_ATTRIBUTES = ("BodyPartExamined", "Laterality")  # General Series: images and SEG, not SR


@dataclass(frozen=True)
class ModelIdentity:
    """The model that produced the result: shown in algorithm identification and Contributing Equipment."""

    name: str
    version: str  # the model id (name + weights hash)

    @classmethod
    def of(cls, model_info: Mapping[str, Any] | Any, fallback_version: str) -> ModelIdentity:
        """Accept a dict (name, version or model_id) or a ModelInfo-like object."""
        if isinstance(model_info, Mapping):
            name = model_info.get("name")
            version = model_info.get("version") or model_info.get("model_id")
        else:
            name = getattr(model_info, "name", None)
            version = getattr(model_info, "version", None) or getattr(model_info, "model_id", None)
        version = str(version or fallback_version)
        return cls(name=str(name or version.rsplit("-", 1)[0]), version=version)


def software_version() -> str:
    try:
        return metadata.version("edgenode")
    except metadata.PackageNotFoundError:
        return "0"


def derive_uid(job_key: str, series_uid: str, name: str, index: int = 0) -> str:
    """A UID that is the same every time this job writes this object (idempotent resends).

    `name` is an object kind or a kind-prefixed name ("sc-series", "sr-study-group"): changing one changes the
    UIDs a re-run sends, so the PACS would keep both copies.
    """
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[job_key, series_uid, name, str(index)])


@dataclass
class SeriesResult:
    """One series' AnomalyResult with its source images in slice order, and what every object written for it shares.

    Built by `SeriesResult.of`, which checks that the sources match the result; `sources[k]` is slice k.
    """

    result: AnomalyResult
    sources: list[Dataset]
    job_key: str
    settings: ResultsSettings
    model: ModelIdentity
    equipment: list[hd.ContributingEquipment] = field(init=False)

    def __post_init__(self) -> None:
        self.equipment = [
            hd.ContributingEquipment(
                manufacturer=MANUFACTURER,
                purpose_of_reference=codes.DCM.ProcessingEquipment,
                manufacturer_model_name=self.model.name,
                software_versions=self.model.version,
                contribution_description=f"AI anomaly detection, model {self.model.version}",
            )
        ]

    @classmethod
    def of(
        cls,
        result: AnomalyResult,
        sources: Sequence[Dataset],
        job_key: str,
        settings: ResultsSettings,
        model: ModelIdentity,
    ) -> SeriesResult:
        """The result's own source images, picked from `sources` by SOP Instance UID (others are ignored)."""
        by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
        missing = [uid for uid in result.source_sop_instance_uids if uid not in by_uid]
        if missing:
            raise ValueError(
                f"{len(missing)} source image(s) of the result are not among the given datasets, e.g. {missing[0]}"
            )
        slices = result.segmentation.shape[0]
        if slices != len(result.source_sop_instance_uids):
            raise ValueError(f"segmentation has {slices} slices for {len(result.source_sop_instance_uids)} sources")
        ordered = [by_uid[uid] for uid in result.source_sop_instance_uids]
        return cls(result=result, sources=ordered, job_key=job_key, settings=settings, model=model)

    @property
    def is_ct(self) -> bool:
        return str(self.sources[0].Modality) == "CT"

    def uid(self, name: str, index: int = 0) -> str:
        return derive_uid(self.job_key, self.result.series_instance_uid, str(name), index)

    def algorithm_identification(self) -> hd.AlgorithmIdentificationSequence:
        """The model as a SEG segment's algorithm (the SR names it with `hd.sr.AlgorithmIdentification`)."""
        return hd.AlgorithmIdentificationSequence(
            name=self.model.name, family=ALGORITHM_FAMILY, version=self.model.version, source=MANUFACTURER
        )

    def top_slices(self) -> list[int]:
        """The slices that get a heatmap and a slice measurement in the report, best first."""
        return self.result.top_slices(self.settings.heatmap_slices)

    def image_name(self, k: int) -> str:
        """How a reader finds source slice k in the viewer: its Instance Number (the image number viewers show),
        else its position in the series from the first slice along the slice normal."""
        number = self.sources[k].get("InstanceNumber")
        return f"Image {number}" if number not in (None, "") else f"Slice {k + 1} of {len(self.sources)}"

    def finish(self, ds: Dataset, kind: ResultKind) -> Dataset:
        """Copy patient/study attributes from the source and name the series; same for every object kind."""
        first = self.sources[0]
        for keyword in COPIED_ATTRIBUTES:
            if kind == ResultKind.SR and keyword in SERIES_ONLY_ATTRIBUTES:
                continue  # the SR Document Series module has neither
            value = first.get(keyword)
            if value is not None and (value != "" or keyword not in SERIES_ONLY_ATTRIBUTES):
                setattr(ds, keyword, value)  # an empty Laterality is not copied: absent is the correct "unpaired"
        ds.Manufacturer = MANUFACTURER
        ds.SeriesDescription = SERIES_DESCRIPTIONS[kind]
        return ds
