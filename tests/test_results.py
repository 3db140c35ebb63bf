"""Result objects (SEG, SC heatmaps, SR): valid per dciodvfy/dcentvfy, and they read back with the same content.

The AnomalyResults here are built by hand on synthetic CT/DX sources (a spherical "lesion" and a smooth
Gaussian anomaly map): the writers' contract is the AnomalyResult, not how the pipeline makes one.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ComputedRadiographyImageStorage, SegmentationStorage

from inference.anomaly_result import AnomalyResult
from node.config import ResultsSettings
from node.results import ResultKind, ResultObject, write_results
from node.results.common import MANUFACTURER, ModelIdentity, derive_uid
from node.results.heatmap_render import HeatmapRenderer, HeatmapText, render_heatmap
from node.results.sc import patient_orientation
from node.results.sr import SLICE_SCORE, STUDY_SCORE
from tests.conftest import DCENTVFY, DCIODVFY, require
from tests.dicomgen import make_ct_series, make_dx

MODEL = {"name": "tiny", "version": "tiny-0123456789ab"}


def ct_result(sources: Sequence[Dataset], positive: bool = True) -> AnomalyResult:
    """A sphere of radius ~6 mm in the right lung with a Gaussian error map around it."""
    n, rows, cols = len(sources), sources[0].Rows, sources[0].Columns
    spacing, thickness = float(sources[0].PixelSpacing[0]), float(sources[0].SliceThickness)
    zz, yy, xx = np.mgrid[0:n, 0:rows, 0:cols]
    dist = np.sqrt(
        ((zz - n / 2) * thickness) ** 2 + ((yy - rows * 0.45) * spacing) ** 2 + ((xx - cols * 0.3) * spacing) ** 2
    )
    anomaly = np.exp(-((dist / 6.0) ** 2)).astype(np.float32)
    seg = anomaly > 0.5 if positive else np.zeros(anomaly.shape, bool)
    if not positive:
        anomaly *= 0.2
    scores = anomaly.reshape(n, -1).max(axis=1).astype(np.float32)
    return AnomalyResult(
        model_id=MODEL["version"],
        modality="CT",
        series_instance_uid=str(sources[0].SeriesInstanceUID),
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in sources],
        anatomy_mask=np.ones(seg.shape, bool),
        anomaly_map=anomaly,
        uncertainty_map=(0.1 * anomaly + 0.01).astype(np.float32),
        segmentation=seg,
        threshold=0.25,
        slice_scores=scores,
        study_score=float(scores.max()),
        anomalous_volume_mm3=float(seg.sum() * spacing * spacing * thickness),
        mean_uncertainty=0.06,
        pixel_spacing_mm=(spacing, spacing),
        slice_thickness_mm=thickness,
    )


def dx_result(source: Dataset) -> AnomalyResult:
    rows, cols = source.Rows, source.Columns
    yy, xx = np.mgrid[0:rows, 0:cols]
    anomaly = np.exp(-(((yy - rows * 0.45) ** 2 + (xx - cols * 0.3) ** 2) / (2 * 8.0**2)))[None].astype(np.float32)
    seg = anomaly > 0.5
    return AnomalyResult(
        model_id=MODEL["version"],
        modality=str(source.Modality),
        series_instance_uid=str(source.SeriesInstanceUID),
        source_sop_instance_uids=[str(source.SOPInstanceUID)],
        anatomy_mask=np.ones(seg.shape, bool),
        anomaly_map=anomaly,
        uncertainty_map=(0.1 * anomaly).astype(np.float32),
        segmentation=seg,
        threshold=0.25,
        slice_scores=np.array([0.87], np.float32),
        study_score=0.87,
        anomalous_volume_mm3=float(seg.sum() * 0.25),
        mean_uncertainty=0.04,
        pixel_spacing_mm=(0.5, 0.5),
        slice_thickness_mm=1.0,
    )


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's Error lines for one file (warnings, e.g. about the private coding scheme, are allowed)."""
    proc = subprocess.run([str(require(DCIODVFY)), str(path)], capture_output=True, text=True, check=False)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def save_all(datasets: Sequence[Dataset], folder: Path, stem: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ds in enumerate(datasets):
        path = folder / f"{stem}{n:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def by_kind(objects: Sequence[ResultObject], kind: str) -> list[Dataset]:
    return [o.dataset for o in objects if o.kind == kind]


def check_sr_readback(
    path: Path, result: AnomalyResult, sources: Sequence[Dataset], seg_uid: str | None, top: list[int]
) -> None:
    sr = hd.sr.srread(path)
    groups = sr.content.get_image_measurement_groups()
    study = next(g for g in groups if g.tracking_identifier == "Study")
    (score,) = study.get_measurements(name=STUDY_SCORE)
    assert "anomaly score" in score.name.meaning.lower()
    assert score.value == pytest.approx(result.study_score, rel=1e-6)
    extent_name = hd.sr.CodedConcept("118565006", "SCT", "Volume") if result.modality == "CT" else None
    extent = (
        study.get_measurements(name=extent_name)
        if extent_name
        else study.get_measurements(name=hd.sr.CodedConcept("42798000", "SCT", "Area"))
    )
    assert extent[0].value == pytest.approx(result.anomalous_volume_mm3, rel=1e-6)
    slice_groups = {g.tracking_identifier: g for g in groups if g.tracking_identifier.startswith("Image ")}
    names = {f"Image {sources[k].InstanceNumber}": k for k in top}  # the image number a viewer shows
    assert sorted(slice_groups) == sorted(names)
    for name, k in names.items():
        group = slice_groups[name]
        (value,) = group.get_measurements(name=SLICE_SCORE)
        assert value.value == pytest.approx(float(result.slice_scores[k]), rel=1e-6)
        assert group.source_images[0].referenced_sop_instance_uid == result.source_sop_instance_uids[k]
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    if seg_uid is None:
        assert volumetric == []
    else:
        segment = volumetric[0].referenced_segment
        assert segment.referenced_sop_instance_uid == seg_uid
        assert segment.referenced_sop_class_uid == SegmentationStorage
    # Image library and evidence list every source image
    evidence = {
        str(item.ReferencedSOPInstanceUID)
        for study_item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert set(result.source_sop_instance_uids) <= evidence
    if seg_uid:
        assert seg_uid in evidence
    ai = [e for e in sr.ContributingEquipmentSequence if e.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"]
    assert ai and ai[0].ManufacturerModelName == MODEL["name"] and ai[0].SoftwareVersions == MODEL["version"]


def make_cr(rows: int, cols: int) -> Dataset:
    """A Computed Radiography image: the synthetic radiograph under the CR SOP class."""
    ds = make_dx(rows, cols)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
    ds.Modality = "CR"
    for keyword in ("PresentationIntentType", "DetectorType", "ImagerPixelSpacing"):
        delattr(ds, keyword)
    return ds


@pytest.mark.parametrize("modality", ["CT", "DX", "CR"])
def test_every_object_is_valid_and_reads_back(tmp_path: Path, modality: str) -> None:
    if modality == "CT":
        sources = make_ct_series(10, 48, 48)
        result = ct_result(sources)
    else:
        sources = [make_dx(96, 96, monochrome1=True) if modality == "DX" else make_cr(96, 96)]
        result = dx_result(sources[0])
    settings = ResultsSettings(heatmap_slices=3, fractional_anomaly_seg=True, fractional_uncertainty_seg=True)
    objects = write_results(result, sources, "job-17", settings, MODEL)

    kinds = [o.kind for o in objects]
    assert kinds[0] == "seg" and kinds[-1] == "sr"
    assert set(kinds) == {"seg", "seg-anomaly", "seg-uncertainty", "sc", "sr"}
    top = result.top_slices(3)
    assert len(by_kind(objects, "sc")) == len(top)

    source_paths = save_all(sources, tmp_path / "src", "src")
    result_paths = []
    for n, obj in enumerate(objects):
        ds = obj.dataset
        assert ds.Manufacturer == MANUFACTURER
        assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
        assert ds.PatientID == sources[0].PatientID and ds.AccessionNumber == sources[0].AccessionNumber
        assert ds.SeriesInstanceUID != sources[0].SeriesInstanceUID
        if obj.kind != "sr":
            assert ds.BodyPartExamined == "CHEST"
        path = tmp_path / "out" / f"{n:02d}-{obj.kind}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        result_paths.append(path)
        assert dciodvfy_errors(path) == [], f"{obj.kind}: dciodvfy errors"

    proc = subprocess.run(
        [str(require(DCENTVFY)), *map(str, source_paths), *map(str, result_paths)],
        capture_output=True,
        text=True,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert not [line for line in output.splitlines() if line.startswith("Error")], output

    seg_path = next(p for p in result_paths if p.name.endswith("-seg.dcm"))
    seg = hd.seg.segread(seg_path)
    assert seg.SegmentationType == "BINARY"
    segment = seg.SegmentSequence[0]
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentAlgorithmName == MODEL["name"]
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == MODEL["version"]
    with_findings = [k for k in range(len(sources)) if result.segmentation[k].any()]
    assert seg.NumberOfFrames == len(with_findings)  # frames only where there are findings
    mask = seg.get_pixels_by_source_instance(
        result.source_sop_instance_uids, segment_numbers=[1], assert_missing_frames_are_empty=True
    )[..., 0]
    np.testing.assert_array_equal(mask.astype(bool), result.segmentation)

    fractional = hd.seg.segread(next(p for p in result_paths if p.name.endswith("-seg-anomaly.dcm")))
    assert fractional.SegmentationType == "FRACTIONAL"
    level = fractional.get_pixels_by_source_instance(
        result.source_sop_instance_uids, segment_numbers=[1], assert_missing_frames_are_empty=True
    )[..., 0]
    expected = np.clip(result.anomaly_map / (2 * result.threshold), 0, 1)
    np.testing.assert_allclose(level, expected, atol=1 / 255 + 1e-6)

    for sc_path in (p for p in result_paths if p.name.endswith("-sc.dcm")):
        sc = hd.imread(sc_path)
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3
        assert sc.BurnedInAnnotation == "YES"
        assert sc.SeriesDescription == "AI anomaly heatmap - not for diagnostic use"
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in result.source_sop_instance_uids
    ranked = sorted(by_kind(objects, "sc"), key=lambda ds: ds.InstanceNumber)
    assert [ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in ranked] == [
        result.source_sop_instance_uids[k] for k in top
    ]

    sr_path = next(p for p in result_paths if p.name.endswith("-sr.dcm"))
    check_sr_readback(sr_path, result, sources, str(objects[0].dataset.SOPInstanceUID), top)


def test_uids_are_deterministic_per_job(tmp_path: Path) -> None:
    sources = make_ct_series(6, 32, 32)
    result = ct_result(sources)
    settings = ResultsSettings(heatmap_slices=2)
    first = write_results(result, sources, "job-1", settings, MODEL)
    again = write_results(result, sources, "job-1", settings, MODEL)
    other = write_results(result, sources, "job-2", settings, MODEL)
    uids = [(o.kind, o.dataset.SOPInstanceUID, o.dataset.SeriesInstanceUID) for o in first]
    assert uids == [(o.kind, o.dataset.SOPInstanceUID, o.dataset.SeriesInstanceUID) for o in again]
    assert not {u[1] for u in uids} & {o.dataset.SOPInstanceUID for o in other}
    assert len({u[1] for u in uids}) == len(uids)  # every object its own instance
    assert len({u[2] for u in uids}) == 3  # SEG, SC, SR series
    assert len({o.dataset.SeriesInstanceUID for o in first if o.kind == "sc"}) == 1


def test_negative_result_omits_seg_by_default(tmp_path: Path) -> None:
    sources = make_ct_series(6, 32, 32)
    result = ct_result(sources, positive=False)
    objects = write_results(result, sources, "job-neg", ResultsSettings(heatmap_slices=2), MODEL)
    assert [o.kind for o in objects] == ["sc", "sc", "sr"]
    sr = by_kind(objects, "sr")[0]
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    report = hd.sr.srread(path).content
    study = report.get_image_measurement_groups()[0]
    (finding,) = study.get_qualitative_evaluations(name=hd.sr.CodedConcept("404684003", "SCT", "Finding"))
    assert finding.value.value == "272519000"  # Absent
    check_sr_readback(path, result, sources, None, result.top_slices(2))


def test_negative_result_with_empty_seg_configured(tmp_path: Path) -> None:
    sources = make_ct_series(5, 32, 32)
    result = ct_result(sources, positive=False)
    objects = write_results(result, sources, "job-neg", ResultsSettings(heatmap_slices=1, empty_seg=True), MODEL)
    seg = by_kind(objects, "seg")[0]
    assert seg.NumberOfFrames == len(sources)  # highdicom cannot omit every frame: all are kept, all zero
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    assert not hd.seg.segread(path).get_pixels_by_source_instance(result.source_sop_instance_uids).any()


def test_seg_all_slices_and_all_heatmaps(tmp_path: Path) -> None:
    sources = make_ct_series(6, 32, 32)
    result = ct_result(sources)
    objects = write_results(result, sources, "j", ResultsSettings(heatmap_slices=0, seg_all_slices=True), MODEL)
    assert by_kind(objects, "seg")[0].NumberOfFrames == len(sources)
    assert len(by_kind(objects, "sc")) == len(sources)


def test_laterality_copied_when_present() -> None:
    source = make_dx(64, 64)
    source.Laterality = "R"
    objects = write_results(dx_result(source), [source], "j", ResultsSettings(), MODEL)
    assert {o.dataset.get("Laterality") for o in objects if o.kind != "sr"} == {"R"}


@pytest.mark.parametrize(("orientation", "written"), [(None, ""), (["P", "FL"], ["P", "FL"]), (["A", "F"], ["A", "F"])])
def test_heatmap_keeps_an_empty_or_compound_patient_orientation(
    tmp_path: Path, orientation: list[str] | None, written: object
) -> None:
    """Type 2 for a radiograph: empty when unknown (common on CR), compound letters for oblique views."""
    source = make_cr(64, 64)
    source.PatientOrientation = orientation
    (sc,) = by_kind(write_results(dx_result(source), [source], "j", ResultsSettings(heatmap_slices=1), MODEL), "sc")
    assert "PatientOrientation" in sc and (sc.PatientOrientation or "") == written  # empty reads back as None
    (path,) = save_all([sc], tmp_path, "sc")
    assert dciodvfy_errors(path) == []


def test_ct_without_slice_thickness_still_gets_its_report(tmp_path: Path) -> None:
    sources = make_ct_series(6, 32, 32)
    result = ct_result(sources)
    for ds in sources:
        ds.SliceThickness = None  # Type 2: present, empty
    objects = write_results(result, sources, "j", ResultsSettings(heatmap_slices=2), MODEL)
    assert [o.kind for o in objects][-1] == "sr"
    assert all(dciodvfy_errors(p) == [] for p in save_all([o.dataset for o in objects], tmp_path, "obj"))


def test_mismatched_sources_are_a_clear_error() -> None:
    sources = make_ct_series(4, 32, 32)
    result = ct_result(sources)
    with pytest.raises(ValueError, match="not among the given datasets"):
        write_results(result, sources[:3], "j", ResultsSettings(), MODEL)


def test_heatmap_overlays_colour_only_where_the_map_is_high() -> None:
    source = make_ct_series(1, 64, 64)[0]
    anomaly = np.zeros((64, 64), np.float32)
    anomaly[10:20, 10:20] = 1.0
    rgb = render_heatmap(source, anomaly, 1.0, HeatmapText(0.9, 0.9, "slice 1/1"))
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    from node.results.heatmap_render import HEADER_PIXELS, MIN_IMAGE_PIXELS

    scale = int(np.ceil(MIN_IMAGE_PIXELS / 64))
    image = rgb[HEADER_PIXELS:, : 64 * scale].astype(int)
    hot = image[15 * scale, 15 * scale]
    cold = image[40 * scale, 32 * scale]  # body tissue, no anomaly: plain grey
    assert hot[0] - hot[2] > 40  # inferno's top end is yellow-white: red well above blue
    assert cold[0] == cold[1] == cold[2]
    header = rgb[:HEADER_PIXELS]
    assert (header > 100).any()  # burned-in text is there


def test_results_settings_keys_and_defaults(tmp_path: Path) -> None:
    from node.config import load_settings

    settings = load_settings(None)
    assert settings.results.heatmap_slices == 5 and settings.results.empty_seg is False
    toml = tmp_path / "edgenode.toml"
    toml.write_text("[results]\nempty_seg = true\n")
    assert load_settings(toml).results.empty_seg is True


def test_large_radiograph_heatmap_is_reduced_to_an_overview() -> None:
    from node.results.heatmap_render import BAR_PIXELS, HEADER_PIXELS, MAX_IMAGE_PIXELS

    source = make_dx(1100, 900)
    anomaly = np.zeros((1100, 900), np.float32)
    anomaly[500:520, 400:420] = 1.0
    rgb = render_heatmap(source, anomaly, 1.0, HeatmapText(0.5, 0.5, "image"), anomaly > 0.5)
    assert rgb.shape == (550 + HEADER_PIXELS, 450 + BAR_PIXELS, 3)
    assert max(rgb.shape[:2]) <= MAX_IMAGE_PIXELS + max(HEADER_PIXELS, BAR_PIXELS)
    spot = rgb[HEADER_PIXELS + 255, 205].astype(int)
    assert spot[0] - spot[2] > 40  # the small finding survives the reduction (block max)


def test_series_renderer_draws_the_same_pixels_as_a_figure_per_image() -> None:
    """One figure per series, redrawn per image (blitting), gives exactly the old figure-per-image pixels: with
    and without contours, in any order, for CT slices and for reduced (large) and upscaled (small) radiographs."""
    from tests import heatmap_reference as reference

    sources = make_ct_series(6, 96, 96, seed=4)
    result = ct_result(sources)
    vmax = float(result.anomaly_map.max())
    renderer = HeatmapRenderer(vmax)
    for k in (3, 0, 2, 3, 5):  # contour, none, contour, again, none
        text = HeatmapText(float(result.slice_scores[k]), result.study_score, f"slice {k + 1}/6")
        anomaly, segmentation = result.anomaly_map[k], result.segmentation[k]
        expected = reference.render_heatmap(sources[k], anomaly, vmax, text, segmentation)
        assert np.array_equal(renderer.render(sources[k], anomaly, text, segmentation), expected)
    rng = np.random.default_rng(3)
    for source in (make_dx(2100, 1900, monochrome1=True, seed=1), make_dx(200, 150, seed=2)):
        anomaly = rng.random((source.Rows, source.Columns), dtype=np.float32) ** 3
        for vmax, segmentation in ((0.8, anomaly > 0.9), (0.0, None)):
            text = HeatmapText(0.5, 0.7, "image")
            expected = reference.render_heatmap(source, anomaly, vmax, text, segmentation)
            assert np.array_equal(render_heatmap(source, anomaly, vmax, text, segmentation), expected)


def test_report_names_each_image_by_the_number_the_viewer_shows(tmp_path: Path) -> None:
    sources = make_ct_series(8, 32, 32, shuffle_instance_numbers=True)  # numbering unrelated to position
    result = ct_result(sources)
    (sr,) = by_kind(write_results(result, sources, "j", ResultsSettings(heatmap_slices=3), MODEL), "sr")
    (path,) = save_all([sr], tmp_path, "sr")
    number_of = {str(ds.SOPInstanceUID): int(ds.InstanceNumber) for ds in sources}
    groups = [g for g in hd.sr.srread(path).content.get_image_measurement_groups() if g.tracking_identifier != "Study"]
    assert len(groups) == 3
    for group in groups:
        assert group.tracking_identifier == f"Image {number_of[group.source_images[0].referenced_sop_instance_uid]}"


def not_analysed_texts(path: Path) -> list[str]:
    """The report's "Source image not analysed" TEXT items (in its Qualitative Evaluations container)."""
    report = hd.sr.srread(path).ContentSequence
    (container,) = [item for item in report if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    return [
        item.TextValue for item in container.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "EN005"
    ]


@pytest.mark.parametrize("modality", ["CT", "DX"])
def test_report_names_the_instances_left_out_and_stays_valid(tmp_path: Path, modality: str) -> None:
    from inference.volume import LeftOutInstance

    if modality == "CT":
        series = make_ct_series(7, 32, 32)
        left, sources = series[3], series[:3] + series[4:]
        result = ct_result(sources)
    else:
        left, source = make_dx(64, 64, seed=1), make_dx(64, 64, seed=2)
        sources = [source]
        result = dx_result(source)
    result.left_out = [
        LeftOutInstance(
            Path("x.dcm"), str(left.SOPInstanceUID), "SOP Instance ...: RLE ...", "pixel data cannot be decoded"
        ),
        LeftOutInstance(Path("1.2.3.dcm"), None, "1.2.3.dcm is not a readable DICOM file", "not a readable DICOM file"),
    ]
    objects = write_results(
        result, [*sources, left], "job-left", ResultsSettings(heatmap_slices=2, empty_seg=True), MODEL
    )
    paths = save_all([o.dataset for o in objects], tmp_path, "obj")
    assert all(dciodvfy_errors(p) == [] for p in paths)
    sr_path = paths[[o.kind for o in objects].index("sr")]
    assert not_analysed_texts(sr_path) == [
        f"SOP Instance {left.SOPInstanceUID}: pixel data cannot be decoded",
        "File 1.2.3.dcm: not a readable DICOM file",
    ]
    check_sr_readback(sr_path, result, sources, str(by_kind(objects, "seg")[0].SOPInstanceUID), result.top_slices(2))
    seg = by_kind(objects, "seg")[0]
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == {str(ds.SOPInstanceUID) for ds in sources}  # the left-out image is not a SEG source
    sr = by_kind(objects, "sr")[0]
    evidence = {
        str(item.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert str(left.SOPInstanceUID) not in evidence
    assert "Synthetic" not in " ".join(not_analysed_texts(sr_path))


def test_report_without_left_out_instances_has_no_such_container(tmp_path: Path) -> None:
    sources = make_ct_series(4, 32, 32)
    (sr,) = by_kind(write_results(ct_result(sources), sources, "j", ResultsSettings(heatmap_slices=1), MODEL), "sr")
    assert not [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]


def test_derived_uids_are_those_earlier_releases_wrote() -> None:
    """A job re-run after an upgrade writes the same SOP Instance UIDs, so the PACS replaces its copy, not adds one
    (the values are those of the single-module writer)."""
    root = "1.2.826.0.1.3680043.8.498."
    assert derive_uid("job-1", "1.2.3", ResultKind.SR) == root + "11229348510581099811788107308056516992"
    assert derive_uid("job-1", "1.2.3", ResultKind.SC, 4) == root + "15263421295929717594794751747395614827"
    series = derive_uid("job-7-2", "1.2.840.5", f"{ResultKind.SEG}-series")
    assert series == root + "32868657787111351880953378518602990940"


def test_model_identity_from_a_dict_or_a_model_info() -> None:
    class Info:
        name, version = "ct-chest", "ct-chest-0123456789ab"

    assert ModelIdentity.of({"model_id": "tiny-0123456789ab"}, "x") == ModelIdentity("tiny", "tiny-0123456789ab")
    assert ModelIdentity.of(Info(), "x") == ModelIdentity("ct-chest", "ct-chest-0123456789ab")
    assert ModelIdentity.of({}, "fallback-00ff") == ModelIdentity("fallback", "fallback-00ff")


@pytest.mark.parametrize(
    ("cosines", "letters"),
    [
        ([1, 0, 0, 0, 1, 0], ("L", "P")),  # axial, as scanned
        ([-1, 0, 0, 0, -1, 0], ("R", "A")),  # axial, rotated by 180 degrees
        ([1, 0, 0, 0, 0, -1], ("L", "F")),  # coronal
        ([0, 1, 0, 0.1, 0, -0.99], ("P", "F")),  # sagittal, slightly oblique: the dominant axis
    ],
)
def test_heatmap_orientation_letters_follow_the_source_direction_cosines(
    cosines: list[float], letters: tuple[str, str]
) -> None:
    source = Dataset()
    source.ImageOrientationPatient = cosines
    assert patient_orientation(source) == letters
    source.PatientOrientation = ["A", "FL"]  # given by the source: kept as is
    assert patient_orientation(source) == ("A", "FL")
