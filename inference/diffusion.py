"""Noise schedule, partial forward diffusion and the strided reverse sampler.

Conventions (shared with training): timesteps are integers t in [0, T-1]; alpha_bar[t] = prod_{s<=t} (1 - beta_s);
q(x_t | x_0) = N(sqrt(alpha_bar[t]) x_0, (1 - alpha_bar[t]) I) with the noise drawn from a NoiseSource (simplex or
Gaussian); the network predicts that noise. Anomaly detection only diffuses to t_start << T (AnoDDPM), so anatomy
survives and the reverse process "heals" what the model has not seen.

The reverse process visits a descending schedule t_start = tau_0 > tau_1 > ... > tau_{S-1} (one U-Net call each)
and ends at the clean image. Each step estimates x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t), then
- DDIM (deterministic): x_prev = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev) eps;
- DDPM (stochastic): x_prev ~ q(x_prev | x_t, x0_hat), the Gaussian posterior between the two visited
  timesteps, mean c0 x0_hat + ct x_t and variance (1 - ab_prev)/(1 - ab_t) (1 - ab_t/ab_prev), with the fresh
  noise from the same NoiseSource.
The last step returns x0_hat itself. So with an oracle denoiser (eps = the noise actually present in x_t given
x0) both samplers return x0 exactly, for any t_start and stride: that is the exactness test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from inference.denoiser import Denoiser
from inference.simplex import NoiseSource, splitmix64

Sampler = Literal["ddpm", "ddim"]


@dataclass(frozen=True)
class LinearSchedule:
    """DDPM's linear beta schedule; alpha_bar as float64 numpy for exact coefficients."""

    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    betas: np.ndarray = field(init=False, repr=False, compare=False)
    alpha_bars: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        betas = np.linspace(self.beta_start, self.beta_end, self.T, dtype=np.float64)
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alpha_bars", np.cumprod(1.0 - betas))

    def alpha_bar(self, t: torch.Tensor | int, device: torch.device | str = "cpu") -> torch.Tensor:
        """alpha_bar[t] as float32 on device, same shape as t."""
        index = torch.as_tensor(t, dtype=torch.long).cpu().numpy()
        return torch.as_tensor(self.alpha_bars[index], dtype=torch.float32, device=device)


def q_sample(schedule: LinearSchedule, x0: torch.Tensor, t: torch.Tensor | int, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar[t]) x0 + sqrt(1 - alpha_bar[t]) noise; t is an int or an (N,) tensor for (N, ...) x0."""
    ab = schedule.alpha_bar(t, x0.device).to(x0.dtype)
    if ab.ndim:
        ab = ab.reshape(-1, *([1] * (x0.ndim - 1)))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def strided_timesteps(t_start: int, steps: int | None = None, stride: int | None = None) -> list[int]:
    """Descending visited timesteps from t_start, either `steps` of them evenly spaced down to 0, or every
    `stride`-th (down to the last one at or above 0: with a stride that does not divide t_start the last step
    predicts x0 from a small t > 0).

    steps=t_start+1 or stride=1 visits every t. Each visited timestep is one denoiser call.
    """
    if t_start < 0:
        raise ValueError(f"t_start must be >= 0, got {t_start}")
    if stride is not None:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        return list(range(t_start, -1, -stride))
    if steps is None:
        steps = 10
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    steps = min(steps, t_start + 1)
    if steps == 1:
        return [t_start]
    taus = np.round(np.linspace(t_start, 0, steps)).astype(int)
    return sorted({int(t) for t in taus}, reverse=True)


def step_seeds(item_seeds: Sequence[int], step: int) -> list[int]:
    """Seeds for the fresh noise of reverse step `step`, per item: independent of batching and chunking."""
    return [splitmix64(s, 1_000_003 + step) for s in item_seeds]


def denoise(denoiser: Denoiser, x_t: torch.Tensor, cond: torch.Tensor, t: int) -> torch.Tensor:
    """eps for a batch of any size, chunked to denoiser.max_batch."""
    out = []
    for start in range(0, x_t.shape[0], denoiser.max_batch):
        xs = x_t[start : start + denoiser.max_batch]
        cs = cond[start : start + denoiser.max_batch]
        ts = torch.full((xs.shape[0],), float(t), dtype=torch.float32, device=xs.device)
        out.append(denoiser(xs, cs, ts))
    return torch.cat(out, dim=0)


def reverse_process(
    x_t: torch.Tensor,
    cond: torch.Tensor,
    denoiser: Denoiser,
    schedule: LinearSchedule,
    timesteps: Sequence[int],
    sampler: Sampler = "ddim",
    noise: NoiseSource | None = None,
    item_seeds: Sequence[int] | None = None,
    clip: bool = True,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the reverse process from x_t at timesteps[0] down the schedule; returns the clean estimate.

    x_t, cond: (N, 1, H, W) on the denoiser's device. clip limits x0_hat to [-1, 1] (the data range).
    noise and item_seeds are needed for the DDPM sampler (fresh noise per step and item). on_step(t, x) sees the
    state after each step, for tests and progress.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}: use 'ddpm' or 'ddim'")
    if sampler == "ddpm" and (noise is None or item_seeds is None):
        raise ValueError("the ddpm sampler needs a noise source and per-item seeds")
    x = x_t
    n, _, h, w = x.shape
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        ab_t = float(schedule.alpha_bars[t])
        ab_prev = float(schedule.alpha_bars[t_prev]) if t_prev >= 0 else 1.0
        eps = denoise(denoiser, x, cond, t)
        x0_hat = (x - np.sqrt(1.0 - ab_t) * eps) / np.sqrt(ab_t)
        if clip:
            x0_hat = x0_hat.clamp(-1.0, 1.0)
        if t_prev < 0:
            x = x0_hat
        elif sampler == "ddim":
            # Re-derive eps from the (possibly clipped) x0_hat so the step stays consistent with it.
            eps = (x - np.sqrt(ab_t) * x0_hat) / np.sqrt(1.0 - ab_t)
            x = np.sqrt(ab_prev) * x0_hat + np.sqrt(1.0 - ab_prev) * eps
        else:
            alpha = ab_t / ab_prev  # product of (1 - beta) over (t_prev, t]
            c0 = np.sqrt(ab_prev) * (1.0 - alpha) / (1.0 - ab_t)
            ct = np.sqrt(alpha) * (1.0 - ab_prev) / (1.0 - ab_t)
            sigma = np.sqrt((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - alpha))
            assert noise is not None and item_seeds is not None
            z = noise((n, h, w), step_seeds(item_seeds, i), x.device).unsqueeze(1)
            x = c0 * x0_hat + ct * x + sigma * z
        if on_step is not None:
            on_step(t_prev, x)
    return x
