"""The heatmap renderer as first written (a new matplotlib figure per image), kept as the reference that
node.results.heatmap_render.HeatmapRenderer (one figure per series, blitting) must equal pixel for pixel. Only the
figure part differs; the blended image comes from the shared `blended_image`."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pydicom.dataset import Dataset

from node.results.heatmap_render import BAR_PIXELS, COLORMAP, DISCLAIMER, HEADER_PIXELS, HeatmapText, blended_image


def render_heatmap(
    source: Dataset, anomaly: np.ndarray, vmax: float, text: HeatmapText, segmentation: np.ndarray | None = None
) -> np.ndarray:
    rgb, segmentation, scale = blended_image(source, anomaly, vmax, segmentation)  # unchanged: shared
    img_rows, img_cols = rgb.shape[:2]
    height, width = img_rows + HEADER_PIXELS, img_cols + BAR_PIXELS
    dpi = 100
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="black")
    canvas = FigureCanvasAgg(figure)
    image_axes = figure.add_axes((0, 0, img_cols / width, img_rows / height))
    image_axes.imshow(rgb, interpolation="nearest", aspect="auto")
    if segmentation is not None and segmentation.any():
        mask = np.kron(segmentation.astype(np.float32), np.ones((scale, scale), np.float32))
        image_axes.contour(mask, levels=[0.5], colors=["#00ff66"], linewidths=1.0)
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
    figure.text(0.01, 1 - 6 / height, DISCLAIMER, color="yellow", fontsize=10, va="top", ha="left", fontweight="bold")
    figure.text(
        0.01,
        1 - 30 / height,
        f"{text.label}  slice score {text.score:.3f}  study score {text.study_score:.3f}",
        color="white",
        fontsize=9,
        va="top",
        ha="left",
    )
    canvas.draw()
    buffer = np.asarray(canvas.buffer_rgba())[..., :3]
    return np.ascontiguousarray(buffer, dtype=np.uint8)
