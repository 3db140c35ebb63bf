"""Helpers shared by the backends that implement `inference.denoiser.Denoiser`: precisions, input checks, chunking."""

from __future__ import annotations

import torch

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_inputs(x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor, max_batch: int) -> int:
    """Validate a call's shapes against the protocol; returns the batch size.

    Backends fail here with a message that names the problem instead of deep inside a kernel.
    """
    if x_t.ndim != 4 or x_t.shape[1] != 1:
        raise ValueError(f"x_t must be (N, 1, H, W), got {tuple(x_t.shape)}")
    if cond.shape != x_t.shape:
        raise ValueError(f"cond must have x_t's shape {tuple(x_t.shape)}, got {tuple(cond.shape)}")
    n = x_t.shape[0]
    if t.shape != (n,):
        raise ValueError(f"t must be ({n},), got {tuple(t.shape)}")
    if n < 1 or n > max_batch:
        raise ValueError(f"batch of {n} images is outside 1..{max_batch} (max_batch); chunk the call")
    return n


def batch_slices(n: int, chunk: int | None) -> list[slice]:
    """Split a batch of n into consecutive slices of at most `chunk` (None or 0: one slice)."""
    if not chunk or chunk >= n:
        return [slice(0, n)]
    return [slice(i, min(i + chunk, n)) for i in range(0, n, chunk)]
