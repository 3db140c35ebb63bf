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


# What a checkpoint may be resumed with when it differs: how long the run goes, not what it learns.
RESUMABLE_CHANGES = {"steps"}
CHECKPOINT_MINUTES = 5.0


@dataclass
class RefinerRun:
    """A refiner training run's outcome: the weights, every step's loss (earlier runs' too when it continued one),
    this run's wall time and where it started from (`init`: the refiner file it continued, with its metadata)."""

    model: UNet
    losses: list[float]
    wall_s: float
    init: dict[str, object] | None = None


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


def train_refiner(cfg: RefinerTraining, checkpoint: Path | None = None, init: Path | None = None) -> RefinerRun:
    """Train the refiner: binary cross-entropy against the true lungs, AdamW, bf16 autocast on a CPU with bf16
    units; batch k depends only on (seed, k). With `checkpoint` the state is saved every CHECKPOINT_MINUTES and at
    the end, and a run whose checkpoint exists resumes from it (the same settings but `steps`); with `init` the
    run starts from that refiner's weights (a longer training of a shipped refiner), its losses and time kept."""
    from dataclasses import asdict

    from inference.hardware import cpu_info
    from inference.train import save_atomically, splitmix64

    torch.manual_seed(cfg.seed)
    model = UNet(replace(PRESETS[PRESET], image_size=GRID))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    losses: list[float] = []
    first_step, wall_before, origin = 0, 0.0, None
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        changed = {k for k, v in asdict(cfg).items() if saved["config"].get(k) != v} - RESUMABLE_CHANGES
        if changed:
            other = ", ".join(sorted(changed))
            raise ValueError(f"checkpoint {checkpoint} belongs to a run with other settings ({other})")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        first_step, losses, wall_before, origin = saved["step"], saved["losses"], saved["wall_s"], saved["init"]
        log.info("resumed from %s at step %d", checkpoint, first_step)
    elif init is not None:
        earlier = load_refiner(init)
        model.load_state_dict(earlier.model.state_dict())
        origin = {"model_id": earlier.info.model_id, **earlier.info.training}
        log.info("continuing %s (%s steps, %s s)", earlier.info.model_id, origin.get("steps"), origin.get("wall_s"))
    x, c, y = training_slices(cfg)
    amp = cpu_info().bf16_units
    started = last = last_save = time.monotonic()

    def save(step: int) -> None:
        if checkpoint is not None:
            state = {
                "config": asdict(cfg),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "losses": losses,
                "wall_s": wall_before + time.monotonic() - started,
                "init": origin,
            }
            save_atomically(state, checkpoint)

    model.train()
    for step in range(first_step, cfg.steps):
        gen = torch.Generator().manual_seed(splitmix64(cfg.seed, step) % 2**63)
        idx = torch.randint(0, x.shape[0], (cfg.batch_size,), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(x[idx], c[idx], torch.zeros(cfg.batch_size))
        loss = F.binary_cross_entropy_with_logits(logits.float(), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        now = time.monotonic()
        if now - last_save >= 60 * CHECKPOINT_MINUTES:
            save(step + 1)
            last_save = now
        if now - last >= PROGRESS_EVERY_S or step + 1 == cfg.steps:
            last = now
            each = (now - started) / (step + 1 - first_step)
            log.info(
                "step %d/%d loss %.4f (mean of 100), %.0f s left",
                step + 1,
                cfg.steps,
                float(np.mean(losses[-100:])),
                each * (cfg.steps - step - 1),
            )
    save(cfg.steps)
    model.eval()
    return RefinerRun(model, losses, wall_before + time.monotonic() - started, origin)


def main(argv: Sequence[str] | None = None) -> int:
    from dataclasses import asdict

    from inference.training_report import loss_curve_path, write_loss_curve

    parser = argparse.ArgumentParser(prog="python -m inference.lung_refiner", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the refiner (.safetensors)")
    defaults = RefinerTraining()
    parser.add_argument("--phantoms", type=int, default=defaults.phantoms)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, help="resumable state (default: <out>.ckpt); resumed if it exists")
    parser.add_argument("--init", type=Path, help="continue training this refiner (its weights; same phantoms)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = replace(
        defaults, phantoms=args.phantoms, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed
    )
    checkpoint = args.checkpoint or args.out.with_name(args.out.name + ".ckpt")
    run = train_refiner(cfg, checkpoint, args.init)
    training: dict[str, object] = {
        **asdict(cfg),
        "purpose": PURPOSE,
        "grid": GRID,
        "wall_s": round(run.wall_s),
        "final_loss": run.losses[-1],
    }
    title = f"CT lung refiner: {cfg.steps} steps, {run.wall_s / 60:.0f} min"
    if run.init is not None:  # what the continued refiner was trained with, and the time both runs took
        recorded = run.init.get("total_wall_s", run.init.get("wall_s"))
        earlier_s = float(recorded) if isinstance(recorded, int | float) else 0.0
        training["continued"] = {k: run.init.get(k) for k in ("model_id", "steps", "lr", "wall_s", "final_loss")}
        training["total_wall_s"] = round(run.wall_s + earlier_s)
        title += f" after {run.init.get('model_id')} ({earlier_s / 60:.0f} min)"
    info = save_model(run.model, args.out, PURPOSE, training, modalities=("CT",), body_part="CHEST")
    curve = write_loss_curve(
        run.losses,
        loss_curve_path(args.out),
        f"{info.model_id}: training loss",
        title,
        ylabel="binary cross-entropy against the true lungs",
    )
    print(f"{args.out}: {info.model_id}, {title}, loss {np.mean(run.losses[-100:]):.4f}; loss curve {curve}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
