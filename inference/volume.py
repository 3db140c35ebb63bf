"""DICOM series -> volume + geometry, normalisation to [-1, 1], and the model grid and back.

CT: slices sorted by position along the slice normal (never by Instance Number), rescale slope/intercept to HU.
CR/DX: modality LUT, then the VOI LUT or window when present, to [0, 1] with bright = dense (MONOCHROME1 inverted).
Compressed transfer syntaxes are decoded by pydicom's pixel handlers with permissively licensed plugins only
(pylibjpeg-openjpeg: JPEG 2000, pylibjpeg-rle: RLE, pyjpegls: JPEG-LS, python-gdcm: JPEG baseline/extended/lossless;
GPLv3 pylibjpeg-libjpeg is deliberately not used, see docs/method.md).

Slices stay 1:1 with the source images: the model grid only resamples in-plane (pad to square, resize), so any
map computed on it maps back exactly onto slice k = source_sop_instance_uids[k].

Errors are SeriesError subclasses whose messages name the SOP Instance UID (never patient identity).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_rescale, apply_voi
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)

# SOP classes the node reads, and the modality each one implies.
SUPPORTED_SOP_CLASSES: dict[str, str] = {
    CTImageStorage: "CT",
    ComputedRadiographyImageStorage: "CR",
    DigitalXRayImageStorageForPresentation: "DX",
    DigitalXRayImageStorageForProcessing: "DX",
}
CT_WINDOW_HU = (-1000.0, 400.0)  # mapped linearly to [-1, 1] and clipped: air to soft tissue and lung detail
ORIENTATION_TOLERANCE = 1e-3  # direction cosines
SPACING_TOLERANCE = 0.05  # relative deviation of a slice gap from the median gap, plus 0.01 mm


class SeriesError(ValueError):
    """A series that cannot be turned into a volume; the message says which instance and what to do."""

    def __init__(self, message: str, sop_instance_uid: str | None = None) -> None:
        super().__init__(message)
        self.sop_instance_uid = sop_instance_uid


class NotDicomError(SeriesError):
    pass


class UnsupportedSOPClassError(SeriesError):
    pass


class MissingPixelDataError(SeriesError):
    pass


class MultiFrameError(SeriesError):
    pass


class PixelDecodeError(SeriesError):
    pass


class MixedSeriesError(SeriesError):
    pass


class InconsistentGeometryError(SeriesError):
    pass


class InvalidWindowError(SeriesError):
    """The VOI window the image prescribes cannot be applied."""


class MixedOrientationError(InconsistentGeometryError):
    pass


class InconsistentSpacingError(InconsistentGeometryError):
    pass


@dataclass
class Volume:
    """A series' pixels on the source grid with its geometry; slice k is source image sop_instance_uids[k]."""

    pixels: np.ndarray  # float32 (Z, Y, X): HU for CT, [0, 1] with bright = dense for CR/DX
    modality: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uids: list[str]
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) in mm
    slice_thickness: float  # mm (1.0 for radiographs without one)
    slice_spacing: float | None = None  # distance between slice positions along the normal; None for one slice
    positions: np.ndarray | None = None  # (Z, 3) ImagePositionPatient, CT only
    orientation: np.ndarray | None = None  # (6,) ImageOrientationPatient, CT only
    frame_of_reference_uid: str | None = None
    headers: list[Dataset] = field(default_factory=list)  # source datasets without PixelData, slice order
    paths: list[Path] = field(default_factory=list)  # source files, slice order

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.pixels.shape
        return z, y, x

    @property
    def normal(self) -> np.ndarray | None:
        if self.orientation is None:
            return None
        return np.cross(self.orientation[:3], self.orientation[3:])

    @property
    def voxel_volume_mm3(self) -> float:
        depth = self.slice_spacing if self.slice_spacing else self.slice_thickness
        return float(self.pixel_spacing[0] * self.pixel_spacing[1] * depth)


def _uid(ds: Dataset) -> str:
    return str(ds.get("SOPInstanceUID", "<no SOP Instance UID>"))


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError) as exc:
        raise NotDicomError(f"{path} is not a readable DICOM file ({exc}); remove it from the series") from exc


