"""Small, valid DICOM test inputs made in code (no patient data): CT series and chest radiographs.

The anatomy is a crude chest (body ellipse, two air-filled lungs, a spine) so that loaders, lung masks
and writers have something realistic enough to work on. Full phantoms live in inference/phantoms.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)


def chest_slice_hu(rows: int, cols: int, z: float = 0.0) -> np.ndarray:
    """An axial chest-like slice in HU: air outside, soft tissue body, two lungs, bone spine."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy, cx = rows / 2, cols / 2
    img = np.full((rows, cols), -1000.0, np.float32)
    body = ((yy - cy) / (0.38 * rows)) ** 2 + ((xx - cx) / (0.46 * cols)) ** 2 <= 1
    img[body] = 40.0
    shrink = 1.0 - 0.5 * abs(z)  # lungs taper towards the ends of the volume (z in [-1, 1])
    for side in (-1, 1):
        lung = ((yy - cy * 0.95) / (0.26 * rows * shrink)) ** 2 + (
            (xx - cx - side * 0.21 * cols) / (0.15 * cols * shrink)
        ) ** 2 <= 1
        img[lung & body] = -850.0
    spine = ((yy - cy * 1.55) / (0.06 * rows)) ** 2 + ((xx - cx) / (0.06 * cols)) ** 2 <= 1
    img[spine] = 700.0
    return img


def _base_dataset(
    sop_class: str,
    modality: str,
    study_uid: str,
    series_uid: str,
    patient_id: str,
    accession: str,
    series_number: int,
    instance_number: int,
) -> Dataset:
    now = datetime(2026, 11, 1, 9, 30, 0)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19600101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = now.strftime("%Y%m%d")
    ds.StudyTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = accession
    ds.StudyDescription = "CHEST"
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"{modality} CHEST"
    ds.BodyPartExamined = "CHEST"
    ds.Manufacturer = "edgenode-tests"
    ds.InstanceNumber = instance_number
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    return ds


def make_ct_series(
    n_slices: int = 8,
    rows: int = 64,
    cols: int = 64,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "PAT001",
    accession: str = "ACC001",
    spacing: float = 0.7,
    thickness: float = 2.5,
    series_number: int = 1,
    shuffle_instance_numbers: bool = False,
    seed: int = 0,
) -> list[Dataset]:
    """A CT Image Storage series in HU (slope 1, intercept -1024), feet-to-head positions."""
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    numbers = list(range(1, n_slices + 1))
    if shuffle_instance_numbers:
        rng.shuffle(numbers)
    out = []
    for k in range(n_slices):
        ds = _base_dataset(
            CTImageStorage, "CT", study_uid, series_uid, patient_id, accession, series_number, numbers[k]
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.PixelSpacing = [spacing, spacing]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-(cols * spacing) / 2, -(rows * spacing) / 2, -100.0 + k * thickness]
        ds.SliceThickness = thickness
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        z = (2 * k / max(n_slices - 1, 1)) - 1
        hu = chest_slice_hu(rows, cols, z) + rng.normal(0, 10, (rows, cols)).astype(np.float32)
        stored = np.clip(np.round(hu + 1024), 0, 4095).astype(np.uint16)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        ds.PixelData = stored.tobytes()
        out.append(ds)
    return out


def make_dx(
    rows: int = 128,
    cols: int = 128,
    *,
    study_uid: str | None = None,
    patient_id: str = "PAT002",
    accession: str = "ACC002",
    monochrome1: bool = False,
    seed: int = 0,
) -> Dataset:
    """A Digital X-Ray (for presentation) chest PA image; lungs dark (MONOCHROME2) unless monochrome1."""
    rng = np.random.default_rng(seed)
    ds = _base_dataset(
        DigitalXRayImageStorageForPresentation,
        "DX",
        study_uid or generate_uid(),
        generate_uid(),
        patient_id,
        accession,
        1,
        1,
    )
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.PixelSpacing = [0.5, 0.5]
    ds.DetectorType = "DIRECT"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    slice_hu = chest_slice_hu(rows, cols)
    attenuation = np.clip((slice_hu + 1000) / 1700, 0, 1)  # lungs dark, bone bright
    img = (attenuation * 3000 + 500 + rng.normal(0, 20, (rows, cols))).clip(0, 4095).astype(np.uint16)
    if monochrome1:
        img = (4095 - img).astype(np.uint16)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    ds.PixelIntensityRelationship = "LIN"
    ds.PixelIntensityRelationshipSign = 1
    ds.PixelData = img.tobytes()
    return ds


def write_datasets(datasets: Sequence[Dataset], folder: Path) -> list[Path]:
    """Write each dataset as <folder>/<n>.dcm (DICOM Part 10, with preamble)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ds in enumerate(datasets):
        path = folder / f"{n:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_undecodable(ds: Dataset) -> Dataset:
    """`ds` (changed in place) RLE Lossless compressed with its one frame overwritten by bytes of the same length:
    a well-formed instance (one fragment, the frame count it claims) whose pixel data no decoder can decode."""
    ds.compress(RLELossless, generate_instance_uid=False)
    (frame,) = generate_frames(ds.PixelData, number_of_frames=1)
    ds.PixelData = encapsulate([bytes([0xAB]) * len(frame)])
    return ds
