"""Random-weight U-Nets for engine tests (the shipped weights zero-initialise the output layers)."""

from __future__ import annotations

from pathlib import Path

import torch

from inference.unet import PRESETS, ModelInfo, UNet, save_model


def random_unet(preset: str = "tiny", seed: int = 0) -> UNet:
    """A UNet whose every weight is random, so its output is far from zero and every layer matters."""
    torch.manual_seed(seed)
    model = UNet(PRESETS[preset])
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    return model.eval()


def saved_unet(directory: Path, preset: str = "tiny", seed: int = 0) -> tuple[UNet, ModelInfo, Path]:
    model = random_unet(preset, seed)
    path = directory / f"{preset}-{seed}.safetensors"
    info = save_model(model, path, f"test-{preset}")
    return model, info, path


def random_batch(n: int, size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=gen)
    cond = (torch.rand(n, 1, size, size, generator=gen) > 0.5).float()
    return x, cond, torch.rand(n, generator=gen) * 1000


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float().cpu() - ref.float().cpu()).norm() / ref.float().cpu().norm())
