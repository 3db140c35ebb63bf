"""Shipped model weights (package data): chest-ct-small.safetensors is what `[inference] model = "bundled"` loads.

Inference owns its weights: code outside this package asks `bundled_model_path()` rather than looking here.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent


def bundled_model_path() -> Path:
    """The shipped .safetensors model; FileNotFoundError (saying what to do) when none is shipped."""
    found = sorted(WEIGHTS_DIR.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(
            f"no bundled model: {WEIGHTS_DIR} holds no .safetensors file yet; "
            "train one (edgenode train) or set [inference] model to a weights file"
        )
    return found[0]


def lung_refiner_path() -> Path:
    """The shipped CT lung-mask refiner (`inference.lung_refiner`), used by default (`[inference] lung_refiner`)."""
    return WEIGHTS_DIR / "lung" / "ct-lung-refiner.safetensors"


def radiograph_model_path() -> Path:
    """The shipped chest radiograph (CR/DX) model: not loaded by default (docs/model-card.md), configured by path."""
    return WEIGHTS_DIR / "radiograph" / "chest-rx-small.safetensors"


def ablations_dir() -> Path:
    """The evaluation's ablation models (docs/EVALUATION.md rows 2-6; `edgenode evaluate --ablations`): not loaded
    by the node."""
    return WEIGHTS_DIR / "ablations"
