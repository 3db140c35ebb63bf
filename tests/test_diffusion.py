"""Schedule, forward noising and both reverse samplers; exactness with an oracle denoiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.denoiser import Denoiser
from inference.diffusion import LinearSchedule, q_sample, reverse_process, strided_timesteps
from inference.simplex import NoiseSource
from inference.unet import PRESETS, UNet


class OracleDenoiser:
    """Knows the clean images: returns the noise actually present in x_t, (x_t - sqrt(ab) x0) / sqrt(1 - ab).

    Items arrive in order, chunked by max_batch; the oracle follows the position cyclically. With
    slice_from_cond, cond's first pixel holds the index into x0 instead (for callers that reorder items).
    """

    name = "oracle"
    device = torch.device("cpu")
    dtype = torch.float32
    model_id = "oracle"

    def __init__(
        self, x0: torch.Tensor, schedule: LinearSchedule, max_batch: int = 64, slice_from_cond: bool = False
    ) -> None:
        self.x0 = x0
        self.slice_from_cond = slice_from_cond
        self.schedule = schedule
        self.max_batch = max_batch
        self.offset = 0
        self.calls = 0

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x_t.shape[0] <= self.max_batch and cond.shape == x_t.shape and t.shape == (x_t.shape[0],)
        n = x_t.shape[0]
        idx = (torch.arange(n) + self.offset) % self.x0.shape[0]
        if self.slice_from_cond:
            idx = cond[:, 0, 0, 0].round().long()
        self.offset = (self.offset + n) % self.x0.shape[0]
        self.calls += 1
        ab = torch.as_tensor(self.schedule.alpha_bars[t.long().numpy()], dtype=torch.float64).reshape(-1, 1, 1, 1)
        return ((x_t.double() - ab.sqrt() * self.x0[idx].double()) / (1 - ab).sqrt()).float()


class TinyUNetDenoiser:
    """The tiny U-Net run eagerly on the CPU, satisfying the Denoiser protocol (engines/ builds the real ones)."""

    name = "test-torch-cpu"
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, seed: int = 0, max_batch: int = 8) -> None:
        torch.manual_seed(seed)
        self.model = UNet(PRESETS["tiny"]).eval()
        with torch.no_grad():  # the head is zero-initialised; make the untrained output non-trivial
            self.model.head[-1].weight.normal_(0, 0.05)
        self.max_batch = max_batch
        self.model_id = f"tiny-test-{seed}"

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert x_t.shape[0] <= self.max_batch
        with torch.no_grad():
            return self.model(x_t, cond, t)


def images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand((n, 1, size, size), generator=g) * 2 - 1).clamp(-0.99, 0.99)


def test_protocol_satisfied() -> None:
    schedule = LinearSchedule()
    assert isinstance(OracleDenoiser(images(), schedule), Denoiser)
    assert isinstance(TinyUNetDenoiser(), Denoiser)


def test_linear_schedule_values() -> None:
    s = LinearSchedule()
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    assert s.alpha_bars[0] == pytest.approx(1 - 1e-4)
    b1 = 1e-4 + (0.02 - 1e-4) / 999
    assert s.alpha_bars[1] == pytest.approx((1 - 1e-4) * (1 - b1))
    assert s.alpha_bars[999] < 1e-4
    short = LinearSchedule(T=10)
    assert len(short.alpha_bars) == 10


def test_q_sample_hand_computed() -> None:
    s = LinearSchedule()
    x0 = torch.full((2, 1, 2, 2), 0.5)
    noise = torch.ones_like(x0)
    out = q_sample(s, x0, torch.tensor([0, 999]), noise)
    ab0, ab999 = s.alpha_bars[0], s.alpha_bars[999]
    assert float(out[0, 0, 0, 0]) == pytest.approx(np.sqrt(ab0) * 0.5 + np.sqrt(1 - ab0), rel=1e-5)
    assert float(out[1, 0, 0, 0]) == pytest.approx(np.sqrt(ab999) * 0.5 + np.sqrt(1 - ab999), rel=1e-5)
    assert torch.allclose(q_sample(s, x0, 0, noise)[1], out[0])


def test_strided_timesteps() -> None:
    assert strided_timesteps(250, steps=6) == [250, 200, 150, 100, 50, 0]
    assert strided_timesteps(10, stride=3) == [10, 7, 4, 1]
    assert strided_timesteps(5, steps=100) == [5, 4, 3, 2, 1, 0]
    assert strided_timesteps(3, stride=1) == [3, 2, 1, 0]
    assert strided_timesteps(40, steps=1) == [40]
    with pytest.raises(ValueError):
        strided_timesteps(-1)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
@pytest.mark.parametrize(
    ("t_start", "stride"), [(0, 1), (1, 1), (37, 1), (250, 25), (250, 1), (550, 55), (999, 111), (999, 1), (123, 200)]
)
def test_oracle_reconstructs_exactly(sampler: str, t_start: int, stride: int) -> None:
    """Both samplers return x0 to 1e-4 from any t_start with any stride, given the true noise."""
    schedule = LinearSchedule()
    x0 = images(3, 12, seed=t_start)
    # Simplex for short trajectories; Gaussian keeps the 1000-step DDPM case fast. Both are unit variance.
    noise = NoiseSource("simplex" if stride > 1 or t_start < 100 else "gaussian")
    seeds = [11, 12, 13]
    x_t = q_sample(schedule, x0, t_start, noise((3, 12, 12), seeds).unsqueeze(1))
    if t_start >= 250:
        assert (x_t - x0).abs().mean() > 0.3  # genuinely noisy
    oracle = OracleDenoiser(x0, schedule, max_batch=2)  # forces chunked calls
    timesteps = strided_timesteps(t_start, stride=stride)
    out = reverse_process(x_t, torch.zeros_like(x0), oracle, schedule, timesteps, sampler, noise, seeds)
    assert (out - x0).abs().max() < 1e-4
    assert oracle.calls == len(timesteps) * 2


def test_ddpm_intermediate_states_have_the_forward_marginals() -> None:
    """With the oracle, each stochastic step must land on sqrt(ab) x0 + sqrt(1 - ab) eps with unit-variance eps."""
    schedule = LinearSchedule()
    x0 = images(8, 48, seed=1)
    seeds = list(range(8))
    noise = NoiseSource("gaussian")
    x_t = q_sample(schedule, x0, 400, noise((8, 48, 48), seeds).unsqueeze(1))
    implied_std = []

    def on_step(t: int, x: torch.Tensor) -> None:
        if t >= 0:
            ab = schedule.alpha_bars[t]
            implied_std.append(float(((x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)).std()))

    oracle = OracleDenoiser(x0, schedule)
    reverse_process(
        x_t,
        torch.zeros_like(x0),
        oracle,
        schedule,
        strided_timesteps(400, steps=9),
        "ddpm",
        noise,
        seeds,
        on_step=on_step,
    )
    assert len(implied_std) == 8
    assert all(abs(s - 1.0) < 0.05 for s in implied_std), implied_std


def test_ddpm_needs_noise_and_seeds() -> None:
    schedule = LinearSchedule()
    x0 = images(1, 8)
    with pytest.raises(ValueError, match="ddpm"):
        reverse_process(x0, x0, OracleDenoiser(x0, schedule), schedule, [5, 0], "ddpm")
    with pytest.raises(ValueError, match="unknown sampler"):
        reverse_process(x0, x0, OracleDenoiser(x0, schedule), schedule, [5, 0], "euler")  # type: ignore[arg-type]


def test_tiny_unet_sampler_runs_and_is_deterministic() -> None:
    schedule = LinearSchedule()
    unet = TinyUNetDenoiser(max_batch=2)
    x0 = images(3, 16)
    cond = (x0 > 0).float()
    noise = NoiseSource()
    seeds = list(range(3))
    x_t = q_sample(schedule, x0, 250, noise((3, 16, 16), seeds).unsqueeze(1))
    ts = strided_timesteps(250, steps=3)
    a = reverse_process(x_t, cond, unet, schedule, ts, "ddim")
    b = reverse_process(x_t, cond, unet, schedule, ts, "ddim")
    c = reverse_process(x_t, cond, unet, schedule, ts, "ddpm", noise, seeds)
    assert a.shape == x0.shape and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.abs().max() <= 1.0


def test_start_beyond_the_schedule_and_zero_steps_are_clear_errors() -> None:
    from inference.pipeline import PipelineSettings

    with pytest.raises(ValueError, match="t_start 1000 for CT must be below the schedule's T = 1000"):
        PipelineSettings(t_start={"CT": 1000}).timesteps("CT")
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        strided_timesteps(250, steps=0)
    assert strided_timesteps(250)[0] == 250 and len(strided_timesteps(250)) == 10  # the default: 10 steps
