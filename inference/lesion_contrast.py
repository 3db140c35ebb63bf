"""How visible a lesion is on the model grid, before any model: its signal against the healthy image's fine texture.

    python -m inference.lesion_contrast --seed 888 --lesion-cases 40

Why: a reconstruction method finds a lesion only where the lesion changes the image by more than the model's
error on healthy tissue; and a lesion fainter than the image's fine texture (noise, vessels, ribs) is found only by
a model that redraws that texture almost exactly. Each phantom is rendered twice with the same subject,
acquisition and noise, with and without its lesions (`keep_healthy`), on the model grid in the model's normalised
units ([-1, 1]: 2 = the CT window's width or the radiograph's full presentation range). Per lesion study:

- contrast: the mean |with - without| over the ground-truth lesion pixels (what the lesion adds where it is);
- peak: the 90th percentile of it (a lesion's densest part);
- texture: the std over the exact lungs of the healthy image minus its Gaussian blur (sigma `--sigma` model-grid
  pixels): the noise and fine anatomy at a lesion's scale;
- contrast / texture, and whether it reaches 1;
- with --model (one per modality): the model's RMS error over the exact lungs when it reconstructs the healthy
  twin (the node's `detect`, K = --ensemble, the node's steps): the error a lesion's contrast must stand out from.

The table gives medians per modality and lesion kind, over a validation seed's phantoms (checked disjoint from the
evaluation's held-out sets and a --model's training phantoms, as the validation tools check them). docs/method.md
records what it says about the radiograph goals.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from inference.heldout import KINDS, Case
from inference.score_validation import EVALUATION_SEED, check_disjoint

Reconstruct = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (image, anatomy mask) -> pseudo-healthy image


@dataclass(frozen=True)
class LesionContrast:
    """One lesion study's signal on the model grid (module docstring)."""

    kind: str
    pixels: int
    contrast: float
    peak: float
    texture: float
    model_error: float | None = None

    @property
    def ratio(self) -> float:
        return self.contrast / self.texture if self.texture > 0 else float("inf")

    @property
    def model_ratio(self) -> float | None:
        if self.model_error is None:
            return None
        return self.contrast / self.model_error if self.model_error > 0 else float("inf")


def fine_texture(image: np.ndarray, where: np.ndarray, sigma: float) -> float:
    """Std over `where` of each slice minus its Gaussian blur (in-plane only: CT slices are analysed one by one)."""
    blurred = ndimage.gaussian_filter(image, (0, sigma, sigma))
    return float(np.std((image - blurred)[where])) if where.any() else float("nan")


def measure(case: Case, sigma: float, reconstruct: Reconstruct | None = None) -> LesionContrast:
    """The lesion's contrast and the healthy twin's texture (the case must carry `healthy_image`); with
    `reconstruct`, the model's error on the healthy twin."""
    if case.healthy_image is None:
        raise ValueError(f"{case.name}: rendered without its healthy twin (keep_healthy)")
    difference = np.abs(case.image - case.healthy_image)[case.lesion]
    lungs = case.lung & ~case.lesion
    model_error = None
    if reconstruct is not None:
        residual = (case.healthy_image - reconstruct(case.healthy_image, case.anatomy))[lungs]
        model_error = float(np.sqrt(np.mean(residual**2))) if residual.size else float("nan")
    return LesionContrast(
        kind=case.kind,
        pixels=int(case.lesion.sum()),
        contrast=float(difference.mean()) if difference.size else 0.0,
        peak=float(np.percentile(difference, 90)) if difference.size else 0.0,
        texture=fine_texture(case.healthy_image, lungs, sigma),
        model_error=model_error,
    )


def median(values: Sequence[float]) -> float:
    return float(np.median(values))


def table(rows: Sequence[tuple[str, Sequence[LesionContrast]]]) -> str:
    with_model = any(m.model_error is not None for _, measured in rows for m in measured)
    head = "| modality | lesion kind | studies | lesion pixels | contrast | peak | texture | contrast / texture "
    head += "| contrast >= texture |"
    if with_model:
        head += " model error | contrast / model error |"
    lines = [head, "|---|---|" + "---:|" * (head.count("|") - 3)]
    for modality, measured in rows:
        for kind in (*KINDS, "all"):
            chosen = [m for m in measured if kind in ("all", m.kind)]
            if not chosen:
                continue
            above = sum(m.ratio >= 1.0 for m in chosen)
            line = (
                f"| {modality} | {kind} | {len(chosen)} | {median([m.pixels for m in chosen]):.0f} | "
                f"{median([m.contrast for m in chosen]):.3f} | {median([m.peak for m in chosen]):.3f} | "
                f"{median([m.texture for m in chosen]):.3f} | {median([m.ratio for m in chosen]):.2f} | "
                f"{above}/{len(chosen)} |"
            )
            if with_model:
                errors = [m.model_error for m in chosen if m.model_error is not None]
                ratios = [r for m in chosen if (r := m.model_ratio) is not None]
                line += f" {median(errors):.3f} | {median(ratios):.2f} |" if errors else " - | - |"
            lines.append(line)
    return "\n".join(lines)


