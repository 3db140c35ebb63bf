"""Render an anomaly heatmap as an RGB image: windowed source + colour overlay + colour bar + burned-in text.

Rendering uses matplotlib's Agg canvas directly (no pyplot, no GUI, no global figure state), so it is
safe in a worker thread. The output is a plain uint8 (rows, cols, 3) array; sc.py makes it a Secondary Capture
object (this module knows nothing of DICOM objects beyond reading the source's pixels).

A HeatmapRenderer draws every heatmap of a series on one figure: the frame (black background, colour bar,
disclaimer) is drawn once and saved, and each image then only restores it and draws its own image, contour
and caption over it (matplotlib's blitting). The pixels are those of a fresh figure per image, at a fraction
of the cost (building and laying out a figure and its axes was most of it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.text import Text
from pydicom.dataset import Dataset

DISCLAIMER = "AI anomaly map - not for diagnostic use"
LUNG_WINDOW = (-600.0, 1500.0)  # centre, width in HU
MIN_IMAGE_PIXELS = 384  # small sources are upscaled so the burned-in text stays legible
MAX_IMAGE_PIXELS = 1024  # large radiographs are reduced: the heatmap is an overview, not a diagnostic image
HEADER_PIXELS = 56
BAR_PIXELS = 96
COLORMAP = "inferno"


@dataclass(frozen=True)
class HeatmapText:
    """What is burned into one heatmap image."""

    score: float  # the slice (or image) anomaly score
    study_score: float
    label: str  # e.g. "slice 12/80"


def modality_values(ds: Dataset) -> np.ndarray:
    """Source pixels as float32 modality values (rescale applied); MONOCHROME1 inverted."""
    pixels = ds.pixel_array.astype(np.float32)
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    values = pixels * slope + intercept
    if str(getattr(ds, "PhotometricInterpretation", "")) == "MONOCHROME1":
        values = values.max() + values.min() - values
    return values


def window_for(ds: Dataset, values: np.ndarray) -> tuple[float, float]:
    """Lung window for CT; otherwise a robust 1st-99th percentile window (radiograph VOI varies by vendor)."""
    if str(getattr(ds, "Modality", "")) == "CT":
        return LUNG_WINDOW
    low, high = np.percentile(values, [1.0, 99.0])
    return float((low + high) / 2), float(max(high - low, 1.0))


def windowed_grey(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Linear window to [0, 1]."""
    low = centre - width / 2
    return np.clip((values - low) / width, 0.0, 1.0)


