"""The lesion-contrast tool: real phantoms rendered with and without their lesions, real models reconstructing."""

from __future__ import annotations

import numpy as np
import pytest

from inference import lesion_contrast
from inference.heldout import make_ct_cases
from inference.weights import bundled_model_path, radiograph_model_path

RADIOGRAPH = str(radiograph_model_path())


def test_a_lesion_studys_healthy_twin_differs_only_where_the_lesion_is() -> None:
    (case,) = make_ct_cases(5, 1, 0, 32, size=64, slices=6, keep_healthy=True)
    assert case.healthy_image is not None and case.lesion.any()
    change = np.abs(case.image - case.healthy_image)
    # same subject, scanner and noise: away from the lesions nearly every pixel is identical (a lesion's parts
    # under the ground truth's area fraction change a few pixels outside `lesion`)
    assert np.mean(change[~case.lesion] > 1e-6) < 0.01
    assert change[case.lesion].mean() > 0.1
    measured = lesion_contrast.measure(case, sigma=2.0)
    assert measured.contrast > 0 and measured.texture > 0 and measured.model_error is None


def test_tabulates_contrast_against_texture_and_each_models_error() -> None:
    lines: list[str] = []
    argv = ["--seed", "5", "--lesion-cases", "5", "--source-size", "96", "--slices", "6", "--radiograph-size", "96"]
    argv += ["--ensemble", "1", "--threads", "1", "--model", str(bundled_model_path()), "--model", RADIOGRAPH]
    assert lesion_contrast.main(argv, out=lines.append) == 0
    rows = [line for line in lines[-1].splitlines() if line.startswith("| CT") or line.startswith("| DX")]
    assert [r.split(" | ")[1] for r in rows] == ["nodule", "ggo", "consolidation", "reticular", "mixed", "all"] * 2
    assert rows[0].startswith("| CT (96x96) |") and rows[6].startswith("| DX (96x96) |")
    for row in rows:
        cells = row.strip("| ").split(" | ")
        assert len(cells) == 11
        contrast, texture, error = float(cells[4]), float(cells[6]), float(cells[9])
        assert contrast > 0 and texture > 0 and error > 0


def test_refuses_the_evaluation_seed_and_two_models_of_one_modality() -> None:
    with pytest.raises(SystemExit):
        lesion_contrast.main(["--seed", "0"], out=lambda _: None)
    model = str(bundled_model_path())
    with pytest.raises(SystemExit):
        lesion_contrast.main(["--seed", "5", "--model", model, "--model", model], out=lambda _: None)


def test_without_a_model_lesions_are_measured_on_the_shipped_models_grid() -> None:
    lines: list[str] = []
    argv = ["--seed", "5", "--lesion-cases", "1", "--source-size", "96", "--slices", "6", "--modality", "CT"]
    assert lesion_contrast.main(argv, out=lines.append) == 0
    assert "| CT (96x96) | nodule | 1 |" in lines[-1] and "model error" not in lines[-1]
