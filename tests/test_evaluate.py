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
    dice,
    evaluate_row,
    f1,
    false_positive_rate,
    findings,
    iou,
    kind_table,
    make_cases,
    markdown_table,
    precision,
    recall,
    verdict,
)
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
    cases = make_cases(seed=1, lesion_cases=1, healthy_cases=1, grid=32, size=64, slices=6)
    assert cases[0].lesion.any() and not cases[1].lesion.any()
    torch.manual_seed(0)
    model = UNet(PRESETS["tiny"])
    info = ModelInfo("tiny-test", model.config, "0" * 64)
    den = ModelDenoiser(model, info)
    base = evaluate_row(Row("baseline", method="intensity"), cases, None, 0, 3.0)
    row = evaluate_row(Row("diffusion", ensemble=2, steps=2), cases, den, 0, 3.0)
    for r in (base, row):
        assert r.n_cases == 2 and r.n_slices == 12
        assert 0.0 <= r.summary("dice")[0] <= 1.0
    assert "| baseline |" in markdown_table([base, row])
    by_kind = kind_table(row)
    assert f"| {cases[0].kind} | 1 |" in by_kind and "| none |" not in by_kind


def _row_result(key: str, dices: list[float], image_auroc: float) -> RowResult:
    cases = [{"kind": "nodule", "lesion": 1.0, "dice": d} for d in dices] + [{"kind": "none", "lesion": 0.0}]
    return RowResult(Row(key, key=key), cases, {"auroc": image_auroc}, 0.0, len(cases), 0)


def test_verdicts_follow_both_metrics() -> None:
    assert verdict(0.05, 0.0) == "earns its place"
    assert verdict(0.005, -0.005) == "no measurable difference"
    assert verdict(-0.2, 0.0) == "does not earn its place here"
    assert verdict(0.1, -0.1).startswith("mixed")


def test_findings_are_computed_from_the_rows_present() -> None:
    results = [
        _row_result("baseline", [0.2, 0.2], 0.80),
        _row_result("mask+adaptive", [0.1, 0.3], 0.70),
        _row_result("full", [0.5, 0.7], 0.96),
    ]
    text = findings(results)
    # mask+adaptive -> full: Dice 0.2 -> 0.6, AUROC 0.70 -> 0.96, rows numbered in table order
    assert "| 3 vs 2 | 0.200 -> 0.600 | 0.700 -> 0.960 | earns its place |" in text
    assert "| 3 vs 1 | 0.200 -> 0.600 | 0.800 -> 0.960 | earns its place |" in text
    assert "Mask conditioning" not in text  # its rows were not run
    assert "Dice 0.600 (goal >= 0.5: met); image AUROC 0.960 (goal >= 0.95: met)" in text
    worse = findings([_row_result("baseline", [0.3], 0.9), _row_result("full", [0.1], 0.5)])
    assert "does not earn its place here" in worse and "Dice 0.100 (goal >= 0.5: not met)" in worse