def blend(grey: np.ndarray, anomaly: np.ndarray, vmax: float, max_alpha: float = 0.6) -> np.ndarray:
    """Colour-map `anomaly` (scaled by vmax) over `grey`; transparent where the anomaly is ~0."""
    level = np.clip(anomaly / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(anomaly)
    colour = colormaps[COLORMAP](level)[..., :3]
    alpha = (max_alpha * level)[..., None]
    return (1.0 - alpha) * grey[..., None] + alpha * colour


def reduce_blocks(image: np.ndarray, factor: int, how: str = "mean") -> np.ndarray:
    """Shrink the first two axes by an integer factor (block mean, or block max for masks)."""
    rows, cols = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = image[:rows, :cols].reshape(rows // factor, factor, cols // factor, factor, *image.shape[2:])
    return blocks.max(axis=(1, 3)) if how == "max" else blocks.mean(axis=(1, 3))


def blended_image(
    source: Dataset, anomaly: np.ndarray, vmax: float, segmentation: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """The blended slice (reduced if large, upscaled if small), the segmentation at the same size, and the upscale."""
    values = modality_values(source)
    grey = windowed_grey(values, *window_for(source, values))
    anomaly = anomaly.astype(np.float32)
    shrink = int(np.ceil(max(grey.shape) / MAX_IMAGE_PIXELS))
    if shrink > 1:
        grey, anomaly = reduce_blocks(grey, shrink), reduce_blocks(anomaly, shrink, "max")
        segmentation = None if segmentation is None else reduce_blocks(segmentation, shrink, "max")
    rgb = blend(grey, anomaly, vmax)
    rows, cols = grey.shape
    scale = max(1, int(np.ceil(MIN_IMAGE_PIXELS / max(rows, cols))))
    if scale > 1:
        rgb = np.kron(rgb, np.ones((scale, scale, 1), np.float32))
    return rgb, segmentation, scale


@dataclass
class _Frame:
    """One figure for images of one size: the saved frame and the artists each image redraws."""

    canvas: FigureCanvasAgg
    image_axes: Axes
    image: AxesImage
    caption: Text
    background: Any  # canvas.copy_from_bbox of the frame as drawn without image and caption


class HeatmapRenderer:
    """Renders the heatmaps of one series (one colour scale, `vmax`) on one reusable figure per image size."""

    def __init__(self, vmax: float) -> None:
        self.vmax = vmax
        self._frames: dict[tuple[int, int], _Frame] = {}

    def _frame(self, img_rows: int, img_cols: int) -> _Frame:
        frame = self._frames.get((img_rows, img_cols))
        if frame is not None:
            return frame
        vmax = self.vmax
        height, width = img_rows + HEADER_PIXELS, img_cols + BAR_PIXELS
        dpi = 100
        figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="black")
        canvas = FigureCanvasAgg(figure)
        image_axes = figure.add_axes((0, 0, img_cols / width, img_rows / height))
        placeholder = np.zeros((img_rows, img_cols, 3), np.float32)
        image = image_axes.imshow(placeholder, interpolation="nearest", aspect="auto", animated=True)
        image_axes.set_axis_off()
        bar_axes = figure.add_axes(
            ((img_cols + 16) / width, 0.08 * img_rows / height, 18 / width, 0.84 * img_rows / height)
        )
        gradient = np.linspace(1.0, 0.0, 256)[:, None]
        bar_axes.imshow(gradient, cmap=COLORMAP, aspect="auto", extent=(0, 1, 0, vmax if vmax > 0 else 1))
        bar_axes.xaxis.set_visible(False)
        bar_axes.yaxis.tick_right()
        bar_axes.tick_params(colors="white", labelsize=7)
        bar_axes.set_title("error", color="white", fontsize=7)
        figure.text(
            0.01, 1 - 6 / height, DISCLAIMER, color="yellow", fontsize=10, va="top", ha="left", fontweight="bold"
        )
        caption = figure.text(0.01, 1 - 30 / height, "", color="white", fontsize=9, va="top", ha="left", animated=True)
        canvas.draw()  # animated artists are left out of this draw
        frame = _Frame(canvas, image_axes, image, caption, canvas.copy_from_bbox(figure.bbox))
        self._frames[(img_rows, img_cols)] = frame
        return frame

    def render(
        self, source: Dataset, anomaly: np.ndarray, text: HeatmapText, segmentation: np.ndarray | None = None
    ) -> np.ndarray:
        """One RGB uint8 image: header text, the blended slice (upscaled if small) and a colour bar.

        Contours of `segmentation` are drawn when given so the thresholded finding is visible next to the map.
        """
        rgb, segmentation, scale = blended_image(source, anomaly, self.vmax, segmentation)
        frame = self._frame(*rgb.shape[:2])
        frame.canvas.restore_region(frame.background)
        frame.image.set_data(rgb)
        contours = None
        if segmentation is not None and segmentation.any():
            mask = np.kron(segmentation.astype(np.float32), np.ones((scale, scale), np.float32))
            contours = frame.image_axes.contour(mask, levels=[0.5], colors=["#00ff66"], linewidths=1.0)
        frame.image_axes.draw_artist(frame.image)
        if contours is not None:
            frame.image_axes.draw_artist(contours)
            contours.remove()
        frame.caption.set_text(f"{text.label}  slice score {text.score:.3f}  study score {text.study_score:.3f}")
        frame.canvas.figure.draw_artist(frame.caption)
        buffer = np.asarray(frame.canvas.buffer_rgba())[..., :3]
        return np.ascontiguousarray(buffer, dtype=np.uint8)


def render_heatmap(
    source: Dataset, anomaly: np.ndarray, vmax: float, text: HeatmapText, segmentation: np.ndarray | None = None
) -> np.ndarray:
    """One heatmap on its own figure (`vmax` fixes the colour scale; a series shares one HeatmapRenderer)."""
    return HeatmapRenderer(vmax).render(source, anomaly, text, segmentation)
