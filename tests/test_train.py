"""Training smoke test (a few steps on tiny images: the loss falls) and exact resume from a checkpoint."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from inference.pipeline import PipelineSettings
from inference.train import TrainConfig, fitted_steps, lr_at, phantom_slices, ship, train
from inference.unet import load_model


def tiny_config(**kw: object) -> TrainConfig:
    base = dict(preset="tiny", steps=60, batch_size=8, lr=3e-3, warmup_steps=5, seed=3, t_max=350)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_pool_is_normalised_with_lung_masks() -> None:
    pool = phantom_slices(seed=1, subjects=2, size=64, slices=6, grid=32)
    assert pool.images.shape == (12, 32, 32) and pool.masks.shape == (12, 32, 32)
    assert pool.images.min() >= -1 and pool.images.max() <= 1
    assert pool.masks.sum() > 0 and set(pool.masks.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.slow
def test_loss_falls_and_weights_ship(tmp_path) -> None:
    pool = phantom_slices(seed=1, subjects=2, size=64, slices=6, grid=32)
    cfg = tiny_config(rotate_degrees=3.0, intensity_jitter=0.02)
    result = train(cfg, pool=pool, progress=False)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-10:])
    assert last < 0.7 * first, (first, last)
    path = tmp_path / "m.safetensors"
    ship(result, cfg, path, "tiny-smoke")
    model, info = load_model(path)
    assert info.training["steps"] == 60 and info.training["noise"] == "simplex"
    assert info.training["noise_spectrum"] == {"octaves": 6, "base_frequency": 2**-6, "persistence": 0.8}
    x = torch.zeros(1, 1, 32, 32)
    assert model(x, x, torch.zeros(1)).shape == (1, 1, 32, 32)


def test_the_noise_spectrum_trained_with_is_the_one_the_pipeline_uses(tmp_path) -> None:
    pool = phantom_slices(seed=1, subjects=1, size=48, slices=2, grid=32)
    cfg = tiny_config(steps=2, noise_octaves=4, noise_persistence=0.5)
    other = train(tiny_config(steps=2), pool=pool, progress=False)
    result = train(cfg, pool=pool, progress=False)
    assert result.losses != other.losses  # the same steps and data under another noise
    path = tmp_path / "m.safetensors"
    ship(result, cfg, path, "tiny-spectrum")
    _, info = load_model(path)
    assert info.training["noise_spectrum"] == {"octaves": 4, "base_frequency": 2**-6, "persistence": 0.5}
    settings = PipelineSettings().for_model(info.training)
    assert (settings.octaves, settings.base_frequency, settings.persistence) == (4, 2**-6, 0.5)


def test_a_run_fitted_to_its_time_takes_the_steps_the_time_left_holds() -> None:
    cfg = tiny_config(steps=5000, warmup_steps=100, fit_time_s=100.0)
    assert fitted_steps(cfg, spent_s=10.0, seconds_per_step=0.1) == 100 + 900
    assert fitted_steps(cfg, spent_s=10.0, seconds_per_step=0.001) == 5000  # never past --steps
    assert fitted_steps(cfg, spent_s=150.0, seconds_per_step=0.1) == 100  # out of time: the warm-up alone


def test_a_run_fitted_to_its_time_ends_its_schedule_where_it_stops(tmp_path) -> None:
    pool = phantom_slices(seed=2, subjects=1, size=48, slices=2, grid=32)
    cfg = tiny_config(steps=100_000, warmup_steps=20, fit_time_s=10.0)
    result = train(cfg, pool=pool, progress=False)
    assert result.config is not None and 20 < result.config.steps < 100_000
    # the cosine schedule is the fitted length's, and the run stopped at its end, not at a time limit
    assert result.steps_done == result.config.steps == len(result.losses)
    assert lr_at(result.steps_done, result.config) == 0.0 < lr_at(result.steps_done, cfg)
    path = tmp_path / "m.safetensors"
    ship(result, result.config, path, "tiny-fitted")
    _, info = load_model(path)
    assert info.training["steps"] == result.steps_done
    with pytest.raises(ValueError, match="warm-up of at least"):
        train(tiny_config(fit_time_s=3.0), pool=pool, progress=False)


@pytest.mark.slow
def test_a_fitted_run_resumes_with_the_length_it_fitted(tmp_path) -> None:
    pool = phantom_slices(seed=2, subjects=1, size=48, slices=2, grid=32)
    cfg = tiny_config(steps=100_000, warmup_steps=20, fit_time_s=10.0)
    ckpt = tmp_path / "ckpt.pt"
    first = train(cfg, checkpoint=ckpt, pool=pool, progress=False, stop_after=25)
    assert first.config is not None and first.steps_done == 25 < first.config.steps < 100_000
    resumed = train(cfg, checkpoint=ckpt, pool=pool, progress=False)  # not timed again: the same length
    assert resumed.config is not None and resumed.steps_done == resumed.config.steps == first.config.steps


@pytest.mark.slow
def test_resume_matches_an_unbroken_run(tmp_path) -> None:
    pool = phantom_slices(seed=2, subjects=1, size=48, slices=4, grid=32)
    unbroken = train(tiny_config(steps=8), pool=pool, progress=False)
    ckpt = tmp_path / "ckpt.pt"
    first = train(tiny_config(steps=8), checkpoint=ckpt, pool=pool, progress=False, stop_after=4)
    assert first.steps_done == 4
    resumed = train(tiny_config(steps=8), checkpoint=ckpt, pool=pool, progress=False)
    assert resumed.steps_done == 8
    np.testing.assert_allclose(resumed.losses, unbroken.losses, rtol=1e-4, atol=1e-6)


def test_pool_from_a_dicom_folder(tmp_path) -> None:
    from inference.phantoms import write_study
    from inference.train import dicom_slices

    write_study(tmp_path, "ct", seed=4, index=0, lesions="none", size=48, slices=3)
    pool = dicom_slices(tmp_path, grid=32)
    assert pool.images.shape == (3, 32, 32)
    assert pool.masks.sum() > 0


@pytest.mark.slow
def test_fine_tuning_starts_from_the_given_weights(tmp_path) -> None:
    """--init: a run starts where the given model is (its first loss is the trained loss, not a fresh one's)."""
    import pytest

    pool = phantom_slices(seed=1, subjects=2, size=64, slices=6, grid=32)
    trained = train(tiny_config(), pool=pool, progress=False)
    path = tmp_path / "m.safetensors"
    ship(trained, tiny_config(), path, "tiny-smoke")
    file_sha256_before = load_model(path)[1].sha256[:12]
    fresh = train(tiny_config(steps=3, lr=1e-9), pool=pool, progress=False)
    tuned = train(tiny_config(steps=3, lr=1e-9, init_from=str(path)), pool=pool, progress=False)
    assert np.mean(tuned.losses) < 0.7 * np.mean(fresh.losses)
    tuned_cfg = tiny_config(steps=3, lr=1e-9, init_from=str(path))
    ship(tuned, tuned_cfg, path, "tiny-tuned")  # replaces the file it started from: the identity stays known
    assert load_model(path)[1].training["init_from_model"] == f"tiny-smoke-{file_sha256_before}"
    # A resumed fine-tuning run keeps the start its first run saw, though the --init file has changed since.
    start = load_model(path)[1].model_id
    ckpt = tmp_path / "tuned.ckpt"
    train(replace(tuned_cfg, steps=2), checkpoint=ckpt, pool=pool, progress=False, stop_after=1)
    ship(trained, tiny_config(), path, "tiny-other")
    resumed = train(replace(tuned_cfg, steps=2), checkpoint=ckpt, pool=pool, progress=False)
    assert resumed.steps_done == 2 and resumed.init_from_model == start
    with pytest.raises(ValueError, match="architecture"):
        train(tiny_config(steps=1, preset="small", image_size=32, init_from=str(path)), pool=pool, progress=False)


@pytest.mark.slow
def test_fine_tuning_moves_a_model_to_a_finer_grid(tmp_path) -> None:
    """--init across grids: the convolutional weights carry over, so a model moved from a 32 to a 48 grid starts
    near its trained loss there, far below a fresh model's."""
    coarse = phantom_slices(seed=1, subjects=2, size=64, slices=6, grid=32)
    trained = train(tiny_config(), pool=coarse, progress=False)
    path = tmp_path / "m.safetensors"
    ship(trained, tiny_config(), path, "tiny-smoke")
    fine = phantom_slices(seed=1, subjects=2, size=64, slices=6, grid=48)
    fresh = train(tiny_config(steps=3, lr=1e-9, image_size=48), pool=fine, progress=False)
    moved = train(tiny_config(steps=3, lr=1e-9, image_size=48, init_from=str(path)), pool=fine, progress=False)
    assert moved.model.config.image_size == 48
    assert np.mean(moved.losses) < 0.7 * np.mean(fresh.losses)


@pytest.mark.slow
def test_bf16_autocast_loss_tracks_fp32() -> None:
    """Where the hardware has bf16 units, training runs in bf16 autocast; its loss follows the fp32 run's."""
    import pytest

    from inference.hardware import cpu_info

    if not cpu_info().bf16_units:
        pytest.skip("this CPU has no bf16 units: training stays fp32 here")
    pool = phantom_slices(seed=1, subjects=2, size=64, slices=6, grid=32)
    fp32 = train(tiny_config(steps=12, amp=False, device="cpu"), pool=pool, progress=False)
    bf16 = train(tiny_config(steps=12, amp=True, device="cpu"), pool=pool, progress=False)
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    a, b = np.array(fp32.losses), np.array(bf16.losses)
    assert not np.array_equal(a, b)  # really computed in another precision
    rel = np.abs(b - a) / a
    assert rel.max() < 0.05, rel  # step by step, same data and noise: within 5 %
    assert abs(b.mean() - a.mean()) / a.mean() < 0.02, (a.mean(), b.mean())


@pytest.mark.slow  # a training run
def test_a_radiograph_model_is_trained_on_phantom_radiographs_and_says_so_in_its_metadata(tmp_path) -> None:
    """--modality CR,DX: the pool is phantom radiographs with the node's lung-field mask, and the shipped file's
    metadata names CR, DX and the body part (the node runs it on nothing else); CT stays the default."""
    from inference.train import radiograph_slices, training_pool
    from inference.unet import read_model_info

    pool = radiograph_slices(seed=1, subjects=2, size=64, grid=32)
    assert pool.images.shape == (2, 32, 32) and pool.images.min() >= -1 and pool.images.max() <= 1
    assert pool.masks.sum() > 0 and "radiograph" in pool.source
    cfg = tiny_config(steps=2, modalities=("CR", "DX"), subjects=2, phantom_size=64)
    result = train(cfg, progress=False)
    assert "radiograph" in result.pool_source
    ship(result, cfg, tmp_path / "rx.safetensors", "tiny-rx")
    info = read_model_info(tmp_path / "rx.safetensors")
    assert info.modalities == ("CR", "DX") and info.body_part == "CHEST"
    assert TrainConfig().modalities == ("CT",)
    with pytest.raises(ValueError, match="not both"):
        training_pool(tiny_config(modalities=("CT", "DX")), 32)
    with pytest.raises(ValueError, match="choose CT, or CR and/or DX"):
        training_pool(tiny_config(modalities=("MR",)), 32)


def test_the_bundled_model_is_a_chest_ct_model() -> None:
    from inference.unet import read_model_info
    from inference.weights import bundled_model_path

    info = read_model_info(bundled_model_path())
    assert info.modalities == ("CT",) and info.body_part == "CHEST"


@pytest.mark.slow  # a training run
def test_the_loss_curve_is_written_beside_the_shipped_weights(tmp_path) -> None:
    from PIL import Image

    from inference.training_report import loss_curve_path

    pool = phantom_slices(seed=2, subjects=1, size=48, slices=4, grid=32)
    cfg = tiny_config(steps=6)
    result = train(cfg, pool=pool, progress=False)
    weights = tmp_path / "models" / "tiny-curve.safetensors"
    curve = ship(result, cfg, weights, "tiny-curve")
    assert curve == loss_curve_path(weights) == tmp_path / "models" / "tiny-curve.loss.png"
    assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(curve) as image:
        assert image.size[0] > 400 and image.size[1] > 250
        assert len(np.unique(np.asarray(image.convert("L")))) > 10  # drawn, not blank


@pytest.mark.slow  # a training run
def test_a_checkpoint_resumes_only_its_own_run(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    """Other training settings cannot resume a checkpoint (that would mix two runs); more steps can. The training
    images are cached beside the checkpoint and read back by the resumed run."""
    import logging

    from inference.train import pool_cache_path

    cfg = tiny_config(steps=3, modalities=("CR", "DX"), subjects=2, phantom_size=64)
    ckpt = tmp_path / "run.ckpt"
    train(cfg, checkpoint=ckpt, progress=False)
    assert ckpt.exists() and pool_cache_path(ckpt).exists()
    with pytest.raises(ValueError, match=r"other settings \(lr: 0\.003 -> 0\.001\)"):
        train(tiny_config(steps=3, lr=1e-3, modalities=("CR", "DX"), subjects=2, phantom_size=64), checkpoint=ckpt)
    with caplog.at_level(logging.INFO, logger="inference.train"):
        longer = train(tiny_config(steps=5, modalities=("CR", "DX"), subjects=2, phantom_size=64), checkpoint=ckpt)
    assert longer.steps_done == 5 and len(longer.losses) == 5
    assert any("training images from" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_from_its_checkpoint(tmp_path) -> None:
    """`edgenode train` killed with SIGKILL right after a checkpoint, then run again with the same command: it
    resumes there (saying so), ends with all its steps, and its loss history continues the checkpoint's, equal
    to an unbroken run's."""
    import signal
    import subprocess

    from inference.train import cached_training_pool, pool_cache_path
    from tests.conftest import edgenode_cmd, node_env

    steps, every = 150, 5
    out, ckpt = tmp_path / "rx.safetensors", tmp_path / "rx.ckpt"
    command = edgenode_cmd(
        "train", "--out", str(out), "--name", "tiny-rx", "--modality", "CR,DX", "--preset", "tiny",
        "--steps", str(steps), "--batch-size", "4", "--lr", "3e-3", "--subjects", "2", "--phantom-size", "64",
        "--seed", "3", "--threads", "1", "--checkpoint-every", str(every), "--device", "cpu",
    )  # fmt: skip
    proc = subprocess.Popen(command, env=node_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # the first checkpoint line: the checkpoint is on disk
        seen.append(line)
        if "checkpoint" in line and line.startswith("step "):
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait(timeout=60) == -signal.SIGKILL, "".join(seen)
    state = torch.load(ckpt, weights_only=False)
    killed_at, killed_losses = state["step"], state["losses"]
    assert every <= killed_at < steps and len(killed_losses) == killed_at and not out.exists()

    done = subprocess.run(command, env=node_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed at step {killed_at}/{steps}" in done.stdout
    assert "training images from" in done.stderr  # the cached pool, not rendered again
    final = torch.load(ckpt, weights_only=False)
    assert final["step"] == steps and len(final["losses"]) == steps
    assert final["losses"][:killed_at] == killed_losses  # the history continues the checkpoint's
    from inference.unet import read_model_info

    assert read_model_info(out).training["steps"] == steps and (tmp_path / "rx.loss.png").exists()

    cfg = TrainConfig(
        preset="tiny", steps=steps, batch_size=4, lr=3e-3, subjects=2, phantom_size=64, seed=3,
        modalities=("CR", "DX"), device="cpu", checkpoint_every=every,
    )  # fmt: skip
    pool = cached_training_pool(cfg, 32, pool_cache_path(ckpt))
    # the binary lung masks are cached as bytes and read back as the float condition the model takes
    assert torch.load(pool_cache_path(ckpt), weights_only=True)["masks"].dtype == torch.bool
    assert pool.masks.dtype == torch.float32 and set(pool.masks.unique().tolist()) == {0.0, 1.0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the command ran
    try:
        unbroken = train(cfg, pool=pool, progress=False)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(final["losses"], unbroken.losses, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # starts worker processes that import torch (10 s)
def test_training_images_are_the_same_rendered_on_one_process_or_two() -> None:
    from inference.train import radiograph_slices

    one, two = radiograph_slices(3, 3, 48, 16), radiograph_slices(3, 3, 48, 16, workers=2)
    assert torch.equal(one.images, two.images) and torch.equal(one.masks, two.masks)


def test_the_medium_preset_is_the_small_layout_at_twice_the_width() -> None:
    from inference.unet import PRESETS, UNet

    small, medium = PRESETS["small"], PRESETS["medium"]
    assert replace(medium, base_channels=small.base_channels) == small
    ratio = sum(p.numel() for p in UNet(medium).parameters()) / sum(p.numel() for p in UNet(small).parameters())
    assert 3.5 < ratio < 4.1  # convolutions scale with width squared


def test_the_train_commands_preset_choices_are_the_unets_presets() -> None:
    from inference.unet import PRESETS
    from node.commands.train import PRESET_NAMES

    assert tuple(PRESETS) == PRESET_NAMES
