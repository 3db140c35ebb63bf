"""The ensemble: batching over members x slices, chunk invariance, mean / std / anomaly map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.diffusion import LinearSchedule, q_sample, reverse_process, strided_timesteps
from inference.ensemble import ensemble_reconstruct, member_seeds
from inference.simplex import NoiseSource
from tests.test_diffusion import OracleDenoiser, TinyUNetDenoiser


def volume(z: int = 3, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand((z, size, size), generator=g) * 1.8 - 0.9
    return x0, (x0 > 0).float()


def test_oracle_ensemble_is_exact() -> None:
    schedule = LinearSchedule()
    x0, _ = volume()
    members = 4
    cond = torch.arange(3, dtype=torch.float32)[:, None, None].expand(3, 16, 16)  # tells the oracle the slice
    oracle = OracleDenoiser(x0[:, None], schedule, max_batch=5, slice_from_cond=True)
    progress: list[float] = []
    out = ensemble_reconstruct(
        x0,
        cond,
        oracle,
        schedule,
        strided_timesteps(300, steps=5),
        members,
        "ddpm",
        NoiseSource(),
        seed=1,
        progress=progress.append,
    )
    assert (out.mean - x0).abs().max() < 1e-4
    assert out.std.max() < 1e-4 and out.anomaly_map.max() < 1e-8
    chunks = -(-members * 3 // 5)
    assert out.denoiser_calls == chunks * 5 == oracle.calls
    assert progress[-1] == pytest.approx(1.0) and progress == sorted(progress)


def test_mean_std_and_map_match_members_run_one_by_one() -> None:
    schedule = LinearSchedule()
    x0, cond = volume(z=2, size=16)
    members, ts = 3, strided_timesteps(200, steps=3)
    unet = TinyUNetDenoiser(max_batch=4)
    noise = NoiseSource()
    out = ensemble_reconstruct(x0, cond, unet, schedule, ts, members, "ddim", noise, seed=7)
    seeds = member_seeds(7, members, 2)
    recs = []
    for k in range(members):
        s = seeds[k * 2 : (k + 1) * 2]
        x_t = q_sample(schedule, x0[:, None], ts[0], noise((2, 16, 16), s).unsqueeze(1))
        recs.append(reverse_process(x_t, cond[:, None], unet, schedule, ts, "ddim")[:, 0])
    stack = torch.stack(recs)
    np.testing.assert_allclose(out.mean, stack.mean(0), atol=1e-5)
    np.testing.assert_allclose(out.std, stack.std(0, unbiased=False), atol=1e-4)
    np.testing.assert_allclose(out.anomaly_map, (x0 - stack.mean(0)) ** 2, atol=1e-5)
    assert out.std.mean() > 1e-3  # members genuinely differ


def test_result_does_not_depend_on_chunk_size() -> None:
    schedule = LinearSchedule()
    x0, cond = volume(z=3, size=16)
    ts = strided_timesteps(150, steps=2)
    a = ensemble_reconstruct(x0, cond, TinyUNetDenoiser(max_batch=2), schedule, ts, 2, "ddpm", seed=3)
    b = ensemble_reconstruct(x0, cond, TinyUNetDenoiser(max_batch=6), schedule, ts, 2, "ddpm", seed=3)
    np.testing.assert_allclose(a.mean, b.mean, atol=1e-5)
    np.testing.assert_allclose(a.std, b.std, atol=1e-5)
    c = ensemble_reconstruct(x0, cond, TinyUNetDenoiser(max_batch=6), schedule, ts, 2, "ddpm", seed=4)
    assert not torch.allclose(a.mean, c.mean)


def test_single_member_has_zero_uncertainty_and_validation() -> None:
    schedule = LinearSchedule()
    x0, cond = volume(z=1, size=16)
    out = ensemble_reconstruct(x0, cond, TinyUNetDenoiser(), schedule, [50, 0], members=1)
    assert out.std.abs().max() == 0
    with pytest.raises(ValueError, match="members"):
        ensemble_reconstruct(x0, cond, TinyUNetDenoiser(), schedule, [50, 0], members=0)


def test_member_seeds_are_distinct() -> None:
    seeds = member_seeds(0, 7, 30)
    assert len(set(seeds)) == 210
    assert member_seeds(0, 2, 3) == seeds[:3] + seeds[30:33]


def test_mixed_depth_members_alternate_between_schedules_and_match_members_run_one_by_one() -> None:
    """Member k runs schedule k mod 2 (250 or 550 here) with its own seed; mean, std and map are those of the members
    reconstructed one by one, whatever the chunk size, and the denoiser sees the deep start exactly for odd members."""
    schedule = LinearSchedule()
    x0, cond = volume(z=2, size=16)
    members, shallow, deep = 3, strided_timesteps(250, steps=3), strided_timesteps(550, steps=4)
    noise = NoiseSource()
    starts: list[int] = []

    class Recording(TinyUNetDenoiser):
        def __call__(self, x_t: torch.Tensor, c: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            starts.extend(int(v) for v in t if int(v) in (shallow[0], deep[0]))
            return super().__call__(x_t, c, t)

    out = ensemble_reconstruct(
        x0, cond, Recording(max_batch=3), schedule, shallow, members, "ddim", noise, 7, deeper=[deep]
    )
    small = ensemble_reconstruct(
        x0, cond, TinyUNetDenoiser(max_batch=1), schedule, shallow, members, "ddim", noise, 7, deeper=[deep]
    )
    seeds = member_seeds(7, members, 2)
    recs = []
    for k in range(members):
        ts = (shallow, deep)[k % 2]
        x_t = q_sample(schedule, x0[:, None], ts[0], noise((2, 16, 16), seeds[k * 2 : (k + 1) * 2]).unsqueeze(1))
        recs.append(reverse_process(x_t, cond[:, None], TinyUNetDenoiser(), schedule, ts, "ddim")[:, 0])
    stack = torch.stack(recs)
    for result in (out, small):
        np.testing.assert_allclose(result.mean, stack.mean(0), atol=1e-5)
        np.testing.assert_allclose(result.std, stack.std(0, unbiased=False), atol=1e-4)
        np.testing.assert_allclose(result.anomaly_map, (x0 - stack.mean(0)) ** 2, atol=1e-5)
    assert sorted(starts) == [shallow[0]] * 4 + [deep[0]] * 2  # 2 shallow members x 2 slices, 1 deep member x 2
    assert out.denoiser_calls == 2 * 3 + 1 * 4  # shallow items 4 = 2 chunks of 3 steps; deep items 2 = 1 chunk of 4
    with pytest.raises(ValueError, match="depths need"):
        ensemble_reconstruct(x0, cond, TinyUNetDenoiser(), schedule, shallow, members=1, deeper=[deep])
