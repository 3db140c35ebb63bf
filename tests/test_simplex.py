"""Simplex noise: agreement with the opensimplex reference, unit variance, independence, reproducibility."""

from __future__ import annotations

import numpy as np
import opensimplex
import pytest
import torch
from opensimplex.internals import _init

from inference.simplex import (
    SIMPLEX_STD,
    NoiseSource,
    gaussian_noise,
    item_seeds,
    opensimplex2,
    opensimplex_permutations,
    simplex_noise,
    splitmix64,
)


@pytest.mark.parametrize("seed", [0, 3, 1234567, -42, 2**62 + 17, 2**63 - 1])
def test_permutation_matches_reference(seed: int) -> None:
    perm, _ = _init(seed)
    assert np.array_equal(opensimplex_permutations([seed])[0], perm)


@pytest.mark.parametrize("frequency", [2**-6, 0.173, 0.5])
def test_single_octave_matches_opensimplex(frequency: float) -> None:
    """Per item, the field equals opensimplex.OpenSimplex(seed).noise2array on the same coordinates."""
    seeds = [3, 99, 2**40 + 5]
    xs = np.arange(40) * frequency + 0.3
    ys = np.arange(24) * frequency - 7.1
    x = torch.tensor(xs, dtype=torch.float32)[None, :].expand(24, 40)
    y = torch.tensor(ys, dtype=torch.float32)[:, None].expand(24, 40)
    ours = opensimplex2(x, y, seeds)
    assert ours.shape == (3, 24, 40) and ours.dtype == torch.float32
    for i, seed in enumerate(seeds):
        ref = opensimplex.OpenSimplex(seed).noise2array(xs, ys)
        np.testing.assert_allclose(ours[i].numpy(), ref, atol=2e-5, rtol=0)
        assert np.abs(ref).max() > 0.1  # a real field, not zeros


def test_scattered_points_match_noise2() -> None:
    rng = np.random.default_rng(0)
    pts = rng.uniform(-50, 50, (2, 200))
    ours = opensimplex2(torch.tensor(pts[0]), torch.tensor(pts[1]), [7])[0].numpy()
    ref = np.array([opensimplex.OpenSimplex(7).noise2(a, b) for a, b in pts.T])
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


def test_multi_octave_is_the_weighted_sum_of_seeded_octaves() -> None:
    """simplex_noise = sum persistence^o * OpenSimplex(seed_o)(pixel * f * 2^o) / (std constant)."""
    h, w, freq, pers, octaves = 16, 20, 2**-4, 0.8, 3
    field = simplex_noise((1, h, w), [11], octaves=octaves, base_frequency=freq, persistence=pers)[0].numpy()
    expected = np.zeros((h, w))
    for o in range(octaves):
        f = freq * 2**o
        expected += pers**o * opensimplex.OpenSimplex(splitmix64(11, o)).noise2array(np.arange(w) * f, np.arange(h) * f)
    scale = SIMPLEX_STD * np.sqrt(sum(pers ** (2 * o) for o in range(octaves)))
    np.testing.assert_allclose(field, expected / scale, atol=1e-5)


def test_unit_variance_within_5_percent() -> None:
    noise = simplex_noise((96, 64, 64), 5)
    var = float(noise.double().pow(2).mean())
    assert abs(var - 1.0) < 0.05
    assert abs(float(noise.double().mean())) < 0.1


def test_defaults_and_shape() -> None:
    noise = simplex_noise((2, 33, 17))
    assert noise.shape == (2, 33, 17) and noise.dtype == torch.float32
    assert torch.isfinite(noise).all()


def test_differs_per_item_and_per_seed() -> None:
    a = simplex_noise((3, 32, 32), 1)
    b = simplex_noise((3, 32, 32), 2)
    for i in range(3):
        for j in range(i + 1, 3):
            assert abs(float(torch.corrcoef(torch.stack([a[i].flatten(), a[j].flatten()]))[0, 1])) < 0.9
            assert not torch.allclose(a[i], a[j])
        assert not torch.allclose(a[i], b[i])


def test_reproducible_and_independent_of_batch_size() -> None:
    a = simplex_noise((4, 32, 32), 9)
    b = simplex_noise((4, 32, 32), 9)
    assert torch.equal(a, b)
    c = simplex_noise((2, 32, 32), 9)
    assert torch.equal(a[:2], c)  # item i's field depends only on (seed, i)
    d = simplex_noise((2, 32, 32), item_seeds(9, 4)[2:])
    assert torch.equal(a[2:], d)


def test_generator_seeding_is_reproducible() -> None:
    g1 = torch.Generator().manual_seed(4)
    g2 = torch.Generator().manual_seed(4)
    assert torch.equal(simplex_noise((2, 16, 16), g1), simplex_noise((2, 16, 16), g2))


def test_low_frequency_dominates_power_spectrum() -> None:
    """Simplex noise is structured: most power at low spatial frequencies, unlike white Gaussian noise."""

    def low_fraction(field: torch.Tensor) -> float:
        power = torch.fft.fft2(field - field.mean(dim=(-2, -1), keepdim=True)).abs() ** 2
        freqs = torch.fft.fftfreq(64)
        radius = (freqs[:, None] ** 2 + freqs[None, :] ** 2).sqrt()
        return float(power[..., radius < 0.125].sum() / power.sum())

    assert low_fraction(simplex_noise((8, 64, 64), 0)) > 0.6
    assert low_fraction(gaussian_noise((8, 64, 64), 0)) < 0.1


def test_gaussian_noise_statistics_and_seeds() -> None:
    g = gaussian_noise((16, 32, 32), 3)
    assert abs(float(g.std()) - 1.0) < 0.05
    assert torch.equal(g[:4], gaussian_noise((4, 32, 32), 3))
    assert not torch.equal(g, gaussian_noise((16, 32, 32), 4))


def test_noise_source_dispatch() -> None:
    assert torch.equal(NoiseSource("simplex")((2, 16, 16), 1), simplex_noise((2, 16, 16), 1))
    assert torch.equal(NoiseSource("gaussian")((2, 16, 16), 1), gaussian_noise((2, 16, 16), 1))
    with pytest.raises(ValueError, match="unknown noise"):
        NoiseSource("pink")((1, 4, 4), 0)  # type: ignore[arg-type]


def test_item_seeds_validation() -> None:
    with pytest.raises(ValueError, match="2 seeds for 3 items"):
        item_seeds([1, 2], 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    cpu = simplex_noise((3, 64, 64), 2)
    gpu = simplex_noise((3, 64, 64), 2, device="cuda")
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-5)
