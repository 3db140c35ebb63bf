"""The Denoiser protocol: how the inference code calls the U-Net, whatever executes it.

The consumer owns the interface: diffusion, ensemble and pipeline code call a Denoiser, and each backend in
engines/ implements it (engines import this module, never the other way round). A model's identity
(`model_id`, name plus content hash of the weights) comes from `inference.unet.ModelInfo`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Denoiser(Protocol):
    """eps = f(x_t, cond, t) on batches.

    x_t and cond are (N, 1, H, W) float32 tensors on `device`, t is an (N,) float32 tensor of
    timesteps; the result is the predicted noise, (N, 1, H, W) float32 on `device`. Backends that
    compute in lower precision convert at the boundary. N may not exceed `max_batch`; callers chunk.
    """

    name: str  # e.g. "torch-cpu-fp32", "onnxruntime-cpu", "tensorrt-fp16"
    device: torch.device
    dtype: torch.dtype  # compute precision
    max_batch: int
    model_id: str  # identity of the weights being run: ModelInfo.model_id

    def __call__(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
