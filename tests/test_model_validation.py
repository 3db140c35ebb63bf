"""The model validation tool: real models side by side on real validation phantoms, each with its own spectrum."""

from __future__ import annotations

import pytest

from inference import model_validation
from inference.weights import bundled_model_path

ABLATION = "inference/weights/ablations/ablation-simplex.safetensors"


def test_compares_models_each_with_its_own_noise_spectrum() -> None:
    lines: list[str] = []
    argv = ["--seed", "5", "--lesion-cases", "2", "--healthy-cases", "2", "--ensemble", "1", "--lambdas", "6,8"]
    argv += ["--source-size", "96", "--slices", "6", "--threads", "1", "--bootstrap", "20"]
    argv += ["--model", str(bundled_model_path()), "--model", ABLATION]
    assert model_validation.main(argv, out=lines.append) == 0
    text = "\n".join(lines)
    assert "2 lesion / 2 healthy studies, K = 1" in text
    rows = [line for line in text.splitlines() if line.startswith("| chest-ct-small-")]
    assert len(rows) == 2
    assert "(persistence 0.5, 10 steps)" in rows[0] and "(persistence 0.8, 10 steps)" in rows[1]  # shipped; ablation
    assert rows[0].endswith("+0.000 [+0.000, +0.000] |")  # the first model against itself
    cells = rows[1].split(" | ")
    assert len(cells) == 1 + 4 + len(model_validation.KINDS) + 2 + 1


def test_refuses_the_evaluation_seed_and_models_of_other_grids() -> None:
    with pytest.raises(SystemExit):
        model_validation.main(["--seed", "0", "--model", str(bundled_model_path())], out=lambda _: None)
    radiograph = "inference/weights/radiograph/chest-rx-small.safetensors"
    with pytest.raises(SystemExit):
        model_validation.main(["--seed", "5", "--model", str(bundled_model_path()), "--model", radiograph])
