"""Classification and calibration metrics from predictions, computed with scikit-learn/NumPy.

Never from Keras' `evaluate()` dict: Keras 3 renames its keys. Everything here takes true class
indices and a probability (or logit) matrix over CLASSES, so the same code scores a Keras model,
the light model or a champion that is re-scored.

scikit-learn and SciPy are imported inside the functions: they take seconds to import, and a
stage must reach its tracking-store check (runner.stage_session) within seconds of starting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from chestct.labels import CLASSES

ECE_BINS = 15


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, Any]:
    """Headline and per-class metrics of argmax predictions over the four CLASSES.

    Args:
        y_true: true class indices, shape (n,).
        proba: class probabilities, shape (n, len(CLASSES)).

    Returns:
        accuracy, balanced_accuracy, macro_f1, macro_f2, roc_auc (macro one-vs-rest over the
        classes present), ece, n, and per class: sensitivity, specificity, precision, roc_auc
        (None where a class is absent from y_true).
    """
    from sklearn.metrics import (
        accuracy_score,
        confusion_matrix,
        fbeta_score,
        precision_score,
        recall_score,
    )

    y_true = np.asarray(y_true)
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape != (len(y_true), len(CLASSES)):
        raise ValueError(
            f"expected probabilities of shape ({len(y_true)}, {len(CLASSES)}), got {proba.shape}"
        )
    if len(y_true) == 0:
        raise ValueError("no predictions to score: the split is empty")
    labels = list(range(len(CLASSES)))
    y_pred = proba.argmax(axis=1)
    matrix = confusion_matrix(y_true, y_pred, labels=labels)
    total = matrix.sum()
    sensitivity = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    precision = precision_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    specificity = []
    for i in labels:
        negatives = total - matrix[i, :].sum()
        true_neg = negatives - (matrix[:, i].sum() - matrix[i, i])
        specificity.append(float(true_neg / negatives) if negatives else 0.0)
    auc = per_class_auc(y_true, proba)
    present = [a for a in auc.values() if a is not None]
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        # The mean recall over the classes present in y_true, as sklearn's
        # balanced_accuracy_score computes it; that one also warns ("y_pred contains classes
        # not in y_true") whenever a split or shift lacks a class the model predicts.
        "balanced_accuracy": float(np.mean(sensitivity[np.isin(labels, y_true)])),
        "macro_f1": float(
            fbeta_score(y_true, y_pred, beta=1, labels=labels, average="macro", zero_division=0)
        ),
        # F2 weighs recall four times as much as precision: a missed cancer costs more.
        "macro_f2": float(
            fbeta_score(y_true, y_pred, beta=2, labels=labels, average="macro", zero_division=0)
        ),
        "roc_auc": float(np.mean(present)) if present else None,
        "ece": expected_calibration_error(y_true, proba),
        "n": len(y_true),
        "sensitivity": dict(zip(CLASSES, map(float, sensitivity), strict=True)),
        "specificity": dict(zip(CLASSES, specificity, strict=True)),
        "precision": dict(zip(CLASSES, map(float, precision), strict=True)),
        "roc_auc_per_class": auc,
    }


def per_class_auc(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float | None]:
    """One-vs-rest ROC-AUC per class; None when the class or its complement is absent."""
    from sklearn.metrics import roc_auc_score

    out: dict[str, float | None] = {}
    for i, name in enumerate(CLASSES):
        positive = np.asarray(y_true) == i
        if positive.all() or not positive.any():
            out[name] = None
        else:
            out[name] = float(roc_auc_score(positive, proba[:, i]))
    return out


def roc_curves(
    y_true: np.ndarray, proba: np.ndarray, grid: int = 101
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One-vs-rest ROC curves interpolated onto a shared false-positive-rate grid.

    Returns:
        The grid and, per class present in y_true (with negatives), the true-positive rates.
    """
    from sklearn.metrics import roc_curve

    fpr_grid = np.linspace(0.0, 1.0, grid)
    curves: dict[str, np.ndarray] = {}
    for i, name in enumerate(CLASSES):
        positive = np.asarray(y_true) == i
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, proba[:, i])
        curves[name] = np.interp(fpr_grid, fpr, tpr)
    return fpr_grid, curves


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """The 4×4 confusion matrix (rows actual, columns predicted) in CLASSES order."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(y_true, y_pred, labels=list(range(len(CLASSES))))


@dataclass(frozen=True)
class ReliabilityBin:
    lower: float
    upper: float
    count: int
    confidence: float  # mean top-class probability in the bin (NaN when empty)
    accuracy: float  # fraction correct in the bin (NaN when empty)


def reliability(
    y_true: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS
) -> list[ReliabilityBin]:
    """Equal-width bins of the top-class probability, with confidence and accuracy per bin."""
    proba = np.asarray(proba, dtype=np.float64)
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bins are (lower, upper]; a confidence of exactly 0 cannot occur for a softmax.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        member = which == b
        n = int(member.sum())
        out.append(
            ReliabilityBin(
                lower=float(edges[b]),
                upper=float(edges[b + 1]),
                count=n,
                confidence=float(confidence[member].mean()) if n else math.nan,
                accuracy=float(correct[member].mean()) if n else math.nan,
            )
        )
    return out


def expected_calibration_error(
    y_true: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE: the count-weighted mean |accuracy − confidence| over equal-width bins."""
    table = reliability(y_true, proba, bins)
    n = sum(b.count for b in table)
    return float(sum(b.count * abs(b.accuracy - b.confidence) for b in table if b.count) / n)


def robust_macro_f1(clean_macro_f1: float, worst_shift_macro_f1: float) -> float:
    """The default selection metric: the mean of clean macro-F1 and the worst macro-F1 under
    the shift-stress set (perturb.SHIFTS).

    Clean macro-F1 alone rewards a model for any cue the test split shares with train, such
    as how one class was acquired; the worst shift alone would prefer a model that is equally
    poor everywhere. Their mean only rises when a model is both accurate and keeps its
    accuracy when the acquisition changes.
    """
    return (float(clean_macro_f1) + float(worst_shift_macro_f1)) / 2.0


# Metric names (the last part of a dotted key) where a smaller value is the better model.
LOWER_IS_BETTER = frozenset(
    {
        "ece",
        "ece_calibrated",
        "nll",
        "nll_calibrated",
        "worst_ece",
        "mean_ece",
        "abstain_rate",
        "ood_rate",
    }
)


def lower_is_better(key: str) -> bool:
    """Whether a smaller value of the (dotted) metric key is better (ECE, NLL, rates)."""
    return key.split(".")[-1] in LOWER_IS_BETTER


def numeric_keys(metrics: dict[str, Any], prefix: str = "") -> list[str]:
    """Every key of a (nested) metrics dict that holds a number, dotted ("shift.blur.macro_f1")."""
    keys = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            keys.extend(numeric_keys(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            keys.append(name)
    return keys


def metric_value(metrics: dict[str, Any], key: str) -> float | None:
    """The number at a dotted key of a nested metrics dict; None when absent or not a number."""
    value: Any = metrics
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
