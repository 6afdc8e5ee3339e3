"""chestct.evaluation.uncertainty: group bootstrap intervals and the paired bootstrap of two
models."""

from __future__ import annotations

import numpy as np
import pytest

from chestct.evaluation.metrics import classification_metrics, expected_calibration_error
from chestct.evaluation.uncertainty import (
    bootstrap_intervals,
    group_codes,
    paired_bootstrap,
    paired_metric_supported,
    resample_weights,
    weighted_scores,
)
from chestct.labels import CLASSES

K = len(CLASSES)


def _proba(y_pred: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Probabilities whose argmax is y_pred, with varied confidence."""
    p = rng.uniform(0.0, 0.3, (len(y_pred), K))
    p[np.arange(len(y_pred)), y_pred] += rng.uniform(0.3, 1.0, len(y_pred))
    return p / p.sum(axis=1, keepdims=True)


def test_unit_weights_reproduce_the_reported_metrics() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, K, 200)
    y_pred = np.where(rng.random(200) < 0.7, y, rng.integers(0, K, 200))
    y_pred[y_pred == 3] = 2  # a class never predicted: F1 0, as sklearn's zero_division=0
    proba = _proba(y_pred, rng)
    reported = classification_metrics(y, proba)
    mine = weighted_scores(y, y_pred, np.ones((1, 200)), proba.max(axis=1))
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert mine[key][0] == pytest.approx(reported[key], abs=1e-12)
    assert mine["ece"][0] == pytest.approx(expected_calibration_error(y, proba), abs=1e-12)


def test_resample_weights_move_whole_groups() -> None:
    codes = group_codes(["a", "a", "a", "b", "c", "c"], 6)
    weights = resample_weights(codes, 200, seed=1)
    assert weights.shape == (200, 6)
    # Items of one group always carry the same weight; each resample draws 3 groups.
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 1] == weights[:, 2]).all()
    assert (weights[:, 4] == weights[:, 5]).all()
    assert np.allclose(weights[:, [0, 3, 4]].sum(axis=1), 3)
    assert (resample_weights(codes, 200, seed=1) == weights).all()  # seeded
    with pytest.raises(ValueError, match="group ids"):
        group_codes(["a"], 2)


def test_interval_covers_the_true_accuracy_at_about_the_nominal_rate() -> None:
    """A known case: each slice is right with probability 0.8, so the true accuracy is 0.8;
    about 95 % of 95 % intervals from independent samples of 150 slices must contain it."""
    rng = np.random.default_rng(11)
    covered = 0
    trials = 200
    for t in range(trials):
        y = rng.integers(0, K, 150)
        y_pred = np.where(rng.random(150) < 0.8, y, (y + 1) % K)
        ci = bootstrap_intervals(y, _proba(y_pred, rng), resamples=400, seed=t)
        covered += ci["accuracy"]["low"] <= 0.8 <= ci["accuracy"]["high"]
    assert 0.89 <= covered / trials <= 0.99


def test_resampling_groups_widens_the_interval_of_correlated_slices() -> None:
    """Ten series of 20 near-copies each: right or wrong together. Resampling slices as if
    they were independent understates the uncertainty; resampling series does not."""
    rng = np.random.default_rng(5)
    series = np.repeat(np.arange(10), 20)
    y = np.repeat(rng.integers(0, K, 10), 20)
    wrong = np.repeat(rng.random(10) < 0.3, 20)
    wrong[:20] = True  # at least one series wrong, whatever the seed
    y_pred = np.where(wrong, (y + 1) % K, y)
    proba = _proba(y_pred, rng)
    by_slice = bootstrap_intervals(y, proba, None, resamples=1000, seed=0)["accuracy"]
    by_series = bootstrap_intervals(y, proba, list(series), resamples=1000, seed=0)["accuracy"]
    slice_width = by_slice["high"] - by_slice["low"]
    series_width = by_series["high"] - by_series["low"]
    assert series_width > 3 * slice_width


def test_intervals_have_scalar_leaves_and_contain_the_estimate() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, K, 80)
    y_pred = np.where(rng.random(80) < 0.75, y, rng.integers(0, K, 80))
    proba = _proba(y_pred, rng)
    ci = bootstrap_intervals(y, proba, calibrated=proba**0.5 / (proba**0.5).sum(1, keepdims=True))
    assert set(ci) == {"accuracy", "balanced_accuracy", "macro_f1", "ece", "ece_calibrated"}
    reported = classification_metrics(y, proba)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "ece"):
        assert isinstance(ci[key]["low"], float) and isinstance(ci[key]["high"], float)
        assert ci[key]["low"] <= reported[key] <= ci[key]["high"]


def _condition_predictions(y: np.ndarray, right: float, rng: np.random.Generator) -> dict:
    def guess() -> np.ndarray:
        return np.where(rng.random(len(y)) < right, y, (y + 1) % K)

    return {"clean": guess(), "blur": guess(), "noise": guess()}


def test_paired_bootstrap_calls_a_few_flipped_slices_noise() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, K, 120)
    champion = _condition_predictions(y, 0.8, rng)
    candidate = {k: v.copy() for k, v in champion.items()}
    wrong = np.flatnonzero(candidate["clean"] != y)[:2]
    candidate["clean"][wrong] = y[wrong]  # two more right answers: +0.017 accuracy
    result = paired_bootstrap("accuracy", y, candidate, champion, resamples=1000)
    assert result.difference == pytest.approx(2 / 120)
    assert result.p_value > 0.05
    assert not result.significant()
    assert "paired bootstrap over 120 groups" in result.describe()


def test_paired_bootstrap_finds_a_real_improvement_in_robust_macro_f1() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, K, 200)
    champion = _condition_predictions(y, 0.6, rng)
    candidate = _condition_predictions(y, 0.9, rng)
    result = paired_bootstrap("robust_macro_f1", y, candidate, champion, resamples=1000)
    assert result.difference > 0.2
    assert result.low > 0 and result.significant()
    worse = paired_bootstrap("robust_macro_f1", y, champion, candidate, resamples=1000)
    assert worse.p_value == 1.0 and not worse.significant()


def test_paired_metrics_supported() -> None:
    shifts = ["blur", "noise"]
    for metric in ("accuracy", "macro_f1", "robust_macro_f1", "shift.blur.macro_f1"):
        assert paired_metric_supported(metric, shifts)
    for metric in ("shift.worst_macro_f1", "shift.mean_macro_f1"):
        assert paired_metric_supported(metric, shifts)
    for metric in ("ece_calibrated", "roc_auc", "shift.gamma.macro_f1", "nll"):
        assert not paired_metric_supported(metric, shifts)
    assert not paired_metric_supported("robust_macro_f1", [])
    y = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="cannot recompute 'roc_auc'"):
        paired_bootstrap("roc_auc", y, {"clean": y}, {"clean": y})


def test_paired_on_tables_matches_by_path_and_says_why_not() -> None:
    import pandas as pd

    from chestct.evaluation.uncertainty import paired_on_tables

    rng = np.random.default_rng(8)
    y = rng.integers(0, K, 60)
    champion_pred = np.where(rng.random(60) < 0.5, y, (y + 1) % K)
    frame = {"path": [f"{i}.png" for i in range(60)], "actual": [CLASSES[i] for i in y]}
    candidate = pd.DataFrame({**frame, "predicted": [CLASSES[i] for i in y]})
    champion = pd.DataFrame({**frame, "predicted": [CLASSES[i] for i in champion_pred]})
    calls = []

    def scored() -> pd.DataFrame:
        calls.append(1)
        return champion.iloc[::-1]  # another order: matched by path

    result = paired_on_tables("accuracy", candidate, scored)
    assert result.difference == pytest.approx(float(np.mean(champion_pred != y)))
    assert result.significant()
    # The champion is never scored for a metric the test cannot recompute.
    assert paired_on_tables("ece", candidate, scored) == (
        "ece is not recomputed from per-image predictions"
    )
    assert len(calls) == 1
    assert paired_on_tables("accuracy", candidate, lambda: champion.iloc[:30]) == (
        "the champion's predictions do not cover the candidate's test images"
    )
    shifted = candidate.assign(predicted_blur=candidate["predicted"])
    assert paired_on_tables("shift.blur.accuracy", shifted, lambda: champion) == (
        "the champion's predictions lack predicted_blur"
    )
