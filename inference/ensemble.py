"""K-member reconstruction ensemble: members x slices as one batch, chunked to the denoiser's batch limit.

Each member sees the same slice with different noise (its own seed), so the spread of the reconstructions says
how sure the model is; the mean reconstruction is what detection uses (the error against it is the anomaly map).
Seeds are per (member, slice) item, so results do not depend on the chunk size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from inference.denoiser import Denoiser
from inference.diffusion import LinearSchedule, Sampler, q_sample, reverse_process
from inference.simplex import NoiseSource, splitmix64


@dataclass
class EnsembleOutput:
    """Per slice on the model grid, (Z, H, W) float32 on the CPU."""

    mean: torch.Tensor  # mean reconstruction over members
    std: torch.Tensor  # population std (ddof=0) across members: the uncertainty map; zero for one member
    anomaly_map: torch.Tensor  # (input - mean reconstruction) ** 2
    denoiser_calls: int  # batched U-Net calls made


def member_seeds(seed: int, members: int, slices: int) -> list[int]:
    """Seed of item (member k, slice z) at index k * slices + z."""
    return [splitmix64(splitmix64(seed, k), z) for k in range(members) for z in range(slices)]


def ensemble_reconstruct(
    x0: torch.Tensor,
    cond: torch.Tensor,
    denoiser: Denoiser,
    schedule: LinearSchedule,
    timesteps: Sequence[int],
    members: int = 7,
    sampler: Sampler = "ddim",
    noise: NoiseSource | None = None,
    seed: int = 0,
    clip: bool = True,
    progress: Callable[[float], None] | None = None,
) -> EnsembleOutput:
    """Diffuse each slice to timesteps[0] and reconstruct it `members` times.

    x0, cond: (Z, H, W) in [-1, 1] and {0, 1}. Items are (member, slice) pairs in member-major order; a chunk of
    up to denoiser.max_batch items runs the whole reverse process before the next chunk starts, so memory is
    bounded by the chunk. Sums of the differences to member 0's reconstruction (always computed first) are
    accumulated: shifting by a member avoids the float32 cancellation of sum(x^2) - sum(x)^2 when members agree.
    """
    if members < 1:
        raise ValueError(f"ensemble members must be >= 1, got {members}")
    noise = noise or NoiseSource()
    device = denoiser.device
    z, h, w = x0.shape
    x0 = x0.to(device=device, dtype=torch.float32)
    cond = cond.to(device=device, dtype=torch.float32)
    seeds = member_seeds(seed, members, z)
    total = members * z
    chunk = max(1, int(denoiser.max_batch))
    reference = torch.zeros((z, h, w), dtype=torch.float32, device=device)
    sum_d = torch.zeros((z, h, w), dtype=torch.float32, device=device)
    sum_d2 = torch.zeros((z, h, w), dtype=torch.float32, device=device)
    n_chunks = (total + chunk - 1) // chunk
    total_steps = n_chunks * len(timesteps)
    steps_done = 0

    def on_step(_t: int, _x: torch.Tensor) -> None:
        nonlocal steps_done
        steps_done += 1
        if progress is not None:
            progress(steps_done / total_steps)

    for start in range(0, total, chunk):
        idx = torch.arange(start, min(start + chunk, total), device=device)
        slices = idx % z
        item_seeds = seeds[start : start + len(idx)]
        xc = x0[slices].unsqueeze(1)
        cc = cond[slices].unsqueeze(1)
        start_noise = noise((len(idx), h, w), item_seeds, device).unsqueeze(1)
        x_t = q_sample(schedule, xc, int(timesteps[0]), start_noise)

        rec = reverse_process(
            x_t, cc, denoiser, schedule, timesteps, sampler, noise, item_seeds, clip=clip, on_step=on_step
        )
        rec = rec[:, 0].float()
        first = idx < z  # member 0
        reference[slices[first]] = rec[first]
        d = rec - reference[slices]
        sum_d.index_add_(0, slices, d)
        sum_d2.index_add_(0, slices, d * d)
    mean_d = sum_d / members
    var = (sum_d2 / members - mean_d * mean_d).clamp(min=0.0)
    mean = reference + mean_d
    return EnsembleOutput(
        mean=mean.cpu(),
        std=var.sqrt().cpu(),
        anomaly_map=((x0 - mean) ** 2).cpu(),
        denoiser_calls=steps_done,  # one call per step per chunk: chunks never exceed max_batch
    )
