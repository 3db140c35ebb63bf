"""A learned refinement of the CT lung mask: takes in consolidations and pleural nodules the threshold mask leaves out.

Why: the threshold mask (`inference.lungmask.ct_lung_mask`) finds lung as air, so an opacity that fills lung
against the chest wall or the heart is no lung to it, and the diffusion model, told "no lung here", reconstructs it
as the soft tissue it looks like: it is never outlined (on validation phantoms the threshold mask holds 45 % of
consolidation voxels). Geometric priors (convex hulls, wider gap filling) take the heart's notch in with the
consolidations, and the model then paints lung over the heart (docs/method.md, "Anatomy masks"). This refiner
is a U-Net (`inference.unet`, conditioned on the threshold mask, at timestep 0) trained to output the phantoms'
true lungs, lesions included, from the CT slice and the threshold mask. The node's mask becomes the threshold
mask plus the refiner's lung eroded by one pixel in-plane (its edge is blurred by its grid; the threshold mask
draws the edge against air better): it only adds to the threshold mask, never removes.

Trained on synthetic phantoms only (`python -m inference.lung_refiner --out ...`): what it learned of lung shape
is the phantoms'. Not validated on patient images.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from inference.unet import PRESETS, ModelInfo, UNet, load_model, save_model

if TYPE_CHECKING:
    from inference.denoiser import Denoiser
    from inference.volume import GridMapping

log = logging.getLogger(__name__)

GRID = 96  # the refiner's grid: 2-4 mm per pixel for a chest CT field of view
PRESET = "small"
EROSION_PIXELS = 1  # source-grid pixels taken off the refiner's lung before it is added
PURPOSE = "ct-lung-refiner"  # metadata "purpose": what tells this file from a diffusion model
SLICES_PER_CALL = 32
PROGRESS_EVERY_S = 30.0
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


@dataclass
class LungRefiner:
    """A loaded refiner: `refine(hu, mask)` -> the mask with the lung it adds. `engine`: what runs its U-Net (a
    backend from engines/ that reproduces its output, `with_engine`); None runs `model` in fp32 torch."""

    model: UNet
    info: ModelInfo
    engine: Denoiser | None = None

    def with_engine(self, engine: Denoiser) -> LungRefiner:
        return replace(self, engine=engine)

    @property
    def model_id(self) -> str:
        return self.info.model_id

    def grid_mapping(self, hu: np.ndarray) -> GridMapping:
        """A (Z, rows, cols) volume's mapping onto the refiner's grid."""
        from inference.volume import GridMapping

        return GridMapping(rows=hu.shape[1], cols=hu.shape[2], size=self.info.config.image_size)

    def lung_probability(self, hu: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(Z, GRID, GRID) probability of lung from a CT volume in HU (Z, rows, cols) and its threshold mask."""
        from inference.volume import mask_to_grid, normalise, resample_to_grid

        mapping = self.grid_mapping(hu)
        x = torch.from_numpy(resample_to_grid(normalise(hu, "CT"), mapping, fill=-1.0))[:, None]
        cond = torch.from_numpy(mask_to_grid(mask, mapping).astype(np.float32))[:, None]
        net: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = self.model
        device, chunk = torch.device("cpu"), SLICES_PER_CALL
        if self.engine is not None:
            net, device, chunk = self.engine, self.engine.device, min(SLICES_PER_CALL, self.engine.max_batch)
        out = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], chunk):
                xs, cs = x[start : start + chunk].to(device), cond[start : start + chunk].to(device)
                logits = net(xs, cs, torch.zeros(xs.shape[0], device=device))
                out.append(torch.sigmoid(logits.float())[:, 0].cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, mapping.size, mapping.size), np.float32)

    def refine(self, hu: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The threshold `mask` (Z, rows, cols) plus the refiner's lung (probability >= 0.5, back on the source
        grid, eroded by EROSION_PIXELS in-plane)."""
        from inference.volume import mask_from_grid

        hu = np.asarray(hu, dtype=np.float32)
        mask = np.asarray(mask, dtype=bool)
        if hu.ndim != 3 or hu.shape != mask.shape:
            raise ValueError(f"refine wants a (Z, rows, cols) volume and its mask, not {hu.shape} and {mask.shape}")
        if not mask.any():  # no lungs found at all: nothing to refine (and no condition for the refiner)
            return mask
        lung = mask_from_grid(self.lung_probability(hu, mask) >= 0.5, self.grid_mapping(hu))
        return mask | ndimage.binary_erosion(lung, _IN_PLANE, iterations=EROSION_PIXELS)


def load_refiner(path: Path) -> LungRefiner:
    """A refiner file; ValueError if the file is not one (a diffusion model, say)."""
    model, info = load_model(path)
    if info.training.get("purpose") != PURPOSE:
        raise ValueError(f"{path} is not a CT lung refiner (its metadata names no purpose {PURPOSE!r})")
    return LungRefiner(model, info)


def refiner_file(choice: str) -> Path | None:
    """The file a setting names: "bundled" (the shipped refiner), "off" (None: the threshold mask alone) or a path."""
    from inference.weights import lung_refiner_path

    choice = choice.strip()
    if choice.lower() == "off":
        return None
    return lung_refiner_path() if choice == "bundled" else Path(choice)


def chosen_refiner(choice: str) -> LungRefiner | None:
    """The refiner a setting names (`refiner_file`), loaded; a missing or wrong file raises (FileNotFoundError,
    ValueError)."""
    path = refiner_file(choice)
    return None if path is None else load_refiner(path)


def refiner_phantom_seeds(info: ModelInfo) -> set[int]:
    """The phantom seeds a refiner was trained on (from its metadata), which no held-out set may use."""
    first, count = info.training.get("first_phantom_seed"), info.training.get("phantoms")
    if not isinstance(first, int) or not isinstance(count, int):
        raise ValueError(f"{info.model_id}: no first_phantom_seed / phantoms in its metadata")
    return set(range(first, first + count))


# --- training -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefinerTraining:
    phantoms: int = 360  # lesion kinds and healthy subjects in rotation
    size: int = 192
    slices: int = 16
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    first_phantom_seed: int = 7_000_000  # apart from every other use of make_ct seeds (training uses training_seeds)


def training_slices(cfg: RefinerTraining) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(slices, threshold masks, true lungs) on the refiner's grid, from phantoms of every lesion kind and healthy."""
    from inference.heldout import KINDS
    from inference.lungmask import anatomy_mask
    from inference.phantoms import TRAINING, make_ct
    from inference.volume import GridMapping, mask_to_grid, normalise, resample_to_grid

    kinds = [*KINDS, "none"]
    xs, cs, ys = [], [], []
    started = last = time.monotonic()
    for i in range(cfg.phantoms):
        ph = make_ct(cfg.first_phantom_seed + i, cfg.size, cfg.size, cfg.slices, kinds[i % len(kinds)], ranges=TRAINING)
        dz, dy, dx = ph.grid.spacing
        node = anatomy_mask(ph.hu, "CT", (dy, dx), np.array([0.0, 0.0, 1.0]), dz)
        mapping = GridMapping(rows=cfg.size, cols=cfg.size, size=GRID)
        xs.append(resample_to_grid(normalise(ph.hu, "CT"), mapping, fill=-1.0))
        cs.append(mask_to_grid(node, mapping).astype(np.float32))
        ys.append(mask_to_grid(ph.lung_mask, mapping).astype(np.float32))
        if time.monotonic() - last >= PROGRESS_EVERY_S or i + 1 == cfg.phantoms:
            last = time.monotonic()
            log.info("rendered %d/%d phantoms (%.0f s)", i + 1, cfg.phantoms, last - started)
    x, c, y = (torch.from_numpy(np.concatenate(a))[:, None] for a in (xs, cs, ys))
    return x, c, y


