"""The study score's validation tool: real model, real phantoms, seeds kept apart from the evaluation's."""

from __future__ import annotations

import numpy as np
import pytest

from inference import score_validation
from inference.heldout import heldout_seed, make_ct_cases


def test_runs_on_validation_phantoms_and_ends_with_the_nodes_score() -> None:
    lines: list[str] = []
    argv = ["--seed", "5", "--lesion-cases", "2", "--healthy-cases", "2", "--ensemble", "1"]
    argv += ["--source-size", "96", "--slices", "6", "--threads", "1", "--bootstrap", "20"]
    assert score_validation.main(argv, out=lines.append) == 0
    text = "\n".join(lines)
    assert "2 lesion / 2 healthy studies" in text
    rows = [line for line in text.splitlines() if line.startswith("| 3x3") or line.startswith("| 5x5")]
    assert [r.split(" | ")[0] for r in rows] == ["| 3x3 median, p99/alpha", "| 5x5 median, p99/alpha"] + [
        "| 3x3 median, top20",
        "| 5x5 median, top20",
    ]
    assert rows[-1].endswith("+0.000 [+0.000, +0.000] |")  # the node's score against itself


def test_refuses_the_evaluations_seed_and_its_held_out_phantoms() -> None:
    with pytest.raises(SystemExit):
        score_validation.main(["--seed", "0"], out=lambda _: None)
    cases = make_ct_cases(5, 1, 0, 32, size=64, slices=4)
    cases[0].seed = heldout_seed("CT", "shifted", 0, 3)  # as if the validation stream had drawn a held-out subject
    with pytest.raises(ValueError, match="evaluation.s held-out sets"):
        score_validation.check_disjoint(cases, training=[])
    cases[0].seed = 12345
    with pytest.raises(ValueError, match="model.s training phantoms"):
        score_validation.check_disjoint(cases, training=[12345])


def test_previous_score_by_hand() -> None:
    score_map = np.zeros((2, 1, 101), np.float32)
    score_map[0, 0] = np.arange(101)
    mask = np.ones((2, 1, 101), bool)
    mask[1] = False
    np.testing.assert_allclose(score_validation.percentile_over_alpha(score_map, mask, 2.0), [49.5, 0.0])
