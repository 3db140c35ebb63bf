"""The CT lung refiner's U-Net on the engines, chosen as the diffusion model's is: the fastest backend that
reproduces torch fp32's output.

The refiner (`inference.lung_refiner`) is a U-Net of the diffusion model's layout called once per slice at
timestep 0, so every backend that runs the diffusion model runs it. On a CPU with backend "auto" the candidates
are probed (`engines.probe.probe_cpu`, cached like the diffusion model's probe) with this module's guard: the
refiner's lung on a fixed phantom with consolidations must agree with torch fp32's at Dice >= REFINER_GUARD_DICE.
On a GPU the plan's backend runs it. Triton serves the diffusion model only: with backend "triton" the refiner
runs on this machine with the backend "auto" would pick.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engines.probe import ProbeRecord, cpu_candidates, dice, probe_key, read_probe
from engines.select import Selection, select
from inference.denoiser import Denoiser
from inference.lung_refiner import SLICES_PER_CALL, LungRefiner
from inference.lungmask import anatomy_mask
from inference.phantoms import make_ct

REFINER_GUARD_DICE = 0.995  # the lung the refiner adds is a few hundred voxels per slice; 0.5 % of it may move
GUARD_NAME = "lung-refiner"  # in its probe's cache key, apart from the diffusion model's
_GUARD_SEED, _GUARD_SIZE, _GUARD_SLICES = 13, 128, 24  # a phantom with consolidations


@functools.cache
def guard_volume() -> tuple[np.ndarray, np.ndarray]:
    """A fixed CT volume in HU with consolidations (what the refiner is for) and its threshold lung mask."""
    ph = make_ct(_GUARD_SEED, _GUARD_SIZE, _GUARD_SIZE, _GUARD_SLICES, "consolidation")
    sz, sy, sx = ph.grid.spacing  # phantom slices run feet to head
    return ph.hu, anatomy_mask(ph.hu, "CT", (sy, sx), np.array([0.0, 0.0, 1.0]), sz)


@dataclass(frozen=True)
class MaskVerdict:
    dice: float
    passed: bool

    def describe(self) -> str:
        return f"{'pass' if self.passed else 'FAIL'}: lung mask Dice {self.dice:.4f}"


@dataclass(frozen=True)
class RefinerGuard:
    """A candidate passes when the refiner's lung (probability >= 0.5, on its grid) matches torch fp32's."""

    refiner: LungRefiner
    name: str = GUARD_NAME

    def run(self, denoiser: Denoiser) -> np.ndarray:
        hu, mask = guard_volume()
        return self.refiner.with_engine(denoiser).lung_probability(hu, mask) >= 0.5

    def verdict(self, ref: np.ndarray, got: np.ndarray) -> MaskVerdict:
        d = dice(ref, got)
        return MaskVerdict(d, d >= REFINER_GUARD_DICE)

    def summary(self, ref: np.ndarray) -> dict[str, object]:
        return {"lung_voxels": int(ref.sum())}


def refiner_backend(backend: str) -> str:
    """The backend setting as it applies to the refiner: Triton's model repository holds the diffusion model only."""
    return "auto" if backend == "triton" else backend


def refiner_selection(
    refiner: LungRefiner,
    device: str = "auto",
    backend: str = "auto",
    precision: str = "auto",
    cache_dir: Path | None = None,
    probe: str = "cached",
    threads: int | None = None,
) -> Selection:
    """The engine that runs the refiner here, with why (logged by `select`, and the probe's table on a CPU);
    `refiner.with_engine(selection.denoiser)` runs it."""
    return select(
        (refiner.model, refiner.info),
        device=device,
        backend=refiner_backend(backend),
        precision=precision,
        max_batch=SLICES_PER_CALL,
        cache_dir=cache_dir,
        probe=probe,
        threads=threads,
        guard=RefinerGuard(refiner),
    )


def cached_refiner_probe(
    refiner: LungRefiner, backend: str, precision: str, cache_dir: Path, threads: int | None
) -> ProbeRecord | None:
    """The probe `refiner_selection` would read from the cache for these settings (None: none cached)."""
    candidates = cpu_candidates(refiner_backend(backend), precision)
    key = probe_key(refiner.info, candidates, SLICES_PER_CALL, threads, GUARD_NAME)
    return read_probe(cache_dir, refiner.info, key)
