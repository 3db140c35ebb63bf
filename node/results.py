"""DICOM result objects from an AnomalyResult: BINARY (and optional FRACTIONAL) SEG, RGB SC heatmaps, TID 1500 SR.

Every object is a new series in the source study, made with highdicom, with Manufacturer "edgenode"
(ingest uses it to recognise the node's own output coming back) and the model identity in Contributing
Equipment (IHE AI Results). UIDs are derived from the job key, the source series, the object kind and
an index, so writing the same job again yields the same SOP Instance UIDs: a resend replaces, never
duplicates, at the PACS.

Negative results: when the segmentation is empty no BINARY SEG is written (an all-empty SEG adds nothing a
reader can see; the SR states "Finding: Absent" with volume 0) unless `results.empty_seg` is set, in which
case a SEG holding every source frame (all zero) is written.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from inference.anomaly_result import AnomalyResult
from node.config import ResultsSettings
from node.heatmap import HeatmapRenderer, HeatmapText

log = logging.getLogger(__name__)

BIPED_LETTERS = {"A", "P", "L", "R", "F", "H"}  # what highdicom accepts per patient orientation value
MANUFACTURER = "edgenode"
DEVICE_MODEL_NAME = "edgenode anomaly detector"
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root; UIDs are unique by their hashed entropy

SERIES_NUMBERS = {"seg": 9001, "seg-anomaly": 9002, "seg-uncertainty": 9003, "sc": 9004, "sr": 9005}
SERIES_DESCRIPTIONS = {
    "seg": "AI anomaly segmentation",
    "seg-anomaly": "AI anomaly map (fractional)",
    "seg-uncertainty": "AI uncertainty map (fractional)",
    "sc": "AI anomaly heatmap - not for diagnostic use",
    "sr": "AI anomaly report",
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

# What highdicom's Image Library entry (TID 1602) reads from an image, by modality group.
CROSS_SECTIONAL_MODALITIES = ("CT", "MR", "PT")
CROSS_SECTIONAL_LIBRARY_ATTRIBUTES = (
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "SliceThickness",
)
PROJECTION_MODALITIES = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")
PROJECTION_LIBRARY_ATTRIBUTES = ("PatientOrientation", "ImagerPixelSpacing")

# Codes that no standard terminology has: a private scheme, declared in the SR's coding scheme table.
SCHEME = "99EDGENODE"
STUDY_SCORE = hd.sr.CodedConcept("EN001", SCHEME, "Study anomaly score")
SLICE_SCORE = hd.sr.CodedConcept("EN002", SCHEME, "Image anomaly score")
MEAN_UNCERTAINTY = hd.sr.CodedConcept("EN003", SCHEME, "Mean ensemble uncertainty")
THRESHOLD = hd.sr.CodedConcept("EN004", SCHEME, "Anomaly map threshold")
NOT_ANALYSED = hd.sr.CodedConcept("EN005", SCHEME, "Source image not analysed")  # no standard code says this
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12
ALGORITHM_FAMILY = codes.DCM.ArtificialIntelligence
PROCEDURES = {
    "CT": hd.sr.CodedConcept("24627-2", "LN", "CT Chest"),
    "XR": hd.sr.CodedConcept("43468-8", "LN", "XR Unspecified body region"),
}


@dataclass(frozen=True)
class ResultObject:
    """One produced DICOM object; `kind` is seg, seg-anomaly, seg-uncertainty, sc or sr."""

    kind: str
    dataset: Dataset


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


def derive_uid(job_key: str, series_uid: str, kind: str, index: int = 0) -> str:
    """A UID that is the same every time this job writes this object (idempotent resends)."""
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[job_key, series_uid, kind, str(index)])


class ResultWriter:
    """Builds the objects for one AnomalyResult; one instance per call of `write_results`."""

    def __init__(
        self,
        result: AnomalyResult,
        sources: Sequence[Dataset],
        job_key: str,
        settings: ResultsSettings,
        model: ModelIdentity,
    ) -> None:
        by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
        missing = [uid for uid in result.source_sop_instance_uids if uid not in by_uid]
        if missing:
            raise ValueError(
                f"{len(missing)} source image(s) of the result are not among the given datasets, e.g. {missing[0]}"
            )
        shape = result.segmentation.shape
        if shape[0] != len(result.source_sop_instance_uids):
            raise ValueError(f"segmentation has {shape[0]} slices for {len(result.source_sop_instance_uids)} sources")
        self.result = result
        self.sources = [by_uid[uid] for uid in result.source_sop_instance_uids]  # slice k <-> sources[k]
        self.job_key = job_key
        self.settings = settings
        self.model = model
        self.is_ct = str(self.sources[0].Modality) == "CT"
        self.equipment = [
            hd.ContributingEquipment(
                manufacturer=MANUFACTURER,
                purpose_of_reference=codes.DCM.ProcessingEquipment,
                manufacturer_model_name=model.name,
                software_versions=model.version,
                contribution_description=f"AI anomaly detection, model {model.version}",
            )
        ]
        self.algorithm = hd.AlgorithmIdentificationSequence(
            name=model.name, family=ALGORITHM_FAMILY, version=model.version, source=MANUFACTURER
        )

    def uid(self, kind: str, index: int = 0) -> str:
        return derive_uid(self.job_key, self.result.series_instance_uid, kind, index)

    def finish(self, ds: Dataset, kind: str) -> Dataset:
        """Copy patient/study attributes from the source and name the series; same for every object kind."""
        first = self.sources[0]
        for keyword in COPIED_ATTRIBUTES:
            if kind == "sr" and keyword in SERIES_ONLY_ATTRIBUTES:
                continue  # the SR Document Series module has neither
            value = first.get(keyword)
            if value is not None and (value != "" or keyword not in SERIES_ONLY_ATTRIBUTES):
                setattr(ds, keyword, value)  # an empty Laterality is not copied: absent is the correct "unpaired"
        ds.Manufacturer = MANUFACTURER
        ds.SeriesDescription = SERIES_DESCRIPTIONS[kind]
        return ds

    # ---- SEG -------------------------------------------------------------------------------------
    def segment(self, label: str, category: Any, segment_type: Any) -> hd.seg.SegmentDescription:
        return hd.seg.SegmentDescription(
            segment_number=1,
            segment_label=label,
            segmented_property_category=category,
            segmented_property_type=segment_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=self.algorithm,
            tracking_uid=self.uid(f"{label}-tracking"),
            tracking_id=label,
        )

    def seg(self, kind: str, pixels: np.ndarray, seg_type: str, segment: hd.seg.SegmentDescription) -> Dataset:
        omit_empty = not self.settings.seg_all_slices and bool(pixels.any())
        extra: dict[str, Any] = {}
        if seg_type == "FRACTIONAL":
            extra = {
                "fractional_type": hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
                "max_fractional_value": 255,
            }
        seg = hd.seg.Segmentation(
            source_images=self.sources,
            pixel_array=pixels,
            segmentation_type=seg_type,
            segment_descriptions=[segment],
            series_instance_uid=self.uid(f"{kind}-series"),
            series_number=SERIES_NUMBERS[kind],
            sop_instance_uid=self.uid(kind),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=DEVICE_MODEL_NAME,
            software_versions=software_version(),
            device_serial_number=self.model.version[:64],
            content_description=SERIES_DESCRIPTIONS[kind][:64],
            content_label=kind.upper().replace("-", "_")[:16],
            content_creator_name=None,
            omit_empty_frames=omit_empty,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=self.equipment,
            **extra,
        )
        if "FrameOfReferenceUID" not in seg:  # projection radiograph: orientation is given by letters instead
            seg.PatientOrientation = self.sources[0].get("PatientOrientation", "")
        # The Pixel Measures macro needs a slice thickness, which a source may leave empty (Type 2) and a radiograph
        # lacks (highdicom's reader insists on it too): the loader's value, the slice spacing for such a CT, and
        # nominally 1 mm for a radiograph (the same convention as AnomalyResult's "area x 1 mm" volume).
        measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        if not measures.get("SliceThickness"):
            measures.SliceThickness = self.result.slice_thickness_mm or 1.0
        return self.finish(seg, kind)

    def binary_seg(self) -> Dataset | None:
        mask = self.result.segmentation.astype(bool)
        if not mask.any() and not self.settings.empty_seg:
            return None
        segment = self.segment("Anomaly", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion)
        return self.seg("seg", mask, "BINARY", segment)

    def fractional_segs(self) -> list[tuple[str, Dataset]]:
        """Anomaly map scaled so the threshold is 0.5 (values at 2x threshold and above are 1); uncertainty / max."""
        out = []
        if self.settings.fractional_anomaly_seg:
            scale = 2.0 * self.result.threshold if self.result.threshold > 0 else float(self.result.anomaly_map.max())
            level = np.clip(self.result.anomaly_map / scale, 0.0, 1.0) if scale > 0 else self.result.anomaly_map * 0
            segment = self.segment(
                "Anomaly map", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.MorphologicallyAbnormalStructure
            )
            out.append(("seg-anomaly", self.seg("seg-anomaly", level.astype(np.float32), "FRACTIONAL", segment)))
        if self.settings.fractional_uncertainty_seg:
            peak = float(self.result.uncertainty_map.max())
            level = self.result.uncertainty_map / peak if peak > 0 else self.result.uncertainty_map * 0
            segment = self.segment(
                "Uncertainty", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.MorphologicallyAbnormalStructure
            )
            out.append(
                ("seg-uncertainty", self.seg("seg-uncertainty", level.astype(np.float32), "FRACTIONAL", segment))
            )
        return out

    # ---- SC heatmaps -----------------------------------------------------------------------------
    def patient_orientation(self, source: Dataset) -> tuple[str, str] | None:
        """Row and column directions as patient orientation letters (from the source geometry)."""
        given = source.get("PatientOrientation")
        if given and len(given) == 2:
            return tuple(str(v) for v in given)  # type: ignore[return-value]
        if "ImageOrientationPatient" not in source:
            return None
        cosines = np.asarray(source.ImageOrientationPatient, float).reshape(2, 3)
        letters = (("R", "L"), ("A", "P"), ("F", "H"))

        def letter(vector: np.ndarray) -> str:
            axis = int(np.argmax(np.abs(vector)))
            return letters[axis][int(vector[axis] > 0)]

        return letter(cosines[0]), letter(cosines[1])

    def image_name(self, k: int) -> str:
        """How a reader finds source slice k in the viewer: its Instance Number (the image number viewers show),
        else its position in the series from the first slice along the slice normal."""
        number = self.sources[k].get("InstanceNumber")
        return f"Image {number}" if number not in (None, "") else f"Slice {k + 1} of {len(self.sources)}"

    def heatmaps(self) -> list[Dataset]:
        result = self.result
        slices = result.top_slices(self.settings.heatmap_slices)
        vmax = float(max(result.anomaly_map.max(), 2.0 * result.threshold, 1e-12))
        series_uid = self.uid("sc-series")
        renderer = HeatmapRenderer(vmax)  # one figure for the series, redrawn per image
        out = []
        for rank, k in enumerate(slices, start=1):
            source = self.sources[k]
            text = HeatmapText(
                score=float(result.slice_scores[k]),
                study_score=float(result.study_score),
                label=self.image_name(k).lower() if len(self.sources) > 1 else "image",
            )
            rgb = renderer.render(source, result.anomaly_map[k], text, result.segmentation[k])
            orientation = self.patient_orientation(source)
            # highdicom takes single letters only; DICOM also allows compound ones (oblique) and, when unknown, an
            # empty value (Type 2): those are written after construction over a placeholder.
            letters = orientation if orientation and all(v in BIPED_LETTERS for v in orientation) else None
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=source,
                pixel_array=rgb,
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                series_instance_uid=series_uid,
                series_number=SERIES_NUMBERS["sc"],
                sop_instance_uid=self.uid("sc", k),
                instance_number=rank,
                manufacturer=MANUFACTURER,
                patient_orientation=letters or ("L", "F"),
                laterality=source.get("Laterality") or None,
                transfer_syntax_uid=ExplicitVRLittleEndian,
                contributing_equipment=self.equipment,
            )
            if letters is None:
                sc.PatientOrientation = list(orientation or ())  # empty (Type 2) when unknown
            sc.BurnedInAnnotation = "YES"
            sc.ImageType = ["DERIVED", "SECONDARY"]
            sc.DerivationDescription = f"Anomaly map of model {self.model.version} blended over the source image"
            sc.ImageComments = f"slice score {text.score:.4f}; study score {text.study_score:.4f}"
            reference = Dataset()
            reference.ReferencedSOPClassUID = source.SOPClassUID
            reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
            sc.SourceImageSequence = [reference]
            out.append(self.finish(sc, "sc"))
        return out

    def referenced_segment(self, seg: Dataset) -> hd.sr.ReferencedSegment:
        """Segment 1 of the SEG and the source images its frames were derived from.

        Built by hand: highdicom's `from_segmentation` expects per-frame segment identification, which it
        itself moves to the shared functional groups for a single-segment SEG.
        """
        derived = {
            str(item.ReferencedSOPInstanceUID)
            for frame in seg.PerFrameFunctionalGroupsSequence
            for derivation in frame.DerivationImageSequence
            for item in derivation.SourceImageSequence
        }
        return hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=1,
            source_images=[
                hd.sr.SourceImageForSegmentation.from_source_image(ds)
                for ds in self.sources
                if str(ds.SOPInstanceUID) in derived
            ],
        )

    def library_slices(self, seg: Dataset | None) -> set[int]:
        """Slices the report's content refers to: the top slices and those the SEG has frames for.

        The Image Library (TID 1600) lists these, not every source image: its entries carry geometry for
        each image and made the SR for an 80-slice CT take seconds to build. The evidence sequence still
        lists every source image.
        """
        chosen = set(self.result.top_slices(self.settings.heatmap_slices))
        if seg is not None:
            chosen |= {k for k in range(len(self.sources)) if self.result.segmentation[k].any()}
        return chosen

    def library_images(self, seg: Dataset | None) -> list[Dataset]:
        """Image Library entries; images lacking the geometry highdicom describes them with are left out
        (they stay in the evidence sequence and in the measurement groups' source references)."""
        chosen = []
        for k in sorted(self.library_slices(seg)):
            ds = self.sources[k]
            needed: tuple[str, ...] = PROJECTION_LIBRARY_ATTRIBUTES if ds.Modality in PROJECTION_MODALITIES else ()
            if ds.Modality in CROSS_SECTIONAL_MODALITIES:
                needed = CROSS_SECTIONAL_LIBRARY_ATTRIBUTES
            absent = [keyword for keyword in needed if ds.get(keyword) in (None, "", [])]  # Type 2: may be empty
            if absent:
                log.info("image %s left out of the SR image library: no %s", ds.SOPInstanceUID, ", ".join(absent))
                continue
            chosen.append(ds)
        return chosen

    # ---- SR --------------------------------------------------------------------------------------
    def not_analysed(self) -> hd.sr.ContainerContentItem | None:
        """TID 1500's Qualitative Evaluations container with a TEXT item per instance of the series that was left
        out of the analysis and why, so the report says which images its findings do not cover. The instances
        are named by UID only, not referenced as images: they are in neither the SEG nor the evidence."""
        if not self.result.left_out:
            return None
        container = hd.sr.ContainerContentItem(
            name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
        )
        container.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.TextContentItem(
                    name=NOT_ANALYSED,
                    value=f"SOP Instance {item.sop_instance_uid}: {item.summary}"
                    if item.sop_instance_uid
                    else f"File {item.path.name}: {item.summary}",
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
                for item in self.result.left_out
            ]
        )
        return container

    def sr(self, seg: Dataset | None) -> Dataset:
        result = self.result
        algorithm = hd.sr.AlgorithmIdentification(
            name=self.model.name, version=self.model.version, family=ALGORITHM_FAMILY, manufacturer=MANUFACTURER
        )
        observer = hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=codes.DCM.Device,
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=self.uid("sr-device"),
                    name=self.model.name,
                    manufacturer_name=MANUFACTURER,
                    model_name=self.model.version,
                ),
            )
        )
        if self.is_ct:
            extent = hd.sr.Measurement(
                name=codes.SCT.Volume,
                value=float(result.anomalous_volume_mm3),
                unit=codes.UCUM.CubicMillimeter,
                algorithm_id=algorithm,
            )
        else:  # a radiograph: AnomalyResult counts area x 1 mm as its "volume"
            extent = hd.sr.Measurement(
                name=codes.SCT.Area,
                value=float(result.anomalous_volume_mm3),
                unit=codes.UCUM.SquareMillimeter,
                algorithm_id=algorithm,
            )
        finding = codes.SCT.Present if result.positive else codes.SCT.Absent
        study_group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=self.uid("sr-study-group"), identifier="Study"),
            finding_type=codes.SCT.MorphologicallyAbnormalStructure,
            algorithm_id=algorithm,
            finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
            measurements=[
                hd.sr.Measurement(
                    name=STUDY_SCORE, value=float(result.study_score), unit=codes.UCUM.NoUnits, algorithm_id=algorithm
                ),
                extent,
                hd.sr.Measurement(
                    name=MEAN_UNCERTAINTY,
                    value=float(result.mean_uncertainty),
                    unit=codes.UCUM.NoUnits,
                    algorithm_id=algorithm,
                ),
                hd.sr.Measurement(
                    name=THRESHOLD, value=float(result.threshold), unit=codes.UCUM.NoUnits, algorithm_id=algorithm
                ),
            ],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.SCT.Finding, finding)],
        )
        groups: list[Any] = [study_group]
        if seg is not None:
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(uid=self.uid("sr-seg-group"), identifier="Anomaly"),
                    referenced_segment=self.referenced_segment(seg),
                    finding_type=codes.SCT.MorphologicallyAbnormalStructure,
                    algorithm_id=algorithm,
                    measurements=[extent],
                )
            )
        for k in result.top_slices(self.settings.heatmap_slices):
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=self.uid("sr-slice-group", k), identifier=self.image_name(k)
                    ),
                    finding_type=codes.SCT.MorphologicallyAbnormalStructure,
                    algorithm_id=algorithm,
                    measurements=[
                        hd.sr.Measurement(
                            name=SLICE_SCORE,
                            value=float(result.slice_scores[k]),
                            unit=codes.UCUM.NoUnits,
                            algorithm_id=algorithm,
                        )
                    ],
                    source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(self.sources[k])],
                )
            )
        report = hd.sr.MeasurementReport(
            observation_context=observer,
            procedure_reported=PROCEDURES["CT" if self.is_ct else "XR"],
            imaging_measurements=groups,
            referenced_images=self.library_images(seg) or None,
        )
        not_analysed = self.not_analysed()
        if not_analysed is not None:  # highdicom's MeasurementReport takes no report-level qualitative evaluations
            report[0].ContentSequence.append(not_analysed)
        evidence = [*self.sources, *([seg] if seg is not None else [])]
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=self.uid("sr-series"),
            series_number=SERIES_NUMBERS["sr"],
            sop_instance_uid=self.uid("sr"),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,
            contributing_equipment=self.equipment,
        )
        scheme = Dataset()
        scheme.CodingSchemeDesignator = SCHEME
        scheme.CodingSchemeName = "edgenode anomaly detection measurements"
        scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
        sr.CodingSchemeIdentificationSequence = [scheme]
        return self.finish(sr, "sr")


def write_results(
    result: AnomalyResult,
    sources: Sequence[Dataset],
    job_key: str,
    settings: ResultsSettings,
    model_info: Mapping[str, Any] | Any,
) -> list[ResultObject]:
    """Build every result object for one series' AnomalyResult (SEG first: the SR references it)."""
    writer = ResultWriter(result, sources, job_key, settings, ModelIdentity.of(model_info, result.model_id))
    objects: list[ResultObject] = []
    seg = writer.binary_seg()
    if seg is not None:
        objects.append(ResultObject("seg", seg))
    objects.extend(ResultObject(kind, ds) for kind, ds in writer.fractional_segs())
    objects.extend(ResultObject("sc", ds) for ds in writer.heatmaps())
    objects.append(ResultObject("sr", writer.sr(seg)))
    log.info(
        "results for series %s (job %s): %s",
        result.series_instance_uid,
        job_key,
        ", ".join(f"{o.kind} {o.dataset.SOPInstanceUID}" for o in objects),
    )
    return objects