def _check_instance(ds: Dataset) -> str:
    """Validate one instance; returns the modality its SOP class implies."""
    uid = _uid(ds)
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in SUPPORTED_SOP_CLASSES:
        name = UID(sop_class).name if sop_class else "missing"
        raise UnsupportedSOPClassError(
            f"SOP Instance {uid}: SOP class {name} ({sop_class or 'none'}) is not a supported image "
            f"(supported: CT Image, CR Image, Digital X-Ray Image); route only image series to the node",
            uid,
        )
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise MissingPixelDataError(f"SOP Instance {uid}: no Pixel Data element; resend the complete instance", uid)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise MultiFrameError(
            f"SOP Instance {uid}: multi-frame image ({frames} frames) is not supported; send single-frame images",
            uid,
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise UnsupportedSOPClassError(
            f"SOP Instance {uid}: {ds.SamplesPerPixel} samples per pixel; only greyscale images are supported", uid
        )
    return SUPPORTED_SOP_CLASSES[sop_class]


def _decode(ds: Dataset) -> np.ndarray:
    uid = _uid(ds)
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom raises several types depending on the handler
        ts = ds.file_meta.get("TransferSyntaxUID", "unknown") if hasattr(ds, "file_meta") else "unknown"
        name = UID(str(ts)).name
        raise PixelDecodeError(
            f"SOP Instance {uid}: cannot decode pixel data in transfer syntax {name} ({exc}); "
            f"check that the decoders in pyproject.toml are installed or send it uncompressed",
            uid,
        ) from exc


def _header(ds: Dataset) -> Dataset:
    header = Dataset()
    header.update({elem.tag: elem for elem in ds if elem.tag != 0x7FE00010})
    if hasattr(ds, "file_meta"):
        header.file_meta = ds.file_meta
    return header


def _window(arr: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """First VOI window (Part 3 C.11.2.1.2) to [0, 1]; None when no window is present."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    center = ds.WindowCenter
    width = ds.WindowWidth
    c = float(center[0] if isinstance(center, MultiValue) else center)
    w = float(width[0] if isinstance(width, MultiValue) else width)
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (arr - c) / w))
    if function == "LINEAR_EXACT":
        return np.clip((arr - c) / w + 0.5, 0.0, 1.0)
    if w < 1:
        raise InvalidWindowError(f"SOP Instance {_uid(ds)}: Window Width {w} < 1 is invalid", _uid(ds))
    if w == 1:
        return (arr > c - 0.5).astype(np.float64)
    return np.clip((arr - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)


def radiograph_intensity(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    """CR/DX stored values -> [0, 1], bright = dense: modality LUT, VOI LUT or window, MONOCHROME1 inverted.

    Without a VOI transform the 0.5 and 99.5 percentiles are stretched to [0, 1].
    """
    arr = apply_rescale(raw, ds).astype(np.float64)
    if ds.get("VOILUTSequence"):
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        out = apply_voi(np.rint(arr).astype(np.int64), ds).astype(np.float64) / (2**bits - 1)  # LUT indices
    else:
        windowed = _window(arr, ds)
        if windowed is not None:
            out = windowed
        else:
            lo, hi = np.percentile(arr, [0.5, 99.5])
            out = np.clip((arr - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip() == "MONOCHROME1":
        out = 1.0 - out
    return out.astype(np.float32)


def _floats(ds: Dataset, keyword: str, n: int) -> np.ndarray:
    value = ds.get(keyword)
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    try:
        if value is None or len(values) != n:
            raise ValueError(f"{len(values) if value is not None else 0} value(s) instead of {n}")
        return np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InconsistentGeometryError(
            f"SOP Instance {_uid(ds)}: {keyword} is missing or malformed ({exc}); CT slices need full plane geometry",
            _uid(ds),
        ) from None


def _spacing(ds: Dataset) -> tuple[float, float]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            spacing = (float(value[0]), float(value[1]))
            if keyword == "ImagerPixelSpacing":
                magnification = float(ds.get("EstimatedRadiographicMagnificationFactor", 1.0) or 1.0)
                spacing = (spacing[0] / magnification, spacing[1] / magnification)
            return spacing
    return (1.0, 1.0)


def _check_same(datasets: Sequence[Dataset], keyword: str, error: type[SeriesError], what: str) -> None:
    first = datasets[0].get(keyword)
    for ds in datasets[1:]:
        if ds.get(keyword) != first:
            raise error(
                f"SOP Instance {_uid(ds)}: {keyword} {ds.get(keyword)} differs from {first} in SOP Instance "
                f"{_uid(datasets[0])}; {what}",
                _uid(ds),
            )


def _sort_ct(datasets: list[Dataset]) -> tuple[list[int], np.ndarray, np.ndarray, float | None]:
    """Order by position along the normal; check orientation and spacing. Returns order, positions, iop, gap."""
    iops = [_floats(ds, "ImageOrientationPatient", 6) for ds in datasets]
    for ds, iop in zip(datasets[1:], iops[1:], strict=True):
        if np.abs(iop - iops[0]).max() > ORIENTATION_TOLERANCE:
            raise MixedOrientationError(
                f"SOP Instance {_uid(ds)}: Image Orientation {iop.tolist()} differs from {iops[0].tolist()} "
                f"(SOP Instance {_uid(datasets[0])}); split the series into one volume per orientation",
                _uid(ds),
            )
    positions = np.stack([_floats(ds, "ImagePositionPatient", 3) for ds in datasets])
    normal = np.cross(iops[0][:3], iops[0][3:])
    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    along = along[order]
    if len(order) < 2:
        return order, positions[order], iops[0], None
    gaps = np.diff(along)
    for k, gap in enumerate(gaps):
        if gap < 1e-3:
            uid = _uid(datasets[order[k + 1]])
            raise InconsistentSpacingError(
                f"SOP Instance {uid}: same slice position as SOP Instance {_uid(datasets[order[k]])}; "
                f"remove the duplicate or send the series without it",
                uid,
            )
    median = float(np.median(gaps))
    for k, gap in enumerate(gaps):
        if abs(gap - median) > SPACING_TOLERANCE * median + 0.01:
            uid = _uid(datasets[order[k + 1]])
            raise InconsistentSpacingError(
                f"SOP Instance {uid}: slice gap {gap:.3f} mm to SOP Instance {_uid(datasets[order[k]])} differs "
                f"from the series' {median:.3f} mm (missing or extra slices?); resend the complete series",
                uid,
            )
    return order, positions[order], iops[0], median


def _modality_values_into(out: np.ndarray, raw: np.ndarray, ds: Dataset) -> None:
    """out (float32) = pydicom's apply_rescale(raw, ds) rounded to float32 (HU for CT).

    apply_rescale computes in float64. With integer stored values of at most 16 bits and an integer slope and
    intercept whose results stay below 2**24 in magnitude, every value is an integer that float32 holds exactly,
    so computing in float32 gives the same numbers without a float64 slice; anything else goes through pydicom.
    """
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    exact = (
        slope not in (None, "")
        and intercept not in (None, "")
        and not ds.get("ModalityLUTSequence")
        and raw.dtype.kind in "iu"
        and raw.dtype.itemsize <= 2
    )
    if exact:
        slope, intercept = float(slope), float(intercept)
        largest = max(abs(int(np.iinfo(raw.dtype).min)), int(np.iinfo(raw.dtype).max))
        exact = slope.is_integer() and intercept.is_integer() and abs(slope) * largest + abs(intercept) < 2**24
    if exact:
        np.copyto(out, raw, casting="unsafe")  # exact: at most 16-bit integers
        if slope != 1.0:
            np.multiply(out, slope, out=out)
        if intercept != 0.0:
            np.add(out, intercept, out=out)
        return
    out[...] = apply_rescale(raw, ds)


def load_series(files: Sequence[Path]) -> Volume:
    """Read one series' files into a Volume (see the module docstring for what is checked)."""
    if not files:
        raise SeriesError("no files given for the series")
    paths = [Path(p) for p in files]
    datasets = [_read(p) for p in paths]
    modalities = [_check_instance(ds) for ds in datasets]
    for ds, modality in zip(datasets[1:], modalities[1:], strict=True):
        if str(ds.get("SeriesInstanceUID")) != str(datasets[0].get("SeriesInstanceUID")) or modality != modalities[0]:
            raise MixedSeriesError(
                f"SOP Instance {_uid(ds)} belongs to another series or modality than SOP Instance "
                f"{_uid(datasets[0])}; load each series separately",
                _uid(ds),
            )
    modality = modalities[0]
    _check_same(datasets, "Rows", InconsistentGeometryError, "all images of a series must have the same size")
    _check_same(datasets, "Columns", InconsistentGeometryError, "all images of a series must have the same size")

    positions = orientation = None
    slice_spacing = None
    if modality == "CT":
        _check_same(datasets, "PixelSpacing", InconsistentGeometryError, "in-plane spacing must not vary")
        order, positions, orientation, slice_spacing = _sort_ct(datasets)
    else:
        order = sorted(range(len(datasets)), key=lambda i: int(datasets[i].get("InstanceNumber", 0) or 0))
    datasets = [datasets[i] for i in order]
    paths = [paths[i] for i in order]

    first = datasets[0]
    pixels = np.empty((len(datasets), int(first.Rows), int(first.Columns)), dtype=np.float32)
    for k, ds in enumerate(datasets):  # straight into one float32 volume: no per-slice list, stack and copy
        raw = _decode(ds)
        if modality == "CT":
            _modality_values_into(pixels[k], raw, ds)
        else:
            pixels[k] = radiograph_intensity(raw, ds)
    thickness = float(first.get("SliceThickness", 0) or 0) or (slice_spacing or 1.0)
    return Volume(
        pixels=pixels,
        modality=modality,
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=str(first.get("SeriesInstanceUID", "")),
        sop_instance_uids=[_uid(ds) for ds in datasets],
        pixel_spacing=_spacing(first),
        slice_thickness=thickness,
        slice_spacing=slice_spacing,
        positions=positions,
        orientation=orientation,
        frame_of_reference_uid=str(first.FrameOfReferenceUID) if "FrameOfReferenceUID" in first else None,
        headers=[_header(ds) for ds in datasets],
        paths=paths,
    )


def normalise(pixels: np.ndarray, modality: str, out: np.ndarray | None = None) -> np.ndarray:
    """Source intensities -> [-1, 1]: CT window CT_WINDOW_HU linearly (clipped); CR/DX [0, 1] -> [-1, 1].

    The same float32 operations in the same order as the plain expression, but in one buffer (for an 80-slice
    CT, four fewer 80 MB temporaries); `out` (float32 input only) may be the input itself.
    """
    if pixels.dtype != np.float32:  # computed in the input's precision, rounded once at the end
        lo, hi = CT_WINDOW_HU
        wide = (pixels - lo) / (hi - lo) * 2.0 - 1.0 if modality == "CT" else pixels * 2.0 - 1.0
        return np.clip(wide, -1.0, 1.0).astype(np.float32)
    if modality == "CT":
        lo, hi = CT_WINDOW_HU
        out = np.subtract(pixels, lo, dtype=np.float32, out=out)
        np.divide(out, hi - lo, out=out)
        np.multiply(out, 2.0, out=out)
    else:
        out = np.multiply(pixels, 2.0, dtype=np.float32, out=out)
    np.subtract(out, 1.0, out=out)
    return np.clip(out, -1.0, 1.0, out=out)


@dataclass(frozen=True)
class GridMapping:
    """Source (rows, cols) <-> model grid (size, size): pad to a square of side max(rows, cols), centred, then
    resize. Pixel centres follow align_corners=False, so the inverse lands on the same physical positions."""

    rows: int
    cols: int
    size: int

    @property
    def side(self) -> int:
        return max(self.rows, self.cols)

    @property
    def pad_top(self) -> int:
        return (self.side - self.rows) // 2

    @property
    def pad_left(self) -> int:
        return (self.side - self.cols) // 2


def _resize(array: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    x = array[:, None]
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest-exact")[:, 0]
    antialias = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=antialias)[:, 0]


def resample_to_grid(array: np.ndarray, mapping: GridMapping, fill: float = 0.0, mode: str = "bilinear") -> np.ndarray:
    """(Z, rows, cols) on the source grid -> (Z, size, size) on the model grid."""
    if mapping.rows == mapping.cols:  # already square: resize it as it is, no padded copy
        square = np.ascontiguousarray(array, dtype=np.float32)
    else:
        z = array.shape[0]
        square = np.full((z, mapping.side, mapping.side), fill, dtype=np.float32)
        top, left = mapping.pad_top, mapping.pad_left
        square[:, top : top + mapping.rows, left : left + mapping.cols] = array
    out = _resize(torch.from_numpy(square), (mapping.size, mapping.size), mode)
    return out.numpy().astype(np.float32)


def from_model_grid(array: np.ndarray | torch.Tensor, mapping: GridMapping, mode: str = "bilinear") -> np.ndarray:
    """(Z, size, size) on the model grid -> (Z, rows, cols) float32 on the source grid (inverse of resample_to_grid)."""
    tensor = torch.as_tensor(np.asarray(array, dtype=np.float32))
    square = _resize(tensor, (mapping.side, mapping.side), mode).numpy()
    if mapping.rows == mapping.cols:
        return square  # nothing to crop: the resized array itself (float32, contiguous), not a copy of it
    top, left = mapping.pad_top, mapping.pad_left
    return np.ascontiguousarray(square[:, top : top + mapping.rows, left : left + mapping.cols])


def mask_to_grid(mask: np.ndarray, mapping: GridMapping) -> np.ndarray:
    """A boolean mask onto the model grid (area-weighted resample, then >= 0.5)."""
    return resample_to_grid(mask.astype(np.float32), mapping, 0.0) >= 0.5


def mask_from_grid(mask: np.ndarray, mapping: GridMapping) -> np.ndarray:
    """A boolean mask from the model grid back to the source grid (bilinear, then >= 0.5).

    Slices are resized independently, and an empty slice stays empty, so only the slices with a True pixel are
    resized (a segmentation usually has few).
    """
    mask = np.asarray(mask, dtype=bool)
    out = np.zeros((mask.shape[0], mapping.rows, mapping.cols), dtype=bool)
    hit = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
    if hit.size:
        out[hit] = from_model_grid(mask[hit].astype(np.float32), mapping) >= 0.5
    return out


def to_model_grid(volume: Volume, size: int) -> tuple[np.ndarray, GridMapping]:
    """The volume normalised to [-1, 1] on the (Z, size, size) model grid, padded with -1, and the mapping back."""
    _, rows, cols = volume.shape
    mapping = GridMapping(rows=rows, cols=cols, size=size)
    return resample_to_grid(normalise(volume.pixels, volume.modality), mapping, fill=-1.0), mapping


def to_model_grid_with_mask(
    volume: Volume, mask: np.ndarray, size: int, *, consume: bool = False
) -> tuple[np.ndarray, np.ndarray, GridMapping]:
    """to_model_grid and mask_to_grid together: the mask is converted to float32 in the normalised volume's buffer
    (free once the volume is resampled), which saves a volume-sized allocation. Same arrays as the two calls.

    `consume=True` (the caller needs no source intensities afterwards) normalises in the volume's own float32
    buffer and releases it: `volume.pixels` is then an empty (0, rows, cols) array, and the source-grid maps
    that the caller allocates next no longer sit beside a volume-sized copy of the input.
    """
    _, rows, cols = volume.shape
    mapping = GridMapping(rows=rows, cols=cols, size=size)
    if consume and volume.pixels.dtype == np.float32:
        scratch = normalise(volume.pixels, volume.modality, out=volume.pixels)
        volume.pixels = np.empty((0, rows, cols), np.float32)
    else:
        scratch = normalise(volume.pixels, volume.modality)
    grid = resample_to_grid(scratch, mapping, fill=-1.0)
    np.copyto(scratch, mask, casting="unsafe")  # 0.0 / 1.0, as mask.astype(np.float32)
    grid_mask = resample_to_grid(scratch, mapping, 0.0) >= 0.5
    return grid, grid_mask, mapping
