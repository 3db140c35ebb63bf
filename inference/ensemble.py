"""K-member reconstruction ensemble: members x slices as one batch, chunked to the denoiser's batch limit.

Each member sees the same slice with different noise (its own seed), so the spread of the reconstructions says
how sure the model is; the mean reconstruction is what detection uses (the error against it is the anomaly map).
Seeds are per (member, slice) item, so results do not depend on the chunk size.

A mixed-depth ensemble gives members different timestep schedules (member k runs schedule k mod n): shallow
members keep fine anatomy, deep ones (SAC-Diff's T_s = 550 of 1000) can heal large diffuse findings that a
shallow start leaves in place.
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
    deeper: Sequence[Sequence[int]] = (),
) -> EnsembleOutput:
    """Diffuse each slice to timesteps[0] and reconstruct it `members` times.

    x0, cond: (Z, H, W) in [-1, 1] and {0, 1}. Items are (member, slice) pairs in member-major order; a chunk of
    up to denoiser.max_batch items runs the whole reverse process before the next chunk starts, so memory is
    bounded by the chunk. Sums of the differences to member 0's reconstruction (always computed first) are
    accumulated: shifting by a member avoids the float32 cancellation of sum(x^2) - sum(x)^2 when members agree.
    `deeper`: further schedules for a mixed-depth ensemble; member k runs ([timesteps, *deeper])[k % n], and
    each schedule's members are chunked on their own (one reverse process per chunk).
    """
    if members < 1:
        raise ValueError(f"ensemble members must be >= 1, got {members}")
    schedules = [list(timesteps), *(list(d) for d in deeper)]
    if len(schedules) > members:
        raise ValueError(f"{len(schedules)} depths need at least as many ensemble members, got {members}")
    noise = noise or NoiseSource()
    device = denoiser.device
    z, h, w = x0.shape
    x0 = x0.to(device=device, dtype=torch.float32)
    cond = cond.to(device=device, dtype=torch.float32)
    seeds = member_seeds(seed, members, z)
    chunk = max(1, int(denoiser.max_batch))
    reference = torch.zeros((z, h, w), dtype=torch.float32, device=device)
    sum_d = torch.zeros((z, h, w), dtype=torch.float32, device=device)
    sum_d2 = torch.zeros((z, h, w), dtype=torch.float32, device=device)
    # Items of each schedule, member-major, with member 0 (the reference) in the first chunk of schedule 0.
    groups = [
        [k * z + s for k in range(members) if k % len(schedules) == g for s in range(z)] for g in range(len(schedules))
    ]
    total_steps = sum(((len(items) + chunk - 1) // chunk) * len(schedules[g]) for g, items in enumerate(groups))
    steps_done = 0

    def on_step(_t: int, _x: torch.Tensor) -> None:
        nonlocal steps_done
        steps_done += 1
        if progress is not None:
            progress(steps_done / total_steps)

    def reconstruct_chunk(idx: torch.Tensor, item_seeds: list[int], steps: Sequence[int]) -> None:
        slices = idx % z
        xc = x0[slices].unsqueeze(1)
        cc = cond[slices].unsqueeze(1)
        start_noise = noise((len(idx), h, w), item_seeds, device).unsqueeze(1)
        x_t = q_sample(schedule, xc, int(steps[0]), start_noise)

        rec = reverse_process(
            x_t, cc, denoiser, schedule, steps, sampler, noise, item_seeds, clip=clip, on_step=on_step
        )
        rec = rec[:, 0].float()
        first = idx < z  # member 0
        reference[slices[first]] = rec[first]
        d = rec - reference[slices]
        sum_d.index_add_(0, slices, d)
        sum_d2.index_add_(0, slices, d * d)

    for steps, items in zip(schedules, groups, strict=True):
        for start in range(0, len(items), chunk):
            chunk_items = items[start : start + chunk]
            idx = torch.tensor(chunk_items, dtype=torch.long, device=device)
            reconstruct_chunk(idx, [seeds[i] for i in chunk_items], steps)
    mean_d = sum_d / members
    var = (sum_d2 / members - mean_d * mean_d).clamp(min=0.0)
    mean = reference + mean_d
    return EnsembleOutput(
        mean=mean.cpu(),
        std=var.sqrt().cpu(),
        anomaly_map=((x0 - mean) ** 2).cpu(),
        denoiser_calls=steps_done,  # one call per step per chunk: chunks never exceed max_batch
    )
