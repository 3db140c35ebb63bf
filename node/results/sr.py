"""The TID 1500 measurement report (Comprehensive 3D SR) carrying the study score.

Content: a study measurement group (score, anomalous volume or area, mean uncertainty, threshold, Finding
Present/Absent), a volumetric group referencing the SEG's segment when there is a SEG, one group per top slice
(its score, the image it was measured on), an Image Library of the images the content refers to, and, when
instances of the series were left out of the analysis, a Qualitative Evaluations container naming each and why.
"""

from __future__ import annotations

import logging
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from db.models import ResultKind
from node.results.common import ALGORITHM_FAMILY, MANUFACTURER, SERIES_NUMBERS, SeriesResult

log = logging.getLogger(__name__)

# Codes that no standard terminology has: a private scheme, declared in the SR's coding scheme table.
SCHEME = "99EDGENODE"
STUDY_SCORE = hd.sr.CodedConcept("EN001", SCHEME, "Study anomaly score")
SLICE_SCORE = hd.sr.CodedConcept("EN002", SCHEME, "Image anomaly score")
MEAN_UNCERTAINTY = hd.sr.CodedConcept("EN003", SCHEME, "Mean ensemble uncertainty")
THRESHOLD = hd.sr.CodedConcept("EN004", SCHEME, "Anomaly map threshold")
NOT_ANALYSED = hd.sr.CodedConcept("EN005", SCHEME, "Source image not analysed")  # no standard code says this
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12
PROCEDURES = {
    "CT": hd.sr.CodedConcept("24627-2", "LN", "CT Chest"),
    "XR": hd.sr.CodedConcept("43468-8", "LN", "XR Unspecified body region"),
}

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


def measurement_report(series: SeriesResult, seg: Dataset | None) -> Dataset:
    """The SR document for the series; `seg` is the BINARY SEG written with it, if any (its segment is referenced)."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=series.model.name, version=series.model.version, family=ALGORITHM_FAMILY, manufacturer=MANUFACTURER
    )
    extent = extent_measurement(series, algorithm)
    groups: list[Any] = [study_group(series, algorithm, extent)]
    if seg is not None:
        groups.append(segment_group(series, algorithm, extent, seg))
    groups.extend(slice_groups(series, algorithm))
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(series),
        procedure_reported=PROCEDURES["CT" if series.is_ct else "XR"],
        imaging_measurements=groups,
        referenced_images=library_images(series, seg) or None,
    )
    not_analysed = not_analysed_container(series)
    if not_analysed is not None:  # highdicom's MeasurementReport takes no report-level qualitative evaluations
        report[0].ContentSequence.append(not_analysed)
    return sr_document(series, report, seg)


def sr_document(series: SeriesResult, report: hd.sr.MeasurementReport, seg: Dataset | None) -> Dataset:
    """The Comprehensive 3D SR holding `report`, with every source image (and the SEG) as evidence."""
    evidence = [*series.sources, *([seg] if seg is not None else [])]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series.uid(f"{ResultKind.SR}-series"),
        series_number=SERIES_NUMBERS[ResultKind.SR],
        sop_instance_uid=series.uid(ResultKind.SR),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        contributing_equipment=series.equipment,
    )
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "edgenode anomaly detection measurements"
    scheme.CodingSchemeResponsibleOrganization = MANUFACTURER
    sr.CodingSchemeIdentificationSequence = [scheme]
    return series.finish(sr, ResultKind.SR)


def observation_context(series: SeriesResult) -> hd.sr.ObservationContext:
    """The model as the observing device."""
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=series.uid("sr-device"),
                name=series.model.name,
                manufacturer_name=MANUFACTURER,
                model_name=series.model.version,
            ),
        )
    )


def extent_measurement(series: SeriesResult, algorithm: hd.sr.AlgorithmIdentification) -> hd.sr.Measurement:
    """The anomalous volume of a CT; for a radiograph its area (AnomalyResult counts area x 1 mm as "volume")."""
    if series.is_ct:
        name, unit = codes.SCT.Volume, codes.UCUM.CubicMillimeter
    else:
        name, unit = codes.SCT.Area, codes.UCUM.SquareMillimeter
    return hd.sr.Measurement(
        name=name, value=float(series.result.anomalous_volume_mm3), unit=unit, algorithm_id=algorithm
    )


def study_group(
    series: SeriesResult, algorithm: hd.sr.AlgorithmIdentification, extent: hd.sr.Measurement
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The study's measurements and the Finding (Present / Absent) the worklist ranks by."""
    result = series.result

    def score(name: hd.sr.CodedConcept, value: float) -> hd.sr.Measurement:
        return hd.sr.Measurement(name=name, value=float(value), unit=codes.UCUM.NoUnits, algorithm_id=algorithm)

    finding = codes.SCT.Present if result.positive else codes.SCT.Absent
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=series.uid("sr-study-group"), identifier="Study"),
        finding_type=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(codes.SCT.Lung)],
        measurements=[
            score(STUDY_SCORE, result.study_score),
            extent,
            score(MEAN_UNCERTAINTY, result.mean_uncertainty),
            score(THRESHOLD, result.threshold),
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(codes.SCT.Finding, finding)],
    )


