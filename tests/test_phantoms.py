"""Phantoms: exact masks, valid DICOM, reproducible seeds, variation between subjects."""

from __future__ import annotations

import subprocess

import numpy as np
import pydicom
import pytest

from inference.phantoms import (
    LESION_KINDS,
    _lung_contains_point,
    draw_subject,
    lung_contains,
    make_ct,
    radiograph_dataset,
    synthetic_study,
    write_study,
)
from inference.radiograph_phantoms import make_radiograph
from tests.conftest import DCIODVFY, edgenode_cmd, node_env, require


@pytest.mark.parametrize("kind", LESION_KINDS)
def test_ct_lesion_changes_voxels_only_inside_its_mask(kind: str) -> None:
    ph = make_ct(11, 96, 96, 24, kind, keep_ideal=True)
    assert ph.lesions, "a lesion case must contain a lesion"
    assert ph.lesion_mask.any()
    diff = ph.ideal_hu != ph.ideal_healthy_hu
    assert not (diff & ~ph.lesion_mask).any()  # nothing changes outside the mask
    assert diff[ph.lesion_mask].all()  # every mask voxel changed
    assert not (ph.lesion_mask & ~ph.lung_mask).any()  # lesions are in the lungs
    assert sum(les.voxels for les in ph.lesions) >= ph.lesion_mask.sum()


def test_the_trees_point_test_answers_as_the_lung_mask_does() -> None:
    """The branching trees use a scalar copy of `lung_contains` for speed; both must agree everywhere."""
    for seed in range(5):
        sub = draw_subject(np.random.default_rng(seed))
        pts = np.random.default_rng(100 + seed).uniform(-220, 320, size=(3000, 3))
        grid_answer = lung_contains(sub, pts[:, 0], pts[:, 1], pts[:, 2])
        point_answers = [_lung_contains_point(sub, float(x), float(y), float(z)) for x, y, z in pts]
        assert grid_answer.any() and not grid_answer.all()
        np.testing.assert_array_equal(grid_answer, point_answers)


def test_healthy_case_has_empty_mask_and_lungs() -> None:
    ph = make_ct(12, 64, 64, 16, "none")
    assert not ph.lesion_mask.any()
    assert 0.03 < ph.lung_mask.mean() < 0.4
    lung_hu = ph.hu[ph.lung_mask].mean()
    assert -950 < lung_hu < -650  # aerated lung, with vessels
    assert ph.hu.min() >= -1024 and ph.hu.max() > 300  # bone present


def test_seeds_reproducible_and_subjects_vary() -> None:
    a = make_ct(3, 64, 64, 12, "mixed")
    b = make_ct(3, 64, 64, 12, "mixed")
    c = make_ct(4, 64, 64, 12, "mixed")
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.lesion_mask, b.lesion_mask)
    assert np.abs(a.hu - c.hu).mean() > 20
    assert a.lung_mask.sum() != c.lung_mask.sum()
    rx1, rx2 = make_radiograph(3, 64, 64), make_radiograph(3, 64, 64)
    np.testing.assert_array_equal(rx1.image, rx2.image)
    assert np.abs(rx1.image - make_radiograph(4, 64, 64).image).mean() > 0.02


@pytest.mark.parametrize("modality", ["ct", "dx", "cr"])
def test_written_dicom_passes_dciodvfy(tmp_path, modality: str) -> None:
    require(DCIODVFY)
    folder = write_study(tmp_path, modality, seed=2, index=0, lesions="nodule", size=64, slices=6)
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == (6 if modality == "ct" else 1)
    for path in files[:2]:
        proc = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True)
        errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], errors
    truth = np.load(folder / "ground_truth.npz")
    ds = pydicom.dcmread(files[0])
    assert truth["lesion_mask"].shape[1:] == (ds.Rows, ds.Columns)
    assert ds.Modality == modality.upper()
    assert ds.PatientName.family_name == "PHANTOM"
    if modality == "ct":
        assert truth["lesion_mask"].shape[0] == 6
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert hu.min() >= -1024
        z = [float(pydicom.dcmread(p).ImagePositionPatient[2]) for p in files]
        assert np.all(np.diff(z) > 0)


def test_a_lateral_radiograph_passes_dciodvfy_and_says_its_view(tmp_path) -> None:
    require(DCIODVFY)
    ds = radiograph_dataset(make_radiograph(2, 64, 64, view="LL"), synthetic_study(2, 0), "DX")
    path = tmp_path / "lateral.dcm"
    ds.save_as(path, enforce_file_format=True)
    proc = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], errors
    back = pydicom.dcmread(path)
    assert back.ViewPosition == "LL" and list(back.PatientOrientation) == ["P", "F"]
    assert 70 <= int(back.KVP) <= 125  # the drawn tube voltage


def test_phantoms_command_writes_studies(tmp_path) -> None:
    proc = subprocess.run(
        edgenode_cmd(
            "phantoms",
            str(tmp_path),
            "--modality",
            "ct",
            "--count",
            "2",
            "--size",
            "48",
            "--slices",
            "4",
            "--lesions",
            "none",
            "--seed",
            "9",
        ),
        env=node_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    studies = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(studies) == 2
    uids = {pydicom.dcmread(next(s.glob("*.dcm"))).StudyInstanceUID for s in studies}
    assert len(uids) == 2
