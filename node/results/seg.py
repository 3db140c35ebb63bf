"""DICOM Segmentation objects: the BINARY SEG of the finding and the optional FRACTIONAL anomaly and uncertainty maps.

Negative results: when the segmentation is empty no BINARY SEG is written (an all-empty SEG adds nothing a
reader can see; the SR states "Finding: Absent" with volume 0) unless `results.empty_seg` is set, in which
case a SEG holding every source frame (all zero) is written.
"""

from __future__ import annotations

from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from db.models import ResultKind
from node.results.common import (
    DEVICE_MODEL_NAME,
    MANUFACTURER,
    SERIES_DESCRIPTIONS,
    SERIES_NUMBERS,
    SeriesResult,
    software_version,
)


def binary_seg(series: SeriesResult) -> Dataset | None:
    """The thresholded finding, or None for a negative result unless `results.empty_seg` asks for one."""
    mask = series.result.segmentation.astype(bool)
    if not mask.any() and not series.settings.empty_seg:
        return None
    segment = segment_description(series, "Anomaly", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion)
    return segmentation(series, ResultKind.SEG, mask, "BINARY", segment)


def fractional_segs(series: SeriesResult) -> list[tuple[ResultKind, Dataset]]:
    """Anomaly map scaled so the threshold is 0.5 (values at 2x threshold and above are 1); uncertainty / max."""
    result, settings = series.result, series.settings
    abnormal = codes.SCT.MorphologicallyAbnormalStructure
    out = []
    if settings.fractional_anomaly_seg:
        scale = 2.0 * result.threshold if result.threshold > 0 else float(result.anomaly_map.max())
        level = np.clip(result.anomaly_map / scale, 0.0, 1.0) if scale > 0 else result.anomaly_map * 0
        segment = segment_description(series, "Anomaly map", abnormal, abnormal)
        kind = ResultKind.SEG_ANOMALY
        out.append((kind, segmentation(series, kind, level.astype(np.float32), "FRACTIONAL", segment)))
    if settings.fractional_uncertainty_seg:
        peak = float(result.uncertainty_map.max())
        level = result.uncertainty_map / peak if peak > 0 else result.uncertainty_map * 0
        segment = segment_description(series, "Uncertainty", abnormal, abnormal)
        kind = ResultKind.SEG_UNCERTAINTY
        out.append((kind, segmentation(series, kind, level.astype(np.float32), "FRACTIONAL", segment)))
    return out


def segment_description(
    series: SeriesResult, label: str, category: Any, segment_type: Any
) -> hd.seg.SegmentDescription:
    """Segment 1 of a SEG, identified as the model's automatic output and tracked by a UID derived from `label`."""
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label,
        segmented_property_category=category,
        segmented_property_type=segment_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=series.algorithm_identification(),
        tracking_uid=series.uid(f"{label}-tracking"),
        tracking_id=label,
    )


def segmentation(
    series: SeriesResult, kind: ResultKind, pixels: np.ndarray, seg_type: str, segment: hd.seg.SegmentDescription
) -> Dataset:
    """One single-segment SEG over every source image; frames without findings are left out unless configured."""
    omit_empty = not series.settings.seg_all_slices and bool(pixels.any())
    extra: dict[str, Any] = {}
    if seg_type == "FRACTIONAL":
        extra = {
            "fractional_type": hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
            "max_fractional_value": 255,
        }
    seg = hd.seg.Segmentation(
        source_images=series.sources,
        pixel_array=pixels,
        segmentation_type=seg_type,
        segment_descriptions=[segment],
        series_instance_uid=series.uid(f"{kind}-series"),
        series_number=SERIES_NUMBERS[kind],
        sop_instance_uid=series.uid(kind),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=DEVICE_MODEL_NAME,
        software_versions=software_version(),
        device_serial_number=series.model.version[:64],
        content_description=SERIES_DESCRIPTIONS[kind][:64],
        content_label=kind.upper().replace("-", "_")[:16],
        content_creator_name=None,
        omit_empty_frames=omit_empty,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=series.equipment,
        **extra,
    )
    if "FrameOfReferenceUID" not in seg:  # projection radiograph: orientation is given by letters instead
        seg.PatientOrientation = series.sources[0].get("PatientOrientation", "")
    # The Pixel Measures macro needs a slice thickness, which a source may leave empty (Type 2) and a radiograph
    # lacks (highdicom's reader insists on it too): the loader's value, the slice spacing for such a CT, and
    # nominally 1 mm for a radiograph (the same convention as AnomalyResult's "area x 1 mm" volume).
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    if not measures.get("SliceThickness"):
        measures.SliceThickness = series.result.slice_thickness_mm or 1.0
    return series.finish(seg, kind)