def segment_group(
    series: SeriesResult, algorithm: hd.sr.AlgorithmIdentification, extent: hd.sr.Measurement, seg: Dataset
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """The SEG's segment as a volumetric region, with its extent."""
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=series.uid("sr-seg-group"), identifier="Anomaly"),
        referenced_segment=referenced_segment(series, seg),
        finding_type=codes.SCT.MorphologicallyAbnormalStructure,
        algorithm_id=algorithm,
        measurements=[extent],
    )


def referenced_segment(series: SeriesResult, seg: Dataset) -> hd.sr.ReferencedSegment:
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
            for ds in series.sources
            if str(ds.SOPInstanceUID) in derived
        ],
    )


def slice_groups(
    series: SeriesResult, algorithm: hd.sr.AlgorithmIdentification
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One group per top slice: its score, named by the image number a viewer shows, and the image itself."""
    return [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=series.uid("sr-slice-group", k), identifier=series.image_name(k)
            ),
            finding_type=codes.SCT.MorphologicallyAbnormalStructure,
            algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(
                    name=SLICE_SCORE,
                    value=float(series.result.slice_scores[k]),
                    unit=codes.UCUM.NoUnits,
                    algorithm_id=algorithm,
                )
            ],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(series.sources[k])],
        )
        for k in series.top_slices()
    ]


def library_slices(series: SeriesResult, seg: Dataset | None) -> set[int]:
    """Slices the report's content refers to: the top slices and those the SEG has frames for.

    The Image Library (TID 1600) lists these, not every source image: its entries carry geometry for
    each image and made the SR for an 80-slice CT take seconds to build. The evidence sequence still
    lists every source image.
    """
    chosen = set(series.top_slices())
    if seg is not None:
        chosen |= {k for k in range(len(series.sources)) if series.result.segmentation[k].any()}
    return chosen


def library_images(series: SeriesResult, seg: Dataset | None) -> list[Dataset]:
    """Image Library entries; images lacking the geometry highdicom describes them with are left out
    (they stay in the evidence sequence and in the measurement groups' source references)."""
    chosen = []
    for k in sorted(library_slices(series, seg)):
        ds = series.sources[k]
        needed: tuple[str, ...] = PROJECTION_LIBRARY_ATTRIBUTES if ds.Modality in PROJECTION_MODALITIES else ()
        if ds.Modality in CROSS_SECTIONAL_MODALITIES:
            needed = CROSS_SECTIONAL_LIBRARY_ATTRIBUTES
        absent = [keyword for keyword in needed if ds.get(keyword) in (None, "", [])]  # Type 2: may be empty
        if absent:
            log.info("image %s left out of the SR image library: no %s", ds.SOPInstanceUID, ", ".join(absent))
            continue
        chosen.append(ds)
    return chosen


def not_analysed_container(series: SeriesResult) -> hd.sr.ContainerContentItem | None:
    """TID 1500's Qualitative Evaluations container with a TEXT item per instance of the series that was left
    out of the analysis and why, so the report says which images its findings do not cover. The instances
    are named by UID only, not referenced as images: they are in neither the SEG nor the evidence."""
    if not series.result.left_out:
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
            for item in series.result.left_out
        ]
    )
    return container