def train_refiner(cfg: RefinerTraining) -> tuple[UNet, list[float], float]:
    """The refiner's weights, its losses and wall time: binary cross-entropy against the true lungs, AdamW,
    bf16 autocast on a CPU with bf16 units; batch k depends only on (seed, k)."""
    from inference.hardware import cpu_info
    from inference.train import splitmix64

    torch.manual_seed(cfg.seed)
    x, c, y = training_slices(cfg)
    model = UNet(replace(PRESETS[PRESET], image_size=GRID))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    amp = cpu_info().bf16_units
    losses: list[float] = []
    started = last = time.monotonic()
    model.train()
    for step in range(cfg.steps):
        gen = torch.Generator().manual_seed(splitmix64(cfg.seed, step) % 2**63)
        idx = torch.randint(0, x.shape[0], (cfg.batch_size,), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(x[idx], c[idx], torch.zeros(cfg.batch_size))
        loss = F.binary_cross_entropy_with_logits(logits.float(), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if time.monotonic() - last >= PROGRESS_EVERY_S or step + 1 == cfg.steps:
            last = time.monotonic()
            each = (last - started) / (step + 1)
            log.info(
                "step %d/%d loss %.4f (mean of 100), %.0f s left",
                step + 1,
                cfg.steps,
                float(np.mean(losses[-100:])),
                each * (cfg.steps - step - 1),
            )
    model.eval()
    return model, losses, time.monotonic() - started


def main(argv: Sequence[str] | None = None) -> int:
    from dataclasses import asdict

    parser = argparse.ArgumentParser(prog="python -m inference.lung_refiner", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the refiner (.safetensors)")
    defaults = RefinerTraining()
    parser.add_argument("--phantoms", type=int, default=defaults.phantoms)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = replace(defaults, phantoms=args.phantoms, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    model, losses, wall = train_refiner(cfg)
    training = {**asdict(cfg), "purpose": PURPOSE, "grid": GRID, "wall_s": round(wall), "final_loss": losses[-1]}
    info = save_model(model, args.out, PURPOSE, training, modalities=("CT",), body_part="CHEST")
    print(f"{args.out}: {info.model_id}, {cfg.steps} steps in {wall:.0f} s, loss {np.mean(losses[-100:]):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
