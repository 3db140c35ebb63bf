"""The model validation tool: real models side by side on real validation phantoms, each with its own spectrum."""

from __future__ import annotations

import pytest

from inference import model_validation
from inference.weights import ablations_dir, bundled_model_path, radiograph_model_path

ABLATION = str(ablations_dir() / "ablation-simplex.safetensors")
RADIOGRAPH = str(radiograph_model_path())


def test_compares_models_each_with_its_own_noise_spectrum_and_each_ensemble_size() -> None:
    lines: list[str] = []
    argv = ["--seed", "5", "--lesion-cases", "2", "--healthy-cases", "2", "--ensemble", "1,2", "--lambdas", "6,8"]
    argv += ["--source-size", "96", "--slices", "6", "--threads", "1", "--bootstrap", "20"]
    argv += ["--model", str(bundled_model_path()), "--model", ABLATION]
    assert model_validation.main(argv, out=lines.append) == 0
    text = "\n".join(lines)
    assert "2 lesion / 2 healthy studies" in text
    assert "Mask: lesion voxels inside" in text and "(refined by ct-lung-refiner-" in text  # the node's CT mask
    rows = [line for line in text.splitlines() if line.startswith("| chest-ct-small-")]
    assert len(rows) == 4
    shipped = "(96x96 grid, persistence 0.5, outlines denser, medians 1/5, opening/closing 0/0, components >= 9"
    assert f"{shipped}, K = 1, 5 steps)" in rows[0]  # the node's steps, the sizes the shipped model carries
    assert f"{shipped}, K = 2, 5 steps)" in rows[1]
    assert "(64x64 grid, persistence 0.8, outlines denser, K = 1, 5 steps)" in rows[2]  # ablation
    assert rows[0].endswith("+0.000 [+0.000, +0.000] |")  # the first run against itself
    cells = rows[2].split(" | ")
    assert len(cells) == 1 + 4 + 2 * len(model_validation.KINDS) + 2 + 1
    assert "| nodule Dice (lambda 8) |" in text  # per kind at the node's lambda


def test_compares_models_of_different_grids_on_the_same_studies(tmp_path) -> None:
    """A model moved to a finer grid is compared with its start: the same phantoms, each on its model's grid."""
    from dataclasses import replace

    import torch

    from inference.unet import PRESETS, UNet, save_model

    torch.manual_seed(0)
    model = UNet(PRESETS["tiny"])
    paths = []
    for grid in (32, 48):
        moved = UNet(replace(PRESETS["tiny"], image_size=grid))
        moved.load_state_dict(model.state_dict())
        path = tmp_path / f"g{grid}.safetensors"
        save_model(moved, path, f"tiny-{grid}")
        paths += ["--model", str(path)]
    lines: list[str] = []
    argv = ["--seed", "5", "--lesion-cases", "2", "--healthy-cases", "2", "--ensemble", "1", "--lambdas", "8"]
    argv += ["--source-size", "64", "--slices", "4", "--threads", "1", "--bootstrap", "20", "--steps", "2", *paths]
    assert model_validation.main([*argv, "--scale-sizes"], out=lines.append) == 0
    rows = [line for line in lines[-1].splitlines() if line.startswith("| tiny-")]
    assert "(32x32 grid" in rows[0] and "(48x48 grid" in rows[1]
    assert "medians 1/3," in rows[0] and "medians 3/3," in rows[1]  # the 64 grid's 3 / 5, scaled


def test_pixel_sizes_scale_with_the_grid_keeping_their_physical_extent() -> None:
    from inference.pipeline import PipelineSettings

    base = PipelineSettings()
    assert model_validation.sizes_for_grid(base, model_validation.SIZES_GRID) == base
    finer = model_validation.sizes_for_grid(base, 96)
    assert (finer.median_size, finer.score_median_size, finer.min_component_size) == (5, 7, 9)


def test_validates_radiograph_models_on_radiograph_phantoms() -> None:
    """A CR/DX model is validated on radiographs (its lambdas, its grid); --persistence overrides its spectrum,
    --t-start its depth (one run per start)."""
    lines: list[str] = []
    argv = ["--seed", "5", "--lesion-cases", "2", "--healthy-cases", "2", "--ensemble", "1", "--steps", "2"]
    argv += ["--t-start", "150,250"]
    argv += ["--radiograph-size", "96", "--threads", "1", "--bootstrap", "20", "--persistence", "0.5"]
    argv += ["--model", RADIOGRAPH, "--segmentation", "opening=0,min_component_size=2"]
    assert model_validation.main(argv, out=lines.append) == 0
    table = lines[-1]
    assert lines[-2].startswith("Mask: ") and lines[-2].endswith("(lung fields)")  # no CT refiner for radiographs
    assert "| Dice lambda 2 | Dice lambda 3 | Dice lambda 4 |" in table
    assert "(96x96 grid, t_start 150, persistence 0.5, outlines both, medians 3/5, opening/closing 0/1" in table
    assert "(96x96 grid, t_start 250, persistence 0.5," in table
    assert "components >= 2, K = 1, 2 steps)" in table


def test_refuses_the_evaluation_seed_and_mixed_modalities(capsys) -> None:
    with pytest.raises(SystemExit):
        model_validation.main(["--seed", "0", "--model", str(bundled_model_path())], out=lambda _: None)
    with pytest.raises(SystemExit):
        model_validation.main(["--seed", "5", "--model", str(bundled_model_path()), "--model", RADIOGRAPH])
    assert "the models are for different modalities" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        model_validation.main(["--seed", "5", "--ensemble", "3,0", "--model", str(bundled_model_path())])
    with pytest.raises(SystemExit):
        model_validation.main(["--seed", "5", "--segmentation", "median_size=2", "--model", str(bundled_model_path())])
    with pytest.raises(SystemExit):  # the radiograph model was trained on timesteps up to 300
        model_validation.main(["--seed", "5", "--t-start", "400", "--model", RADIOGRAPH])
    err = capsys.readouterr().err
    assert "expected positive integers" in err and "median_size must be odd" in err
    assert "--t-start 400 for chest-rx-small-" in err and "trained on timesteps up to 300" in err
