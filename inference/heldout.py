"""The held-out evaluation sets: phantom studies no model was trained on, on the model grid.

Two sets per modality, each drawn from its own seed stream:
- "training ranges" (set A): phantoms drawn like the training data (`phantoms.TRAINING`), other subjects;
- "shifted ranges" (set B, out of distribution): CT drawn from `phantoms.SHIFTED` (other scanners, noise and
  kernels, smaller and larger bodies, lesions smaller / larger, fainter / denser than any training draw);
  radiographs acquired with `radiograph_phantoms.SHIFTED_RADIOGRAPHS` (harder beams, lower dose, more read noise,
  scatter, blur and detector line noise, another presentation curve and window).

A phantom's subject is fixed by its seed alone, so a set is held out exactly when none of its seeds is a training
seed of the models evaluated on it: `assert_held_out` checks that before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from inference.phantoms import (
    LESION_KINDS,
    TRAINING,
    Ranges,
    make_ct,
)
from inference.radiograph_phantoms import SHIFTED_RADIOGRAPHS, TYPICAL_RADIOGRAPHS, make_radiograph
from inference.simplex import splitmix64

if TYPE_CHECKING:
    from inference.lung_refiner import LungRefiner

GT_FRACTION = 0.25  # a model-grid pixel is a lesion pixel when >= this fraction of its area is lesion
KINDS = (*LESION_KINDS, "mixed")  # lesion studies take these in rotation
# Seed streams: held-out set seeds are splitmix64(stream + seed, i) % 2**31. Training draws splitmix64(seed, i).
STREAMS = {("CT", "training"): 1_000_003, ("CT", "shifted"): 2_000_003}
STREAMS |= {("DX", "training"): 3_000_003, ("DX", "shifted"): 4_000_003}
MAX_TRIES = 8  # seeds tried for one planned lesion study before giving up (a lesion may not fit a small lung)


@dataclass
class Case:
    """One held-out study on the model grid (one series: a CT volume or a single radiograph)."""

    name: str
    kind: str  # lesion type, or "none" for a healthy control
    image: np.ndarray  # (Z, S, S) in [-1, 1]
    anatomy: np.ndarray  # (Z, S, S) bool: the mask the node computes (condition + threshold background)
    lesion: np.ndarray  # (Z, S, S) bool ground truth on the model grid
    lung: np.ndarray  # (Z, S, S) bool: the phantom's exact lungs on the model grid
    intensities: np.ndarray  # (Z, S, S) source values resampled: HU (CT) or presentation [0, 1] (CR/DX), baselines
    modality: str = "CT"  # "CT" or "DX" (radiograph phantoms are the same for CR and DX)
    seed: int = 0  # the phantom seed
    acquisition: str = ""  # scanner / kernel, or the radiograph's acquisition
    lesion_sizes_mm: tuple[float, ...] = ()  # the phantom's lesions as drawn (what the set's ranges produced)
    healthy_image: np.ndarray | None = None  # the same phantom and noise without its lesions, when asked for

    @property
    def lesion_study(self) -> bool:
        """The study's truth for triage: the phantom holds a lesion (even one too small to survive the grid)."""
        return self.kind != "none"


def heldout_seed(modality: str, ranges: str, seed: int, index: int) -> int:
    return splitmix64(STREAMS[(modality, ranges)] + seed, index) % 2**31


def assert_held_out(heldout: Iterable[int], training: Iterable[int], what: str) -> None:
    """ValueError when a held-out seed is also a training seed (the same subject would be in both)."""
    shared = sorted(set(heldout) & set(training))
    if shared:
        raise ValueError(f"{what}: held-out seeds {shared[:5]} are training seeds: the set is not held out")


def plan(lesion_cases: int, healthy_cases: int) -> list[str]:
    """Lesion kinds in rotation, then the healthy controls."""
    return [KINDS[i % len(KINDS)] for i in range(lesion_cases)] + ["none"] * healthy_cases


Render = Callable[[int, str], "Case | None"]


def _draw_cases(modality: str, ranges: str, seed: int, kinds: Sequence[str], render: Render) -> list[Case]:
    """Render the plan seed by seed; a lesion study whose phantom ends without lesion takes the next seed."""
    cases: list[Case] = []
    index = 0
    for n, kind in enumerate(kinds):
        for _ in range(MAX_TRIES):
            case = render(heldout_seed(modality, ranges, seed, index), kind)
            index += 1
            if case is not None:
                case.name = f"{kind}-{n}"
                cases.append(case)
                break
        else:
            raise ValueError(f"{modality} {ranges}: no {kind} lesion fitted in {MAX_TRIES} phantoms")
    return cases


