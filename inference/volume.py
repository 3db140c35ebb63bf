"""DICOM series -> volume + geometry, normalisation to [-1, 1], and the model grid and back.

CT: slices sorted by position along the slice normal (never by Instance Number), rescale slope/intercept to HU.
CR/DX: modality LUT, then the VOI LUT or window when present, to [0, 1] with bright = dense (MONOCHROME1 inverted);
frontal views only (a lateral, oblique or decubitus view is left out, saying so: `check_view`).
Compressed transfer syntaxes are decoded by pydicom's pixel handlers with permissively licensed plugins only
(pylibjpeg-openjpeg: JPEG 2000, pylibjpeg-rle: RLE, pyjpegls: JPEG-LS, python-gdcm: JPEG baseline/extended/lossless;
GPLv3 pylibjpeg-libjpeg is deliberately not used, see docs/method.md).

Slices stay 1:1 with the source images: the model grid only resamples in-plane (pad to square, resize), so any
map computed on it maps back exactly onto slice k = source_sop_instance_uids[k].

Errors are SeriesError subclasses whose messages name the SOP Instance UID (never patient identity).

One damaged instance does not cost the series: an instance that cannot be read, carries no usable pixel data or
plane geometry, or cannot be decoded is left out of the volume and reported in `Volume.left_out` with the reason.
The geometry stays true: every slice keeps its own position, and `Volume.slots` places each slice on the series'
regular slice grid, so a left-out slice in the middle is a gap (which `fill_left_out_slices` interpolates for
the 3D steps of the analysis), never a silent shift. Gaps of more than MAX_FILLED_SLICES consecutive slices are
not bridged: the longest contiguous part is analysed and the slices beyond the gap are left out too. What makes
a series no volume at all (mixed series, sizes or orientations, duplicate positions, gaps that no left-out
instance accounts for) still fails the whole series.
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
MAX_FILLED_SLICES = 2  # left-out slices in a row that are interpolated; a longer gap splits the volume


class SeriesError(ValueError):
    """A series that cannot be turned into a volume; the message says which instance and what to do."""

    summary = "cannot be loaded"  # what a report says about a left-out instance (no paths, no advice)

    def __init__(self, message: str, sop_instance_uid: str | None = None) -> None:
        super().__init__(message)
        self.sop_instance_uid = sop_instance_uid


class NotDicomError(SeriesError):
    summary = "not a readable DICOM file"


class UnsupportedSOPClassError(SeriesError):
    summary = "not a supported greyscale CT, CR or DX image"


class MissingPixelDataError(SeriesError):
    summary = "no pixel data"


class MultiFrameError(SeriesError):
    summary = "multi-frame image"


class PixelDecodeError(SeriesError):
    summary = "pixel data cannot be decoded"


class TooFewInstancesError(SeriesError):
    """Too few of the series' instances can be loaded to analyse it (see `load_series`'s min_ct_slices)."""


class MixedSeriesError(SeriesError):
    pass


class InconsistentGeometryError(SeriesError):
    summary = "missing or inconsistent image geometry"


class InvalidWindowError(SeriesError):
    """The VOI window the image prescribes cannot be applied."""

    summary = "invalid VOI window"


class UnsupportedViewError(SeriesError):
    """A radiograph that is not a frontal (PA/AP) view: not analysed, by design (see `check_view`)."""

    summary = "not a frontal (PA/AP) chest radiograph"


# Errors that concern one instance only: it is left out and the rest of the series is loaded.
INSTANCE_ERRORS: tuple[type[SeriesError], ...] = (
    NotDicomError,
    UnsupportedSOPClassError,
    MissingPixelDataError,
    MultiFrameError,
    PixelDecodeError,
    InvalidWindowError,
    UnsupportedViewError,
)


@dataclass(frozen=True)
class LeftOutInstance:
    """A file of the series that is not in the volume: why (`reason`, the full message naming the SOP Instance
    UID; `summary`, a short phrase for reports) and where it is. The UID is None when the file is unreadable."""

    path: Path
    sop_instance_uid: str | None
    reason: str
    summary: str

    @classmethod
    def of(cls, path: Path, error: SeriesError) -> LeftOutInstance:
        return cls(path, error.sop_instance_uid, str(error), error.summary)


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
    left_out: list[LeftOutInstance] = field(default_factory=list)  # files of the series not in the volume, and why
    # Slot of each slice on the series' regular slice grid (first slice 0), when left-out slices leave gaps
    # between them; None when the slices are contiguous.
    slots: np.ndarray | None = None

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


def _header_uid(path: Path) -> str | None:
    """The SOP Instance UID of a file whose full read failed, if its header is readable at all."""
    try:
        uid = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).get("SOPInstanceUID")
    except Exception:  # noqa: BLE001 - unreadable: the caller reports the file by its path
        return None
    return str(uid) if uid else None


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:  # damaged: unreadable
        uid = _header_uid(path)
        named = f"SOP Instance {uid} ({path})" if uid else str(path)
        raise NotDicomError(f"{named} is not a readable DICOM file ({exc}); remove it from the series", uid) from exc


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


# ViewPosition values (and View Code Sequence meanings) of radiographs that are not frontal chest views
NON_FRONTAL_VIEWS = frozenset({"LL", "RL", "LAT", "LATERAL", "RLD", "LLD", "RLO", "LLO", "OBL", "OBLIQUE"})
NON_FRONTAL_WORDS = ("lateral", "oblique", "decubitus")


def check_view(ds: Dataset) -> None:
    """CR/DX: frontal views only; a lateral, oblique or decubitus view raises UnsupportedViewError.

    Why: the radiograph models are trained on PA chest radiographs, and the lung-field condition looks for two
    lung fields side by side; on a lateral view the lungs overlap and the heart and spine lie elsewhere, so a map
    would mean nothing. ViewPosition (or, without one, the View Code Sequence) decides; an image that names no
    view is taken as frontal (many CR images carry none).
    """
    view = str(ds.get("ViewPosition", "") or "").strip().upper()
    meanings = [str(item.get("CodeMeaning", "")).lower() for item in ds.get("ViewCodeSequence", None) or []]
    said = view or "; ".join(meanings)
    if view in NON_FRONTAL_VIEWS or any(word in said.lower() for word in NON_FRONTAL_WORDS):
        uid = _uid(ds)
        raise UnsupportedViewError(
            f"SOP Instance {uid}: {said} view; only frontal (PA/AP) chest radiographs are analysed "
            f"(the radiograph models are trained on PA views)",
            uid,
        )


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


def _sort_ct(
    datasets: list[Dataset], unplaced: int = 0
) -> tuple[list[int], np.ndarray, np.ndarray, float | None, np.ndarray]:
    """Order by position along the normal; check orientation and spacing. Returns order, positions, iop, gap and
    each slice's slot on the regular slice grid.

    A gap of a whole number of slice spacings is accepted only while `unplaced` (left-out files whose position
    is unknown) can account for the missing slices; any other irregular gap is an error, as a series with
    slices that never arrived must not be analysed as if it were complete.
    """
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
        return order, positions[order], iops[0], None, np.zeros(len(order), dtype=np.int64)
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
    # With files of unknown position some gaps may be double: the smallest gap is then the better estimate of the
    # spacing (with a single gap nothing tells a double one apart; 2 slices are below any sensible min_ct_slices).
    step = min(median, float(gaps.min())) if unplaced else median
    steps = np.ones(len(gaps), dtype=np.int64)
    for k, gap in enumerate(gaps):
        m = max(1, int(round(gap / step)))
        regular = abs(gap - m * step) <= SPACING_TOLERANCE * m * step + 0.01
        if regular and 1 < m <= unplaced + 1:
            unplaced -= m - 1  # left-out files of unknown position were these slices
            steps[k] = m
        elif not regular or m > 1:
            uid = _uid(datasets[order[k + 1]])
            raise InconsistentSpacingError(
                f"SOP Instance {uid}: slice gap {gap:.3f} mm to SOP Instance {_uid(datasets[order[k]])} differs "
                f"from the series' {step:.3f} mm (missing or extra slices?); resend the complete series",
                uid,
            )
    slots = np.concatenate([[0], np.cumsum(steps)])
    return order, positions[order], iops[0], step, slots


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


class BeyondGapError(SeriesError):
    summary = "separated from the analysed slices by a gap of left-out slices"


def _nothing_loadable(errors: list[SeriesError], total: int) -> SeriesError:
    """The error for a series none of whose instances can be loaded: a single file's own error, else a summary."""
    if len(errors) == 1:
        return errors[0]
    shown = "; ".join(str(e) for e in errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
    message = f"none of the series' {total} instances can be loaded: {shown}"
    return TooFewInstancesError(message, errors[0].sop_instance_uid)


def _longest_run(slots: np.ndarray) -> tuple[int, int]:
    """[start, stop) of the longest run of slices whose gaps MAX_FILLED_SLICES interpolated slices can bridge."""
    breaks = np.flatnonzero(np.diff(slots) - 1 > MAX_FILLED_SLICES) + 1
    bounds = np.concatenate([[0], breaks, [len(slots)]])
    best = int(np.argmax(np.diff(bounds)))  # the first of equally long runs
    return int(bounds[best]), int(bounds[best + 1])


def load_series(files: Sequence[Path], *, min_ct_slices: int = 1) -> Volume:
    """Read one series' files into a Volume (see the module docstring for what is checked and what left out).

    Raises TooFewInstancesError when fewer than `min_ct_slices` CT slices (or no radiograph) remain.
    """
    if not files:
        raise SeriesError("no files given for the series")
    total = len(files)
    left_out: list[LeftOutInstance] = []
    errors: list[SeriesError] = []

    def leave_out(path: Path, error: SeriesError) -> None:
        left_out.append(LeftOutInstance.of(path, error))
        errors.append(error)

    paths: list[Path] = []
    datasets: list[Dataset] = []
    modalities: list[str] = []
    for path in map(Path, files):
        try:
            ds = _read(path)
            modality = _check_instance(ds)
            if modality != "CT":
                check_view(ds)
        except INSTANCE_ERRORS as exc:
            leave_out(path, exc)
            continue
        paths.append(path)
        datasets.append(ds)
        modalities.append(modality)
    if not datasets:
        raise _nothing_loadable(errors, total)
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

    positions = orientation = slots = None
    slice_spacing = None
    if modality == "CT":
        _check_same(datasets, "PixelSpacing", InconsistentGeometryError, "in-plane spacing must not vary")
        placed = []
        for i, ds in enumerate(datasets):  # a slice without usable plane geometry cannot be placed: left out
            try:
                _floats(ds, "ImageOrientationPatient", 6)
                _floats(ds, "ImagePositionPatient", 3)
            except InconsistentGeometryError as exc:
                leave_out(paths[i], exc)
                continue
            placed.append(i)
        if not placed:
            raise _nothing_loadable(errors, total)
        datasets, paths = [datasets[i] for i in placed], [paths[i] for i in placed]
        # Files left out so far have no known position: the gaps they leave are accepted, no others.
        order, positions, orientation, slice_spacing, slots = _sort_ct(datasets, unplaced=len(left_out))
    else:
        order = sorted(range(len(datasets)), key=lambda i: int(datasets[i].get("InstanceNumber", 0) or 0))
    datasets = [datasets[i] for i in order]
    paths = [paths[i] for i in order]

    first = datasets[0]
    pixels = np.empty((len(datasets), int(first.Rows), int(first.Columns)), dtype=np.float32)
    kept: list[int] = []
    for k, ds in enumerate(datasets):  # straight into one float32 volume: no per-slice list, stack and copy
        try:
            raw = _decode(ds)
            if modality == "CT":
                _modality_values_into(pixels[len(kept)], raw, ds)
            else:
                pixels[len(kept)] = radiograph_intensity(raw, ds)
        except (PixelDecodeError, InvalidWindowError) as exc:
            leave_out(paths[k], exc)
            continue
        kept.append(k)
    if not kept:
        raise _nothing_loadable(errors, total)
    if positions is not None and slots is not None:
        positions, slots = positions[kept], slots[kept]
        start, stop = _longest_run(slots)
        gap = f"more than {MAX_FILLED_SLICES} left-out slices in a row are not bridged; resend the series"
        for k in [*kept[:start], *kept[stop:]]:
            uid = _uid(datasets[k])
            leave_out(paths[k], BeyondGapError(f"SOP Instance {uid}: not analysed, {gap}", uid))
        kept, positions, slots = kept[start:stop], positions[start:stop], slots[start:stop] - slots[start]
        pixels = pixels[start:stop]
        slots = None if int(slots[-1]) == len(slots) - 1 else slots
    pixels = pixels[: len(kept)]  # a view: left-out slices only shortened it
    datasets = [datasets[k] for k in kept]
    paths = [paths[k] for k in kept]
    if modality == "CT" and len(datasets) < min_ct_slices:
        reasons = "; ".join(f"{item.sop_instance_uid or item.path.name}: {item.summary}" for item in left_out[:5])
        raise TooFewInstancesError(
            f"only {len(datasets)} of the series' {total} instances can be analysed as one CT volume, fewer than "
            f"the {min_ct_slices} needed (inference.min_ct_slices)" + (f"; left out: {reasons}" if reasons else ""),
            left_out[0].sop_instance_uid if left_out else None,
        )
    first = datasets[0]
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
        left_out=left_out,
        slots=slots,
    )


def fill_left_out_slices(pixels: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """The slices on their regular grid: slice k at slots[k], each gap filled by linear interpolation between the
    slices either side of it. Only the 3D steps of the analysis see the filled slices; nothing reports them."""
    out = np.empty((int(slots[-1]) + 1, *pixels.shape[1:]), dtype=pixels.dtype)
    out[slots] = pixels
    for k in range(len(slots) - 1):
        a, b = int(slots[k]), int(slots[k + 1])
        for slot in range(a + 1, b):
            w = (slot - a) / (b - a)
            out[slot] = (1.0 - w) * pixels[k] + w * pixels[k + 1]
    return out


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
