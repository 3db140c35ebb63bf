"""AnomalyResult: what the pipeline hands to the result writers, on the source grid."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the writers read results without loading torch (which inference.volume needs)
    from pydicom.dataset import Dataset

    from inference.volume import LeftOutInstance


@dataclass
class AnomalyResult:
    """Anomaly detection output for one series, every array on the source grid (slices, rows, cols).

    Slice k of each array belongs to the source image `source_sop_instance_uids[k]`; for a single
    radiograph there is one slice.
    """

    model_id: str  # name + content hash of the weights that produced it
    modality: str
    series_instance_uid: str
    source_sop_instance_uids: list[str]
    anatomy_mask: np.ndarray  # bool: the condition (lungs for CT, lung field estimate for CR/DX)
    anomaly_map: np.ndarray  # float32: squared error between input and mean reconstruction
    uncertainty_map: np.ndarray  # float32: std of the reconstructions across ensemble members
    segmentation: np.ndarray  # bool: thresholded and cleaned anomaly mask
    threshold: float  # alpha = mean + lambda * std of the error outside the anatomy mask
    slice_scores: np.ndarray  # float32 per slice, see docs/method.md for the definition
    study_score: float
    anomalous_volume_mm3: float  # voxels in `segmentation` x voxel volume (area x 1 mm for 2D)
    mean_uncertainty: float  # mean of uncertainty_map inside the segmentation (or anatomy if empty)
    pixel_spacing_mm: tuple[float, float]  # row spacing, column spacing
    slice_thickness_mm: float
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    settings: dict[str, object] = field(default_factory=dict)  # t_start, steps, ensemble, lambda, ...
    anomalous_fraction: float = 0.0  # segmented voxels / anatomy-mask voxels (model grid), see docs/method.md
    left_out: list[LeftOutInstance] = field(default_factory=list)  # the series' instances not analysed, and why
    # What the result writers copy from the sources (patient, study, geometry): slice k's header as the loader read
    # it, without its pixel data, and its file (a heatmap reads the pixels of its slice from there).
    source_headers: list[Dataset] = field(default_factory=list)
    source_paths: list[Path] = field(default_factory=list)

    @property
    def positive(self) -> bool:
        return bool(self.segmentation.any())

    def top_slices(self, n: int) -> list[int]:
        """Indices of the n highest-scoring slices (all slices when n <= 0), best first."""
        order = np.argsort(-self.slice_scores, kind="stable")
        return [int(i) for i in (order if n <= 0 else order[:n])]

    def writer_sources(self, with_pixels: Iterable[int] = ()) -> list[Dataset]:
        """The source datasets for the result writers, slice order, without reading the series again.

        Slices in `with_pixels` (those drawn as heatmaps) come with their pixel data, read from their file when
        first used; the others are headers only, which is also what highdicom deep-copies into a SEG.
        """
        if len(self.source_headers) != len(self.source_sop_instance_uids):
            raise ValueError("the result carries no source headers (it was not made by inference.pipeline)")
        import pydicom

        sources = list(self.source_headers)
        for k in set(with_pixels):
            sources[k] = pydicom.dcmread(self.source_paths[k], defer_size="64 KB")
        return sources
