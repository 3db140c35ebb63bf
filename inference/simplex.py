"""Multi-octave OpenSimplex 2D noise in torch, batched with an independent field per item.

Why simplex noise: AnoDDPM showed that low-frequency structured noise corrupts anomalies of all sizes, where
Gaussian noise only hides small ones. The single-octave kernel is Kurt Spencer's OpenSimplex 2D exactly as the
`opensimplex` package computes it (same lattice, gradients, normalisation and seed -> permutation), vectorised
over (N, H, W) so it runs on the GPU; tests compare it with the package to float32 tolerance.

Octaves: octave o samples pixel (row i, col j) at (x, y) = (j, i) * base_frequency * 2**o with its own
permutation, weighted by persistence**o. The sum is divided by `SIMPLEX_STD` * sqrt(sum persistence**(2o)) so the
field has unit variance; see docs/method.md for how the constant was measured.

Seeds: an int seed s gives item i the seed splitmix64(s, i) (so item i's field does not depend on the batch size
or chunking); an explicit sequence gives one seed per item; a torch.Generator draws them. Octave o of an item with
seed u uses the OpenSimplex permutation seed splitmix64(u, o).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

# Standard deviation (root mean square over seeds and positions) of single-octave OpenSimplex 2D as opensimplex
# returns it: 0.36832-0.36839 over 4096 seeds x 128 x 128 points at frequencies 2**-3, 0.173 and 2**-1
# (`benchmarks/noise.py --measure-std` reproduces it).
SIMPLEX_STD = 0.3684

_STRETCH = -0.211324865405187  # (1/sqrt(2+1)-1)/2
_SQUISH = 0.366025403784439  # (sqrt(2+1)-1)/2
_NORM = 47.0
_GRADIENTS2 = np.array([5, 2, 2, 5, -5, 2, -2, 5, 5, -2, 2, -5, -5, -2, -2, -5], dtype=np.int64)
_MASK64 = (1 << 64) - 1

SeedLike = int | Sequence[int] | np.ndarray | torch.Generator


def splitmix64(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed from (seed, index): independent streams without a shared global RNG."""
    z = (seed * 0x9E3779B97F4A7C15 + (index + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def item_seeds(seed: SeedLike, n: int) -> list[int]:
    """One seed per item, from an int (derived per item), an explicit sequence, or a torch.Generator."""
    if isinstance(seed, torch.Generator):
        return [int(v) for v in torch.randint(0, 2**62, (n,), generator=seed, dtype=torch.int64)]
    if isinstance(seed, int | np.integer):
        return [splitmix64(int(seed), i) for i in range(n)]
    seeds = [int(v) for v in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} items")
    return seeds


def opensimplex_permutations(seeds: Sequence[int]) -> np.ndarray:
    """The (N, 256) permutation tables opensimplex.OpenSimplex(seed) builds, vectorised over seeds."""
    n = len(seeds)
    with np.errstate(over="ignore"):
        mult, inc = np.int64(6364136223846793005), np.int64(1442695040888963407)
        # Python ints -> wrapped int64, as ctypes.c_int64 does in the reference.
        state = np.array([((s + 2**63) & _MASK64) - 2**63 for s in seeds], dtype=np.int64)
        for _ in range(3):
            state = state * mult + inc
        perm = np.zeros((n, 256), dtype=np.int64)
        source = np.tile(np.arange(256, dtype=np.int64), (n, 1))
        rows = np.arange(n)
        for i in range(255, -1, -1):
            state = state * mult + inc
            r = (state % (i + 1) + 31) % (i + 1)  # == (seed + 31) % (i + 1) in exact integer arithmetic
            perm[:, i] = source[rows, r]
            source[rows, r] = source[:, i]
    return perm


def _lattice_contributions(
    x: torch.Tensor, y: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """For points (x, y) (float64, (P,)), the four lattice vertices OpenSimplex 2D sums over.

    Returns (xsv, ysv, wx, wy) per vertex: integer lattice coordinates and the weights attn^4 * (dx, dy) / 47, so
    that the noise is sum over vertices of wx * gx + wy * gy with (gx, gy) the vertex's gradient. The region logic
    is the reference's branch structure written with torch.where; it depends only on the points, not the seed.
    """
    stretch = (x + y) * _STRETCH
    xs = x + stretch
    ys = y + stretch
    xsb_f = torch.floor(xs)
    ysb_f = torch.floor(ys)
    squish = (xsb_f + ysb_f) * _SQUISH
    xins = xs - xsb_f
    yins = ys - ysb_f
    in_sum = xins + yins
    dx0 = x - (xsb_f + squish)
    dy0 = y - (ysb_f + squish)
    xsb = xsb_f.long()
    ysb = ysb_f.long()

    lower = in_sum <= 1  # inside the triangle at (0,0), else the one at (1,1)
    x_gt_y = xins > yins
    zins = torch.where(lower, 1 - in_sum, 2 - in_sum)
    # Lower triangle: (0,0) is among the two closest vertices when zins > xins or zins > yins;
    # upper triangle: (1,1) is, when zins < xins or zins < yins. Otherwise the extra vertex is across the diagonal.
    near = torch.where(lower, (zins > xins) | (zins > yins), (zins < xins) | (zins < yins))
    one = torch.ones_like(xsb)
    zero = torch.zeros_like(xsb)
    ext_x = torch.where(
        lower,
        torch.where(near, torch.where(x_gt_y, one, -one), one),
        torch.where(near, torch.where(x_gt_y, 2 * one, zero), zero),
    )
    ext_y = torch.where(
        lower,
        torch.where(near, torch.where(x_gt_y, -one, one), one),
        torch.where(near, torch.where(x_gt_y, zero, 2 * one), zero),
    )
    two_squish = torch.full_like(x, 2 * _SQUISH)
    no_squish = torch.zeros_like(x)
    ext_squish = torch.where(lower == near, no_squish, two_squish)  # 0 in the lower-near and upper-far cases
    up = (~lower).long()
    shift = torch.where(lower, no_squish, 1 + two_squish)
    vertices = [
        (xsb + 1, ysb, dx0 - 1 - _SQUISH, dy0 - _SQUISH),
        (xsb, ysb + 1, dx0 - _SQUISH, dy0 - 1 - _SQUISH),
        (xsb + ext_x, ysb + ext_y, dx0 - ext_x - ext_squish, dy0 - ext_y - ext_squish),
        (xsb + up, ysb + up, dx0 - shift, dy0 - shift),  # (0,0) in the lower triangle, (1,1) in the upper
    ]
    out = []
    for xv, yv, dx, dy in vertices:
        attn = (2.0 - dx * dx - dy * dy).clamp(min=0.0) ** 4 / _NORM
        out.append((xv, yv, attn * dx, attn * dy))
    return out


@dataclass(frozen=True)
class LatticeGeometry:
    """The seed-independent part of OpenSimplex 2D at a set of points: box-indexed vertices and their weights."""

    shape: tuple[int, ...]
    box_x: torch.Tensor  # (B,) lattice x of every vertex in the points' bounding box
    box_y: torch.Tensor  # (B,)
    columns: tuple[torch.Tensor, ...]  # per contribution, (P,) index into the box
    weights: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per contribution, (wx, wy) float32 (P,)


def lattice_geometry(x: torch.Tensor, y: torch.Tensor) -> LatticeGeometry:
    """Precompute what opensimplex2 needs for points (x, y); reusable for any seeds."""
    contributions = _lattice_contributions(x.reshape(-1).double(), y.reshape(-1).double())
    xmin = min(int(c[0].min()) for c in contributions)
    xmax = max(int(c[0].max()) for c in contributions)
    ymin = min(int(c[1].min()) for c in contributions)
    ymax = max(int(c[1].max()) for c in contributions)
    ny = ymax - ymin + 1
    k = torch.arange((xmax - xmin + 1) * ny, device=x.device)
    return LatticeGeometry(
        shape=tuple(x.shape),
        box_x=xmin + k // ny,
        box_y=ymin + k % ny,
        columns=tuple((xv - xmin) * ny + (yv - ymin) for xv, yv, _, _ in contributions),
        weights=tuple((wx.float(), wy.float()) for _, _, wx, wy in contributions),
    )


def opensimplex2(
    x: torch.Tensor, y: torch.Tensor, seeds: Sequence[int], geometry: LatticeGeometry | None = None
) -> torch.Tensor:
    """Single-octave OpenSimplex 2D at shared points (x, y) (any shape S) for each seed: (len(seeds), *S) float32.

    Item n equals opensimplex.OpenSimplex(seeds[n]).noise2(x, y) up to float32 rounding, in [-1, 1]. The point
    geometry is computed once for the batch (or passed in, precomputed); per item only the vertex gradients differ,
    looked up once per lattice vertex in the points' bounding box and gathered per point.
    """
    geo = geometry or lattice_geometry(x, y)
    device = geo.box_x.device
    perm_np = opensimplex_permutations(seeds)
    grad_index = perm_np & 0x0E
    perm = torch.from_numpy(perm_np).to(device)
    gx = torch.from_numpy(_GRADIENTS2[grad_index].astype(np.float32)).to(device)
    gy = torch.from_numpy(_GRADIENTS2[grad_index + 1].astype(np.float32)).to(device)
    # Reference hash: perm[(perm[xsb & 0xFF] + ysb) & 0xFF] picks the gradient.
    h = (perm.index_select(1, geo.box_x & 0xFF) + geo.box_y) & 0xFF
    box = geo.box_x.numel()
    grads = torch.cat([gx.gather(1, h), gy.gather(1, h)], dim=1)  # (N, 2 * box): all gx, then all gy
    value = None
    for col, (wx, wy) in zip(geo.columns, geo.weights, strict=True):
        term = grads.index_select(1, col) * wx + grads.index_select(1, col + box) * wy
        value = term if value is None else value.add_(term)
    assert value is not None
    return value.reshape(len(seeds), *geo.shape)


def simplex_noise(
    shape: tuple[int, int, int],
    seed: SeedLike = 0,
    device: str | torch.device = "cpu",
    octaves: int = 6,
    base_frequency: float = 2**-6,
    persistence: float = 0.8,
    geometry_cache: dict[tuple[object, ...], LatticeGeometry] | None = None,
) -> torch.Tensor:
    """(N, H, W) float32 multi-octave simplex noise with unit variance, an independent field per item.

    geometry_cache (owned by the caller, e.g. a NoiseSource) keeps the seed-independent lattice geometry per
    (H, W, frequency, device), so repeated calls (every reverse step) skip it.
    """
    n, h, w = shape
    device = torch.device(device)
    seeds = item_seeds(seed, n)
    octave_seeds = [[splitmix64(s, o) for s in seeds] for o in range(octaves)]
    rows = torch.arange(h, device=device, dtype=torch.float64)
    cols = torch.arange(w, device=device, dtype=torch.float64)
    total = torch.zeros((n, h, w), device=device, dtype=torch.float32)
    weight2 = 0.0
    for o in range(octaves):
        freq = base_frequency * 2**o
        amp = persistence**o
        key = (h, w, freq, str(device))
        geometry = geometry_cache.get(key) if geometry_cache is not None else None
        if geometry is None:
            geometry = lattice_geometry((cols * freq)[None, :].expand(h, w), (rows * freq)[:, None].expand(h, w))
            if geometry_cache is not None:
                geometry_cache[key] = geometry
        total += amp * opensimplex2(rows, cols, octave_seeds[o], geometry)
        weight2 += amp * amp
    return total / (SIMPLEX_STD * math.sqrt(weight2))


def gaussian_noise(shape: tuple[int, int, int], seed: SeedLike = 0, device: str | torch.device = "cpu") -> torch.Tensor:
    """(N, H, W) float32 standard normal noise with the same seed semantics as simplex_noise (for ablations)."""
    n = shape[0]
    device = torch.device(device)
    if isinstance(seed, torch.Generator):
        return torch.randn(shape, generator=seed, device=seed.device).to(device)
    out = torch.empty(shape, dtype=torch.float32)
    gen = torch.Generator()
    for i, s in enumerate(item_seeds(seed, n)):
        gen.manual_seed(s)
        out[i] = torch.randn(shape[1:], generator=gen)
    return out.to(device)


@dataclass(frozen=True)
class NoiseSource:
    """The noise used by both training and inference, so the two stay identical: call(shape, seed, device)."""

    kind: Literal["simplex", "gaussian"] = "simplex"
    octaves: int = 6
    base_frequency: float = 2**-6
    persistence: float = 0.8
    # Seed-independent lattice geometry per image size, filled on first use (per instance, not global).
    cache: dict[tuple[object, ...], LatticeGeometry] = field(default_factory=dict, compare=False, repr=False)

    def __call__(
        self, shape: tuple[int, int, int], seed: SeedLike = 0, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        if self.kind == "gaussian":
            return gaussian_noise(shape, seed, device)
        if self.kind == "simplex":
            return simplex_noise(
                shape, seed, device, self.octaves, self.base_frequency, self.persistence, geometry_cache=self.cache
            )
        raise ValueError(f"unknown noise kind {self.kind!r}: use 'simplex' or 'gaussian'")
