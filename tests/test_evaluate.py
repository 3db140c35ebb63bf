"""Evaluation metrics against values worked out by hand, and one tiny end-to-end row."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from inference.evaluate import (
    ModelDenoiser,
    Row,
    RowResult,
    auprc,
    auroc,
    confusion,
    default_rows,
    dice,
    evaluate_row,
    f1,
    false_positive_rate,
    iou,
    precision,
    recall,
    triage,
    triage_rows,
)
from inference.evaluation_tables import findings, goals, kind_table, markdown_table, triage_table, verdict
from inference.heldout import make_ct_cases
from inference.unet import PRESETS, ModelInfo, UNet

PRED = np.array([1, 1, 0, 0, 1, 0, 0, 0], bool)
TRUTH = np.array([1, 0, 1, 0, 1, 0, 0, 0], bool)  # tp 2, fp 1, fn 1, tn 4


def test_overlap_metrics_by_hand() -> None:
    assert confusion(PRED, TRUTH) == (2, 1, 1, 4)
    assert dice(PRED, TRUTH) == pytest.approx(4 / 6)
    assert iou(PRED, TRUTH) == pytest.approx(2 / 4)
    assert precision(PRED, TRUTH) == pytest.approx(2 / 3)
    assert recall(PRED, TRUTH) == pytest.approx(2 / 3)
    assert false_positive_rate(PRED, TRUTH) == pytest.approx(1 / 5)
    assert f1(PRED, TRUTH) == pytest.approx(4 / 6)


def test_empty_cases() -> None:
    empty = np.zeros(4, bool)
    assert dice(empty, empty) == 1.0
    assert precision(empty, np.array([1, 0, 0, 0], bool)) == 0.0
    assert recall(empty, empty) == 1.0
    assert math.isnan(auroc(np.arange(4), empty))


def test_auroc_by_hand() -> None:
    # positives 0.8, 0.4; negatives 0.6, 0.2, 0.1: pairs won 2 + 1... = (0.8 beats 3) + (0.4 beats 2) = 5 of 6
    scores = np.array([0.8, 0.6, 0.4, 0.2, 0.1])
    labels = np.array([1, 0, 1, 0, 0], bool)
    assert auroc(scores, labels) == pytest.approx(5 / 6)
    # a tie between a positive and a negative counts one half
    assert auroc(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0], bool)) == pytest.approx((1 + 0.5) / 2)


def test_auprc_by_hand() -> None:
    scores = np.array([0.8, 0.6, 0.4, 0.2, 0.1])
    labels = np.array([1, 0, 1, 0, 0], bool)
    # ranked: P (prec 1, recall .5), N, P (prec 2/3, recall 1): AP = .5 * 1 + .5 * 2/3
    assert auprc(scores, labels) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # all tied: one threshold, precision = prevalence
    assert auprc(np.ones(4), np.array([1, 0, 0, 0], bool)) == pytest.approx(0.25)
    assert auprc(scores, labels) <= 1.0 and auprc(-scores, labels) < auprc(scores, labels)


def test_a_row_runs_end_to_end_on_tiny_cases() -> None:
    from inference.pipeline import PipelineSettings, detect

    cases = make_ct_cases(seed=1, lesion_cases=1, healthy_cases=1, grid=32, size=64, slices=6)
    assert cases[0].lesion.any() and not cases[1].lesion.any()
    torch.manual_seed(0)
    model = UNet(PRESETS["tiny"])
    info = ModelInfo("tiny-test", model.config, "0" * 64)
    den = ModelDenoiser(model, info)
    base = evaluate_row(Row("baseline", method="intensity"), cases, None, 0, 3.0, resamples=20)
    row = evaluate_row(Row("diffusion", ensemble=2, steps=2), cases, den, 0, 3.0, resamples=20)
    for r in (base, row):
        assert r.n_cases == 2 and r.n_slices == 12
        assert 0.0 <= r.summary("dice")[0] <= 1.0
        assert r.study is not None and (r.study.n_lesion, r.study.n_healthy) == (1, 1)
    # the study score is the node's: detect()'s study_score with the row's settings
    settings = PipelineSettings(steps=2, ensemble=2, threshold_lambda={"CT": 3.0}, seed=0)
    expected = detect(cases[0].image, cases[0].anatomy, den, settings, "CT").study_score
    assert row.per_case[0]["study_score"] == pytest.approx(expected)
    assert "| 1 | baseline |" in markdown_table([base, row])
    assert "| 2 | diffusion |" in triage_table([base, row])
    by_kind = kind_table([base, row])
    assert f"| {cases[0].kind} | baseline | 1 / 1 |" in by_kind and "| none |" not in by_kind
    # a slice-subset row has no study score: the node scores whole studies
    subset = evaluate_row(Row("subset", method="intensity", max_slices=2), cases, None, 0, 3.0, resamples=20)
    assert subset.study is None and "n/a (slice subset)" in triage_table([subset])


def _row_result(key: str, dices: list[float], image_auroc: float, study_scores: list[float] | None = None) -> RowResult:
    """A row with lesion studies (kind nodule) and one healthy study; study metrics when scores are given (the
    last score is the healthy study's)."""
    cases: list[dict[str, object]] = [
        {"kind": "nodule", "lesion": 1.0, "lesion_study": True, "dice": d, "auroc": 0.5} for d in dices
    ]
    cases.append({"kind": "none", "lesion": 0.0, "lesion_study": False, "dice": float("nan"), "auroc": 0.5})
    for c, score in zip(cases, study_scores or [0.0] * len(cases), strict=True):
        c["study_score"] = score
    result = RowResult(Row(key, key=key), cases, {"auroc": image_auroc}, 0.0, len(cases), 0)
    if study_scores is not None:
        result.study, result.study_by_kind = triage(cases, seed=0, resamples=50)
    return result


def test_verdicts_follow_every_metric() -> None:
    assert verdict(0.05, 0.0) == "earns its place"
    assert verdict(0.005, -0.005) == "no measurable difference"
    assert verdict(-0.2, 0.0) == "does not earn its place here"
    assert verdict(0.1, -0.1).startswith("mixed")
    assert verdict(0.0, 0.0, 0.05) == "earns its place"  # the study AUROC alone
    assert verdict(0.1, 0.0, -0.05).startswith("mixed")


def test_findings_are_computed_from_the_rows_present() -> None:
    results = [
        _row_result("baseline", [0.2, 0.2], 0.80),
        _row_result("mask+adaptive", [0.1, 0.3], 0.70),
        _row_result("full", [0.5, 0.7], 0.96),
    ]
    text = findings(results, resamples=50)
    # mask+adaptive -> full: Dice 0.2 -> 0.6, AUROC 0.70 -> 0.96, rows numbered in table order; no study scores
    assert "| 3 vs 2 | 0.200 -> 0.600 | 0.700 -> 0.960 | n/a -> n/a | n/a | earns its place |" in text
    assert "| 3 vs 1 | 0.200 -> 0.600 | 0.800 -> 0.960 | n/a -> n/a | n/a | earns its place |" in text
    assert "Mask conditioning" not in text  # its rows were not run


def test_findings_pair_the_study_scores() -> None:
    # baseline ranks one of two lesion studies above the healthy one (AUROC 0.5), full ranks both (1.0)
    base = _row_result("baseline", [0.2, 0.2], 0.80, [0.9, 0.1, 0.5])
    full = _row_result("full", [0.2, 0.2], 0.80, [0.9, 0.8, 0.5])
    text = findings([base, full], resamples=200)
    line = next(x for x in text.splitlines() if x.startswith("| The full method"))
    assert "| 0.500 -> 1.000 | +0.500 [" in line and line.endswith("| earns its place |")


def test_goals_say_met_or_by_how_much() -> None:
    base = _row_result("baseline", [0.3], 0.9, [0.4, 0.5])
    full = _row_result("full", [0.6], 0.95, [0.7, 0.1])
    text = goals([base, full], "CT")
    assert "study AUROC 1.000 (goal >= 0.95: met)" in text
    assert "slice AUROC 0.950 (goal >= 0.9: met)" in text
    assert "Dice 0.600 (goal >= 0.5: met)" in text
    assert "lowest lesion-kind Dice 0.600 (goal >= 0.3: met), nodule" in text
    assert "on every metric: no; not better on pixel AUROC 0.500 vs 0.500." in text
    worse = goals([_row_result("baseline", [0.3], 0.9), _row_result("full", [0.1], 0.5)], "DX")
    assert "Dice 0.100 (goal >= 0.4: not met, short by 0.300)" in worse and "study AUROC n/a" in worse


def test_deep_and_mixed_depth_rows_only_for_a_model_trained_that_deep() -> None:
    """A model trained on timesteps below 550 would be run outside its training: no deep rows for it."""
    deep_keys = {"deep", "mixed"}
    assert not deep_keys & {r.key for r in default_rows(3, 1, 1, 1, 1, trained_t_max=300)}
    rows = {r.key: r for r in default_rows(3, 1, 1, 1, 1, trained_t_max=600)}
    assert rows["deep"].t_start == 550 and rows["deep"].deep_t_start is None
    assert rows["mixed"].t_start is None and rows["mixed"].deep_t_start == 550
    assert {r.key for r in triage_rows(3, 600)} == {"baseline", "full", "deep", "mixed"}