def make_ct_cases(
    seed: int,
    lesion_cases: int,
    healthy_cases: int,
    grid: int,
    size: int = 256,
    slices: int = 20,
    ranges: Ranges = TRAINING,
    keep_healthy: bool = False,
    refiner: LungRefiner | None = None,
) -> list[Case]:
    """Held-out CT studies drawn in `ranges`, resampled to the model grid with the node's own lung mask, refined
    by `refiner` as the node refines it (`keep_healthy`: each with its lesion-free twin, `Case.healthy_image`)."""
    from inference.lungmask import anatomy_mask
    from inference.volume import GridMapping, mask_to_grid, normalise, resample_to_grid

    def render(case_seed: int, kind: str) -> Case | None:
        ph = make_ct(case_seed, size, size, slices, kind, ranges=ranges, keep_healthy=keep_healthy)
        if kind != "none" and not ph.lesion_mask.any():
            return None
        mapping = GridMapping(rows=size, cols=size, size=grid)
        # phantom slices run feet to head, like an axial series sorted along its normal (0, 0, 1)
        spacing = ph.grid.spacing
        anatomy = anatomy_mask(ph.hu, "CT", (spacing[1], spacing[2]), np.array([0.0, 0.0, 1.0]), spacing[0], refiner)
        return Case(
            name="",
            kind=kind,
            image=resample_to_grid(normalise(ph.hu, "CT"), mapping, fill=-1.0),
            anatomy=mask_to_grid(anatomy, mapping),
            lesion=resample_to_grid(ph.lesion_mask.astype(np.float32), mapping) >= GT_FRACTION,
            lung=mask_to_grid(ph.lung_mask, mapping),
            intensities=resample_to_grid(ph.hu, mapping, fill=-1000.0),
            modality="CT",
            seed=case_seed,
            acquisition=f"{ph.scanner.name} {ph.scanner.kernel}",
            lesion_sizes_mm=tuple(les.size_mm for les in ph.lesions),
            healthy_image=None
            if ph.healthy_hu is None
            else resample_to_grid(normalise(ph.healthy_hu, "CT"), mapping, fill=-1.0),
        )

    return _draw_cases("CT", ranges.name, seed, plan(lesion_cases, healthy_cases), render)


# --- radiographs ----------------------------------------------------------------------------------------------


def make_radiograph_cases(
    seed: int,
    lesion_cases: int,
    healthy_cases: int,
    grid: int,
    size: int = 256,
    shifted: bool = False,
    keep_healthy: bool = False,
) -> list[Case]:
    """Held-out PA chest radiographs (make_radiograph at native size, as training renders them), acquired within the
    typical ranges (set A) or SHIFTED_RADIOGRAPHS (set B), on the model grid with the node's own lung-field mask
    (`keep_healthy`: each with its lesion-free twin, `Case.healthy_image`)."""
    from inference.lungmask import anatomy_mask
    from inference.volume import GridMapping, mask_to_grid, normalise, resample_to_grid

    ranges = "shifted" if shifted else "training"

    def render(case_seed: int, kind: str) -> Case | None:
        acquired = SHIFTED_RADIOGRAPHS if shifted else TYPICAL_RADIOGRAPHS
        rx = make_radiograph(case_seed, size, size, kind, native=size, ranges=acquired, keep_healthy=keep_healthy)
        if kind != "none" and not rx.lesion_mask.any():
            return None
        acquisition = rx.acquisition.describe() if rx.acquisition is not None else ""
        pixels = rx.image[None]
        mapping = GridMapping(rows=size, cols=size, size=grid)
        anatomy = anatomy_mask(pixels, "DX", rx.pixel_spacing)
        return Case(
            name="",
            kind=kind,
            image=resample_to_grid(normalise(pixels, "DX"), mapping, fill=-1.0),
            anatomy=mask_to_grid(anatomy, mapping),
            lesion=resample_to_grid(rx.lesion_mask[None].astype(np.float32), mapping) >= GT_FRACTION,
            lung=mask_to_grid(rx.lung_mask[None], mapping),
            intensities=resample_to_grid(pixels, mapping, fill=0.0),
            modality="DX",
            seed=case_seed,
            acquisition=acquisition,
            lesion_sizes_mm=tuple(les.size_mm for les in rx.lesions),
            healthy_image=None
            if rx.healthy_image is None
            else resample_to_grid(normalise(rx.healthy_image[None], "DX"), mapping, fill=-1.0),
        )

    return _draw_cases("DX", ranges, seed, plan(lesion_cases, healthy_cases), render)


def lung_field_brightness_threshold(seeds: Sequence[int], size: int, percentile: float = 99.0) -> float:
    """The radiograph baseline's threshold: the `percentile` of presentation values inside the node's lung-field
    mask, pooled over healthy radiographs of `seeds` (training seeds: nothing is tuned on held-out studies)."""
    from inference.lungmask import anatomy_mask

    values = []
    for case_seed in seeds:
        rx = make_radiograph(case_seed, size, size, "none", native=size)
        field = anatomy_mask(rx.image[None], "DX", rx.pixel_spacing)[0]
        values.append(rx.image[field])
    pooled = np.concatenate(values) if values else np.zeros(0, np.float32)
    if pooled.size == 0:
        raise ValueError("no lung field found in the calibration radiographs")
    return float(np.percentile(pooled, percentile))
