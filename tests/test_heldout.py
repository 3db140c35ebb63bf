"""Held-out sets: seeds disjoint from training (enforced), shifted ranges outside the training ones, and the
report generator's CT and radiograph sections for both sets (tiny sizes, tiny untrained models)."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.evaluation_report import write_report
from inference.heldout import (
    assert_held_out,
    heldout_seed,
    make_ct_cases,
    make_radiograph_cases,
)
from inference.phantoms import SCANNERS, SHIFTED, SHIFTED_SCANNERS, TRAINING, Span, draw_in, make_ct
from inference.radiograph_phantoms import SHIFTED_FIELDS, SHIFTED_RADIOGRAPHS, TYPICAL_RADIOGRAPHS
from inference.train import model_training_seeds, phantom_slices, training_seeds
from inference.unet import PRESETS, UNet, save_model
from inference.volume import GridMapping, normalise, resample_to_grid


def _overlaps(a: Span, b: Span) -> bool:
    return any(lo1 <= hi2 and lo2 <= hi1 for lo1, hi1 in a for lo2, hi2 in b)


def test_training_draws_the_seeds_training_seeds_names() -> None:
    pool = phantom_slices(7, 2, 48, 4, 16)
    for i, case_seed in enumerate(training_seeds(7, 2)):
        ph = make_ct(case_seed, 48, 48, 4, "none")
        expected = resample_to_grid(normalise(ph.hu, "CT"), GridMapping(48, 48, 16), fill=-1.0)
        np.testing.assert_array_equal(pool.images[4 * i : 4 * i + 4].numpy(), expected)


def test_model_training_seeds_come_from_the_metadata() -> None:
    config = json.dumps({"seed": 5, "subjects": 3, "data_dir": ""})
    assert model_training_seeds({"config": config}) == training_seeds(5, 3)
    assert model_training_seeds({"config": json.dumps({"data_dir": "/dicom"})}) == []
    assert model_training_seeds({}) == training_seeds(0, 120)  # older files: the default run


def test_overlapping_seeds_are_refused() -> None:
    assert_held_out([1, 2, 3], [4, 5], "set")
    with pytest.raises(ValueError, match=r"held-out seeds \[3\] are training seeds"):
        assert_held_out([1, 2, 3], [3, 4], "set")


def _tiny_model(path: Path, modalities: tuple[str, ...], data_seed: int = 0, subjects: int = 4, grid: int = 16) -> Path:
    torch.manual_seed(0)
    training: dict[str, object] = {
        "steps": 0,
        "data": "untrained",
        "config": json.dumps({"seed": data_seed, "subjects": subjects, "data_dir": ""}),
    }
    # the smallest U-Net the code builds (16x16 grid, no attention): the report's structure is under test here
    config = replace(PRESETS["tiny"], image_size=grid, attention_levels=())
    save_model(UNet(config), path, "tiny", training, modalities=modalities)
    return path


def test_a_model_trained_on_a_held_out_seed_is_refused(tmp_path: Path) -> None:
    # a run with data seed 1_000_003 draws exactly the CT set A stream (seed 0) as its training subjects
    assert training_seeds(1_000_003, 2)[0] == heldout_seed("CT", "training", 0, 0)
    model = _tiny_model(tmp_path / "ct.safetensors", ("CT",), data_seed=1_000_003, subjects=2)
    with pytest.raises(ValueError, match="not held out"):
        write_report(
            model, tmp_path / "E.md", tmp_path / "e.png", lesion_cases=1, healthy_cases=1, grid_source_size=64,
            slices=8, radiograph_size=48, only_rows=[1], sets=("training",), resamples=10, calibration_subjects=1,
            log=lambda _: None,
        )  # fmt: skip


def test_training_ranges_repeat_the_old_draws() -> None:
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert draw_in(a, ((0.88, 1.12),)) == b.uniform(0.88, 1.12)
    assert a.integers(1000) == b.integers(1000)  # and leave the stream where it was
    np.testing.assert_array_equal(make_ct(9, 48, 48, 4, "mixed").hu, make_ct(9, 48, 48, 4, "mixed", ranges=TRAINING).hu)


def test_shifted_ranges_lie_outside_the_training_ranges() -> None:
    for f in fields(TRAINING):
        if f.name in ("name", "scanners"):
            continue
        train, shifted = getattr(TRAINING, f.name), getattr(SHIFTED, f.name)
        assert not _overlaps(train, shifted), f.name
    assert TRAINING.scanners == SCANNERS and SHIFTED.scanners == SHIFTED_SCANNERS

    def envelope(values: list[float]) -> tuple[float, float]:
        return min(values), max(values)

    noise = envelope([s.noise_hu for s in SCANNERS])
    blur = envelope([s.blur_mm for s in SCANNERS])
    sharpen = envelope([s.sharpen for s in SCANNERS])
    for s in SHIFTED_SCANNERS:
        assert not noise[0] <= s.noise_hu <= noise[1], s
        assert not blur[0] <= s.blur_mm <= blur[1] or not sharpen[0] <= s.sharpen <= sharpen[1], s
    for name in SHIFTED_FIELDS:
        typical, shifted = getattr(TYPICAL_RADIOGRAPHS, name), getattr(SHIFTED_RADIOGRAPHS, name)
        assert not _overlaps((typical,), (shifted,)), name
    for f in fields(TYPICAL_RADIOGRAPHS):  # everything else is drawn as in training
        if f.name not in SHIFTED_FIELDS:
            assert getattr(TYPICAL_RADIOGRAPHS, f.name) == getattr(SHIFTED_RADIOGRAPHS, f.name), f.name


def test_shifted_phantoms_are_rendered_outside_the_training_ranges() -> None:
    for seed in range(4):
        for kind in ("nodule", "consolidation"):
            ph = make_ct(100 + seed, 64, 64, 8, kind, ranges=SHIFTED)
            assert ph.scanner in SHIFTED_SCANNERS
            for lesion in ph.lesions:
                lo, hi = TRAINING.size_mm(kind)[0]
                assert not lo <= lesion.size_mm <= hi
    rng = np.random.default_rng(0)
    draws = [draw_in(rng, SHIFTED.body_scale) for _ in range(200)]
    assert all(not 0.88 <= d <= 1.12 for d in draws) and min(draws) < 0.86 and max(draws) > 1.14


def test_held_out_sets_have_their_lesions_and_shifted_radiographs_differ() -> None:
    cases = make_ct_cases(0, 5, 2, 16, 64, 8, SHIFTED)
    assert [c.kind for c in cases] == ["nodule", "ggo", "consolidation", "reticular", "mixed", "none", "none"]
    assert all(c.lesion_study for c in cases[:5]) and not any(c.lesion_study for c in cases[5:])
    assert all(c.acquisition.split(" ")[-1] in {s.kernel for s in SHIFTED_SCANNERS} for c in cases)
    plain = make_radiograph_cases(0, 1, 1, 16, 48)
    shifted = make_radiograph_cases(0, 1, 1, 16, 48, shifted=True)
    assert plain[0].lesion.any() and not plain[1].lesion.any()
    assert {c.seed for c in plain}.isdisjoint(c.seed for c in shifted)
    for case in shifted:  # acquired outside the typical ranges, and the case says how
        kvp = float(case.acquisition.split(" kVp")[0])
        assert SHIFTED_RADIOGRAPHS.kvp[0] <= kvp <= SHIFTED_RADIOGRAPHS.kvp[1], case.acquisition
    assert all(" kVp" in c.acquisition for c in plain)


def _report(tmp_path: Path, **kwargs: object) -> str:
    out = tmp_path / "EVALUATION.md"
    lines: list[str] = []
    write_report(
        _tiny_model(tmp_path / "ct.safetensors", ("CT",)),
        out,
        tmp_path / "evaluation.png",
        lesion_cases=2,
        healthy_cases=1,
        ensemble=1,
        grid_source_size=64,
        slices=8,
        radiograph_size=48,
        resamples=20,
        calibration_subjects=2,
        log=lines.append,
        **kwargs,  # type: ignore[arg-type]
    )
    assert any("row 1/" in line for line in lines)  # progress, one line per row
    return out.read_text()


@pytest.mark.slow  # the whole report, both sets and both modalities (40 s); the baseline-only report stays fast
def test_report_has_ct_and_radiograph_sections_for_both_sets(tmp_path: Path) -> None:
    rx = _tiny_model(tmp_path / "rx.safetensors", ("CR", "DX"))
    text = _report(tmp_path, radiograph_model=rx, only_rows=[1, 7])
    for title in (
        "## Chest CT, held-out set A (training ranges)",
        "## Chest CT, held-out set B (shifted ranges, out of distribution)",
        "## Chest radiographs (CR/DX), held-out set A (training ranges)",
        "## Chest radiographs (CR/DX), held-out set B (shifted ranges, out of distribution)",
    ):
        assert title in text
    assert text.count("| 1 | Intensity threshold (> -400 HU in lung) |") == 4  # triage and pixel tables, A and B
    assert text.count("| 1 | Brightness threshold") == 4
    assert text.count("| 2 | Radiograph model") == 4  # at the node's depth ...
    assert text.count("| 3 | Radiograph model") == 4  # ... and at the depth radiographs started from before
    assert text.count("| Radiographs from t_start 25 instead of 250 | 2 vs 3 |") == 2
    assert "t_start 250 (CT) / 25 (CR/DX)" in text
    assert "--model-cr" in text.split("\n## ")[0] and "| CT parameter |" in text and "Radiograph acquisition" in text
    assert "Below the 30 lesion / 15 healthy studies" in text
    assert (tmp_path / "evaluation.png").stat().st_size > 0


def test_report_without_a_radiograph_model_shows_the_baseline_only(tmp_path: Path) -> None:
    text = _report(tmp_path, only_rows=[1], sets=("training",))
    assert "No radiograph model was given" in text
    assert "## Chest radiographs (CR/DX), held-out set A" in text and "held-out set B" not in text
    assert "| 2 |" not in text.split("## Chest radiographs")[1]


def test_ablation_rows_of_another_grid_run_on_the_same_studies_on_their_grid(tmp_path: Path) -> None:
    """A shipped model moved to a finer grid keeps its ablation models: their rows run on the same phantoms
    resampled to the ablation models' grid, and the report says so."""
    ablations = tmp_path / "ablations"
    _tiny_model(ablations / "ablation-gaussian.safetensors", ("CT",), grid=24)
    text = _report(tmp_path, ablations=ablations, only_rows=[1, 2, 7], sets=("training",))
    assert "| 2 | DDPM, Gaussian noise [24x24 grid] |" in text
    assert "(24x24 grid, 0 steps, None, cond None)" in text  # weights per row
    shipped = [line for line in text.splitlines() if line.startswith("| 3 | Simplex + mask + adaptive")]
    assert shipped and not any("grid]" in line for line in shipped)  # the shipped model's rows: its own grid


def test_a_ct_model_is_not_taken_for_a_radiograph_model(tmp_path: Path) -> None:
    ct = _tiny_model(tmp_path / "ct.safetensors", ("CT",))
    with pytest.raises(ValueError, match="not a radiograph model"):
        write_report(ct, tmp_path / "E.md", tmp_path / "e.png", radiograph_model=ct, log=lambda _: None)
