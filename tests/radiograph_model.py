"""A tiny chest radiograph (CR/DX) model for tests, made by the project's own training code on phantom
radiographs (real training, a few seconds): the bundled model is CT-only, and the node runs a model only on the
modalities its metadata names, so a test that expects radiograph results configures this one beside its CT model.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

RADIOGRAPH_MODALITIES = ("CR", "DX")


@cache
def trained_radiograph_model() -> Path:
    """The tiny CR/DX model, trained once per test process (its metadata: modalities CR, DX; body part CHEST)."""
    import torch

    from inference.train import TrainConfig, ship, train

    cfg = TrainConfig(
        preset="tiny",
        steps=6,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        seed=5,
        subjects=2,
        phantom_size=64,
        modalities=RADIOGRAPH_MODALITIES,
        device="cpu",
        checkpoint_every=10_000,
    )
    directory = Path(tempfile.mkdtemp(prefix="edgenode-rx-model-"))
    atexit.register(shutil.rmtree, directory, True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few tiny steps: one thread is quickest on a busy machine
    try:
        result = train(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    path = directory / "tiny-chest-rx.safetensors"
    ship(result, cfg, path, "tiny-chest-rx")
    return path


def per_modality(ct_model: Path | str) -> dict[str, str]:
    """`[inference] model` with `ct_model` for CT and the tiny radiograph model for CR and DX."""
    rx = str(trained_radiograph_model())
    return {"CT": str(ct_model), "CR": rx, "DX": rx}