def shipped_grid(modality: str) -> int:
    """The model grid of the weights shipped for `modality` (from their metadata): without a --model, lesions are
    measured on the grid the node would analyse them on."""
    from inference.unet import read_model_info
    from inference.weights import bundled_model_path, radiograph_model_path

    path = bundled_model_path() if modality == "CT" else radiograph_model_path()
    return read_model_info(path).config.image_size


@dataclass(frozen=True)
class ModelUnderTest:
    """A --model: its grid, its training seeds (kept out of the phantoms) and its reconstruction."""

    grid: int
    training_seeds: Sequence[int]
    reconstruct: Reconstruct


def model_reconstruction(path: Path, ensemble: int) -> tuple[str, ModelUnderTest]:
    """A model file's modality ("CT" or "DX") and how it reconstructs at the node's settings."""
    from inference.evaluate import ModelDenoiser
    from inference.model_validation import model_modality
    from inference.pipeline import PipelineSettings, detect
    from inference.train import model_training_seeds
    from inference.unet import load_model

    model, info = load_model(path)
    modality = model_modality(info)
    settings = PipelineSettings(ensemble=ensemble).for_model(info.training)
    denoiser = ModelDenoiser(model, info)

    def reconstruct(image: np.ndarray, anatomy: np.ndarray) -> np.ndarray:
        return detect(image, anatomy, denoiser, settings, modality).reconstruction

    return modality, ModelUnderTest(info.config.image_size, model_training_seeds(info.training), reconstruct)


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    import torch

    from inference.heldout import make_ct_cases, make_radiograph_cases

    parser = argparse.ArgumentParser(prog="python -m inference.lesion_contrast", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, required=True, help="validation seed (not the evaluation's 0)")
    parser.add_argument("--lesion-cases", type=int, default=40, help="lesion studies per modality")
    parser.add_argument("--modality", choices=("CT", "DX", "both"), default="both")
    parser.add_argument("--sigma", type=float, default=2.0, help="texture: Gaussian blur in model-grid pixels")
    parser.add_argument("--source-size", type=int, default=192, help="CT phantom rows/cols")
    parser.add_argument("--slices", type=int, default=16, help="CT phantom slices")
    parser.add_argument("--radiograph-size", type=int, default=256, help="radiograph phantoms' native size")
    parser.add_argument(
        "--model", type=Path, action="append", default=[], help="weights (one per modality): its error too"
    )
    parser.add_argument("--ensemble", type=int, default=3, help="members K for --model")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.seed == EVALUATION_SEED:
        parser.error(f"seed {EVALUATION_SEED} draws the evaluation's held-out sets: choose another")
    torch.set_num_threads(args.threads)
    models: dict[str, ModelUnderTest] = {}
    for path in args.model:
        modality, under_test = model_reconstruction(path, args.ensemble)
        if modality in models:
            parser.error(f"two models for {modality}: give one per modality")
        models[modality] = under_test
    rows = []
    for modality in ("CT", "DX") if args.modality == "both" else (args.modality,):
        chosen = models.get(modality)
        grid = chosen.grid if chosen else shipped_grid(modality)
        if modality == "CT":
            cases = make_ct_cases(
                args.seed, args.lesion_cases, 0, grid, args.source_size, args.slices, keep_healthy=True
            )
        else:
            cases = make_radiograph_cases(
                args.seed, args.lesion_cases, 0, grid, args.radiograph_size, keep_healthy=True
            )
        check_disjoint(cases, chosen.training_seeds if chosen else ())
        reconstruct = chosen.reconstruct if chosen else None
        measured = [measure(case, args.sigma, reconstruct) for case in cases if case.lesion.any()]
        out(f"{modality}: {len(measured)} of {len(cases)} lesion studies keep lesion pixels on the {grid}x{grid} grid")
        rows.append((f"{modality} ({grid}x{grid})", measured))
    out(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
