"""RGB Secondary Capture heatmaps: one image per top slice, one series, ranked by slice score.

The pixels (windowed source, colour overlay, contour, burned-in text) come from `heatmap_render`; this module
makes them DICOM objects that sit beside their source image in the viewer.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from db.models import ResultKind
from node.results.common import MANUFACTURER, SERIES_NUMBERS, SeriesResult
from node.results.heatmap_render import HeatmapRenderer, HeatmapText

BIPED_LETTERS = {"A", "P", "L", "R", "F", "H"}  # what highdicom accepts per patient orientation value


def heatmap_images(series: SeriesResult) -> list[Dataset]:
    """One SC image per top slice (every slice when `results.heatmap_slices` is 0), on one colour scale."""
    result = series.result
    vmax = float(max(result.anomaly_map.max(), 2.0 * result.threshold, 1e-12))
    renderer = HeatmapRenderer(vmax)  # one figure for the series, redrawn per image
    series_uid = series.uid(f"{ResultKind.SC}-series")
    return [heatmap_image(series, renderer, k, rank, series_uid) for rank, k in enumerate(series.top_slices(), start=1)]


def heatmap_image(series: SeriesResult, renderer: HeatmapRenderer, k: int, rank: int, series_uid: str) -> Dataset:
    """The heatmap of slice k as the `rank`-th image of the heatmap series."""
    result, source = series.result, series.sources[k]
    text = HeatmapText(
        score=float(result.slice_scores[k]),
        study_score=float(result.study_score),
        label=series.image_name(k).lower() if len(series.sources) > 1 else "image",
    )
    rgb = renderer.render(source, result.anomaly_map[k], text, result.segmentation[k])
    orientation = patient_orientation(source)
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
        series_number=SERIES_NUMBERS[ResultKind.SC],
        sop_instance_uid=series.uid(ResultKind.SC, k),
        instance_number=rank,
        manufacturer=MANUFACTURER,
        patient_orientation=letters or ("L", "F"),
        laterality=source.get("Laterality") or None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=series.equipment,
    )
    if letters is None:
        sc.PatientOrientation = list(orientation or ())  # empty (Type 2) when unknown
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = f"Anomaly map of model {series.model.version} blended over the source image"
    sc.ImageComments = f"slice score {text.score:.4f}; study score {text.study_score:.4f}"
    sc.SourceImageSequence = [_source_image_item(source)]
    return series.finish(sc, ResultKind.SC)


def patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """Row and column directions as patient orientation letters (given, or from the source's direction cosines)."""
    given = source.get("PatientOrientation")
    if given and len(given) == 2:
        return str(given[0]), str(given[1])
    if "ImageOrientationPatient" not in source:
        return None
    cosines = np.asarray(source.ImageOrientationPatient, float).reshape(2, 3)
    letters = (("R", "L"), ("A", "P"), ("F", "H"))

    def letter(vector: np.ndarray) -> str:
        axis = int(np.argmax(np.abs(vector)))
        return letters[axis][int(vector[axis] > 0)]

    return letter(cosines[0]), letter(cosines[1])


def _source_image_item(source: Dataset) -> Dataset:
    """A Source Image Sequence item naming `source` (SOP class and instance)."""
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    return reference
