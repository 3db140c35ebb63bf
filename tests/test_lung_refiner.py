"""The CT lung refiner: it only adds lung, the shipped one takes in a consolidation the threshold mask leaves out,
and it is loaded, refused and recorded where the node and the evaluation use it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.lung_refiner import (
    PURPOSE,
    LungRefiner,
    RefinerTraining,
    load_refiner,
    main,
    refiner_phantom_seeds,
    train_refiner,
)
from inference.lungmask import anatomy_mask
from inference.phantoms import make_ct
from inference.pipeline import run_pipeline
from inference.training_report import loss_curve_path
from inference.unet import load_model, save_model
from inference.weights import bundled_model_path, lung_refiner_path
from node.config import InferenceSettings
from node.model_loader import load_lung_refiner
from tests.dicomgen import make_ct_series, write_datasets
from tests.test_diffusion import TinyUNetDenoiser
from tests.test_pipeline import fast_settings

FEET_FIRST = np.array([0.0, 0.0, 1.0])


def phantom_masks(seed: int, kind: str, refiner: LungRefiner | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the node's mask, the true lungs, the lesion) of a 192 x 192 x 16 phantom."""
    ph = make_ct(seed, 192, 192, 16, kind)
    dz, dy, dx = ph.grid.spacing
    return anatomy_mask(ph.hu, "CT", (dy, dx), FEET_FIRST, dz, refiner), ph.lung_mask, ph.lesion_mask


def test_the_shipped_refiner_takes_in_consolidations_and_adds_no_lung_to_healthy_chests() -> None:
    refiner = load_refiner(lung_refiner_path())
    covered = {"threshold": 0, "refined": 0}
    lesion_voxels = 0
    for seed in (11, 12, 13):  # validation-style seeds, not the refiner's training phantoms
        assert seed not in refiner_phantom_seeds(refiner.info)
        plain, _, lesion = phantom_masks(seed, "consolidation", None)
        refined, _, _ = phantom_masks(seed, "consolidation", refiner)
        assert (refined >= plain).all()  # it adds, never removes
        covered["threshold"] += int((plain & lesion).sum())
        covered["refined"] += int((refined & lesion).sum())
        lesion_voxels += int(lesion.sum())
    assert covered["refined"] >= covered["threshold"] + 0.2 * lesion_voxels, (covered, lesion_voxels)
    plain, lungs, _ = phantom_masks(14, "none", None)
    refined, _, _ = phantom_masks(14, "none", refiner)
    added_outside_lungs = (refined & ~lungs).sum() - (plain & ~lungs).sum()
    assert added_outside_lungs <= 0.01 * refined.sum()


def test_a_refiner_is_trained_saved_and_loaded_with_its_purpose_and_seeds(tmp_path: Path) -> None:
    out = tmp_path / "refiner.safetensors"
    assert main(["--out", str(out), "--phantoms", "2", "--steps", "2", "--batch-size", "4", "--threads", "1"]) == 0
    refiner = load_refiner(out)
    assert refiner.info.training["purpose"] == PURPOSE and refiner.info.modalities == ("CT",)
    assert refiner_phantom_seeds(refiner.info) == {7_000_000, 7_000_001}
    ph = make_ct(3, 64, 64, 4, "nodule")
    dz, dy, dx = ph.grid.spacing
    plain = anatomy_mask(ph.hu, "CT", (dy, dx), FEET_FIRST, dz)
    refined = refiner.refine(ph.hu, plain)
    assert refined.shape == plain.shape and (refined >= plain).all()
    empty = np.zeros_like(plain)
    assert not refiner.refine(ph.hu, empty).any()  # no lungs found: nothing to refine


def test_training_depends_only_on_its_settings() -> None:
    cfg = RefinerTraining(phantoms=1, size=48, slices=2, steps=2, batch_size=2)
    losses_a = train_refiner(cfg).losses
    assert train_refiner(cfg).losses == losses_a
    assert train_refiner(replace(cfg, seed=1)).losses != losses_a


def test_a_run_resumed_from_its_checkpoint_ends_as_an_uninterrupted_one(tmp_path: Path) -> None:
    cfg = RefinerTraining(phantoms=1, size=48, slices=2, steps=4, batch_size=2)
    whole = train_refiner(cfg)
    checkpoint = tmp_path / "refiner.ckpt"
    train_refiner(replace(cfg, steps=2), checkpoint)  # a run stopped after 2 steps, its state saved
    resumed = train_refiner(cfg, checkpoint)
    assert resumed.losses == whole.losses
    for name, value in whole.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name
    with pytest.raises(ValueError, match="lr"):
        train_refiner(replace(cfg, lr=1e-4), checkpoint)


def test_a_continued_refiner_starts_from_the_one_it_continues_and_says_so(tmp_path: Path) -> None:
    first = tmp_path / "first.safetensors"
    common = ["--phantoms", "1", "--batch-size", "2", "--threads", "1"]
    assert main(["--out", str(first), "--steps", "2", *common]) == 0
    earlier = load_refiner(first)
    more = tmp_path / "more.safetensors"
    assert main(["--out", str(more), "--steps", "1", "--lr", "0", "--init", str(first), *common]) == 0
    continued = load_refiner(more)
    assert continued.info.training["continued"]["model_id"] == earlier.info.model_id  # type: ignore[index]
    total = continued.info.training["total_wall_s"]
    assert isinstance(total, int) and total >= earlier.info.training["wall_s"]  # type: ignore[operator]
    for name, value in earlier.model.state_dict().items():  # lr 0: one step that changes nothing
        assert torch.equal(continued.model.state_dict()[name], value), name
    assert loss_curve_path(more).stat().st_size > 0
    assert (tmp_path / "more.safetensors.ckpt").exists()


def test_a_diffusion_model_is_not_taken_for_a_refiner() -> None:
    with pytest.raises(ValueError, match="not a CT lung refiner"):
        load_refiner(bundled_model_path())


def test_the_node_loads_the_refiner_it_is_told_to(tmp_path: Path) -> None:
    assert load_lung_refiner(InferenceSettings(lung_refiner="OFF")) is None
    loaded = load_lung_refiner(InferenceSettings())
    assert loaded is not None and loaded.model_id == load_refiner(lung_refiner_path()).model_id
    with pytest.raises(FileNotFoundError):
        load_lung_refiner(InferenceSettings(lung_refiner=str(tmp_path / "missing.safetensors")))
    with pytest.raises(ValueError, match="empty"):
        InferenceSettings(lung_refiner=" ")


def test_a_ct_result_records_the_refiner_and_its_mask_holds_the_threshold_mask(tmp_path: Path) -> None:
    files = write_datasets(make_ct_series(4, 48, 48, seed=5), tmp_path / "ct")
    refiner = load_refiner(lung_refiner_path())
    denoiser = TinyUNetDenoiser(max_batch=4)
    info = save_model(denoiser.model, tmp_path / "tiny.safetensors", "tiny")
    settings = fast_settings()
    plain = run_pipeline(files, denoiser, info, settings)
    refined = run_pipeline(files, denoiser, info, settings, lung_refiner=refiner)
    assert plain.settings["lung_refiner"] == "" and refined.settings["lung_refiner"] == refiner.model_id
    assert (refined.anatomy_mask >= plain.anatomy_mask).all()


def test_the_refiner_weights_are_a_unet_of_the_refiner_grid() -> None:
    _, info = load_model(lung_refiner_path())
    assert info.config.image_size == 96 and info.training["purpose"] == PURPOSE
