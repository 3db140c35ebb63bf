"""A tiny chest radiograph (CR/DX) model for tests, made by the project's own training code on phantom
radiographs (real training, a few seconds): the bundled model is CT-only, and the node runs a model only on the
modalities its metadata names, so a test that expects radiograph results configures this one beside its CT model.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import cache
from pathlib import Path

from filelock import FileLock

RADIOGRAPH_MODALITIES = ("CR", "DX")
REPO_ROOT = Path(__file__).resolve().parent.parent


def _code_key() -> str:
    """A digest of the code the model is made by (inference/): a change there trains a new one."""
    digest = hashlib.sha256()
    for source in sorted((REPO_ROOT / "inference").glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()[:16]


@cache
def trained_radiograph_model() -> Path:
    """The tiny CR/DX model (its metadata: modalities CR, DX; body part CHEST), trained once per version of the
    inference code and shared by the test processes (pytest-xdist workers) through a locked cache folder."""
    folder = Path(tempfile.gettempdir()) / f"edgenode-test-rx-model-{_code_key()}"
    folder.mkdir(exist_ok=True)
    path = folder / "tiny-chest-rx.safetensors"
    with FileLock(str(folder / "lock")):  # one process trains it, the others wait and read it
        if not path.exists():
            partial = folder / f"partial-{os.getpid()}"  # a process killed mid-training leaves no half file
            partial.mkdir(exist_ok=True)
            _train(partial / path.name)
            for made in sorted(partial.iterdir(), key=lambda p: p == partial / path.name):  # the weights last
                made.replace(folder / made.name)
            partial.rmdir()
    return path


def _train(path: Path) -> None:
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few tiny steps: one thread is quickest on a busy machine
    try:
        result = train(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    ship(result, cfg, path, "tiny-chest-rx")


def per_modality(ct_model: Path | str) -> dict[str, str]:
    """`[inference] model` with `ct_model` for CT and the tiny radiograph model for CR and DX."""
    rx = str(trained_radiograph_model())
    return {"CT": str(ct_model), "CR": rx, "DX": rx}
