"""Render a secondary-capture result file (RGB heatmap overlay) as PNG for the study page.

The SC objects the node sends are the source of truth; the PNG is made on request, never stored.
Multi-frame objects render one frame (`frame`) or, by default, all frames tiled in a grid.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from node.spool import contained_path


class HeatmapError(Exception):
    """The file is missing, outside the spool or has no renderable pixels."""


def spool_file(spool_dir: Path, relative: str) -> Path:
    """The spool file at `relative`, refusing any path that escapes the spool directory."""
    try:
        path = contained_path(spool_dir.resolve(), relative)
    except ValueError as exc:
        raise HeatmapError(f"result path {relative!r} is outside the spool") from exc
    if not path.is_file():
        raise HeatmapError(f"result file {relative!r} is no longer in the spool")
    return path


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    lo, hi = float(pixels.min()), float(pixels.max())
    scaled = (pixels.astype(np.float64) - lo) / (hi - lo or 1.0)
    return (scaled * 255).round().astype(np.uint8)


def _tile(frames: np.ndarray) -> np.ndarray:
    n = frames.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = frames.shape[1:3]
    canvas = np.zeros((rows * h, cols * w, *frames.shape[3:]), dtype=frames.dtype)
    for k in range(n):
        r, c = divmod(k, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = frames[k]
    return canvas


def render_png(path: Path, frame: int | None = None) -> bytes:
    """PNG bytes of the DICOM image at `path` (RGB as is; YBR converted; grey scaled to 8 bits)."""
    import pydicom
    from PIL import Image
    from pydicom.pixels import convert_color_space

    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for unreadable pixel data
        raise HeatmapError(f"{path.name}: cannot decode pixel data ({exc})") from exc
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric.startswith("YBR"):
        pixels = convert_color_space(pixels, photometric, "RGB")
    is_colour = int(ds.get("SamplesPerPixel", 1)) == 3
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        if frame is not None:
            if not 0 <= frame < frames:
                raise HeatmapError(f"frame {frame} out of range (0..{frames - 1})")
            pixels = pixels[frame]
        else:
            pixels = _tile(pixels)
    if photometric == "MONOCHROME1":
        pixels = pixels.max() - pixels
    image = Image.fromarray(_to_uint8(pixels), mode="RGB" if is_colour else "L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
