"""How uncertain a metric is: bootstrap intervals and the paired bootstrap of two models.

A test split of a few hundred slices, or an external set that keeps three slices of a class
after de-duplication, moves macro-F1 by 0.1 with one slice. Every interval here resamples
*groups* (a series or patient, `groups`), not slices: near-copies of one slice move together,
as they would if another patient had been drawn. Without groups every slice is its own group.

Vectorised: a resample is a vector of per-item weights (how often the item's group was drawn),
and every metric is a weighted count, so 1000 resamples are a few matrix products. With all
weights 1 the formulas give exactly chestct.evaluation.metrics.classification_metrics' accuracy,
balanced_accuracy and macro_f1, and expected_calibration_error's ECE.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from chestct.evaluation.metrics import ECE_BINS
from chestct.labels import CLASSES

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
INTERVAL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "ece", "ece_calibrated")


def group_codes(groups: Sequence[object] | None, n: int) -> np.ndarray:
    """Integer codes 0..G-1 of the items' groups; every item its own group when None."""
    if groups is None:
        return np.arange(n)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group ids for {n} items")
    _, codes = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    return codes.reshape(-1)


def resample_weights(codes: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) float weights: item i counts as often as its group was drawn, groups
    drawn with replacement as many times as there are groups."""
    n_groups = int(codes.max()) + 1 if len(codes) else 0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, max(n_groups, 1), size=(resamples, n_groups))
    offsets = np.arange(resamples)[:, None] * n_groups
    counts = np.bincount((draws + offsets).ravel(), minlength=resamples * n_groups)
    return counts.reshape(resamples, n_groups)[:, codes].astype(np.float64)


def weighted_scores(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    weights: np.ndarray,
    confidence: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """accuracy, balanced_accuracy, macro_f1 (and ece with `confidence`, the top-class
    probability) of one set of predictions under each row of `weights` (k, n).

    balanced_accuracy averages recall over the classes present in the truth, macro_f1 F1 over
    the classes present in the truth or the predictions."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    k = len(CLASSES)
    correct = (y_true == y_pred).astype(np.float64)
    total = weights.sum(axis=1)
    safe_total = np.where(total > 0, total, 1.0)
    true_onehot = np.eye(k)[y_true]  # (n, k)
    pred_onehot = np.eye(k)[y_pred]
    tp = weights @ (true_onehot * correct[:, None])  # (B, k)
    support = weights @ true_onehot
    predicted = weights @ pred_onehot
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    present = (support > 0).sum(axis=1)
    denominator = support + predicted  # 2TP + FP + FN
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    # Over the classes present in the truth or the predictions (sklearn's default labels):
    # the same as the reported macro-F1 when every class appears, and a resample or a part
    # that lacks a class is not charged an F1 of 0 for it.
    seen = (denominator > 0).sum(axis=1)
    out = {
        "accuracy": (weights @ correct) / safe_total,
        "balanced_accuracy": recall.sum(axis=1) / np.maximum(present, 1),
        "macro_f1": f1.sum(axis=1) / np.maximum(seen, 1),
    }
    if confidence is not None:
        out["ece"] = weighted_ece(np.asarray(confidence, np.float64), correct, weights)
    return out


def weighted_ece(
    confidence: np.ndarray, correct: np.ndarray, weights: np.ndarray, bins: int = ECE_BINS
) -> np.ndarray:
    """ECE (chestct.evaluation.metrics.expected_calibration_error's bins) under each row of
    weights."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    member = np.eye(bins)[which]  # (n, bins)
    gap = weights @ (member * (correct - confidence)[:, None])  # (B, bins)
    total = weights.sum(axis=1)
    return np.abs(gap).sum(axis=1) / np.where(total > 0, total, 1.0)


def bootstrap_intervals(
    y_true: np.ndarray,
    proba: np.ndarray,
    groups: Sequence[object] | None = None,
    *,
    calibrated: np.ndarray | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Percentile bootstrap intervals, resampling groups, of accuracy, balanced_accuracy,
    macro_f1 and ece (of `proba`) and ece_calibrated (of `calibrated`, when given).

    Returns:
        {metric: {"low": ..., "high": ...}}: scalar leaves, as `dvc metrics` shows them.
    """
    y_true = np.asarray(y_true)
    proba = np.asarray(proba, np.float64)
    if len(y_true) == 0:
        return {}
    codes = group_codes(groups, len(y_true))
    weights = resample_weights(codes, resamples, seed)
    y_pred = proba.argmax(axis=1)
    scores = weighted_scores(y_true, y_pred, weights, proba.max(axis=1))
    if calibrated is not None:
        calibrated = np.asarray(calibrated, np.float64)
        correct = (calibrated.argmax(axis=1) == y_true).astype(np.float64)
        scores["ece_calibrated"] = weighted_ece(calibrated.max(axis=1), correct, weights)
    tail = (1.0 - confidence) / 2.0
    return {
        name: {
            "low": float(np.quantile(values, tail)),
            "high": float(np.quantile(values, 1.0 - tail)),
        }
        for name, values in scores.items()
    }


# --------------------------------------------------------------------------- paired test

# Selection metrics the paired bootstrap recomputes from per-item predicted classes: clean,
# per shift, the summaries over shifts, and robust_macro_f1 (chestct.evaluation.scoring's
# definitions).
_LABEL_METRICS = ("accuracy", "balanced_accuracy", "macro_f1")


def paired_metric_supported(metric: str, conditions: Sequence[str]) -> bool:
    """Whether `paired_bootstrap` can recompute `metric` from predictions under `conditions`
    (the shift names available besides the clean predictions)."""
    parts = metric.split(".")
    if len(parts) == 1:
        return parts[0] in (*_LABEL_METRICS, "robust_macro_f1") and (
            parts[0] != "robust_macro_f1" or bool(conditions)
        )
    if parts[0] != "shift" or not conditions:
        return False
    if len(parts) == 2:
        return parts[1] in ("worst_macro_f1", "mean_macro_f1", "worst_balanced_accuracy")
    return len(parts) == 3 and parts[1] in conditions and parts[2] in _LABEL_METRICS


def metric_resamples(
    metric: str,
    y_true: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    weights: np.ndarray,
) -> np.ndarray:
    """`metric` under each row of weights, from predicted classes per condition
    (`predictions["clean"]` and one entry per shift)."""
    shifts = [c for c in predictions if c != "clean"]
    if not paired_metric_supported(metric, shifts):
        raise ValueError(f"the paired bootstrap cannot recompute {metric!r}")
    scores = {c: weighted_scores(y_true, p, weights) for c, p in predictions.items()}
    parts = metric.split(".")
    if len(parts) == 1 and parts[0] != "robust_macro_f1":
        return scores["clean"][parts[0]]
    if len(parts) == 3:
        return scores[parts[1]][parts[2]]
    per_shift_f1 = np.stack([scores[s]["macro_f1"] for s in shifts])
    if metric == "robust_macro_f1":
        return (scores["clean"]["macro_f1"] + per_shift_f1.min(axis=0)) / 2.0
    if parts[1] == "worst_macro_f1":
        return per_shift_f1.min(axis=0)
    if parts[1] == "mean_macro_f1":
        return per_shift_f1.mean(axis=0)
    return np.stack([scores[s]["balanced_accuracy"] for s in shifts]).min(axis=0)


@dataclass(frozen=True)
class PairedResult:
    """The paired bootstrap of candidate − champion on the same items."""

    metric: str
    difference: float  # on all items
    low: float  # the two-sided `confidence` interval of the difference
    high: float
    p_value: float  # one-sided, of "the candidate is no better" (paired_bootstrap)
    resamples: int
    confidence: float
    groups: int

    def significant(self, higher_is_better: bool = True) -> bool:
        """Whether the candidate is better at level 1 - confidence (p <= 1 - confidence)."""
        return self.p_value <= 1.0 - self.confidence and (
            self.difference > 0 if higher_is_better else self.difference < 0
        )

    def describe(self) -> str:
        return (
            f"paired bootstrap over {self.groups} groups ({self.resamples} resamples): "
            f"{self.metric} difference {self.difference:+.4f}, {self.confidence:.0%} interval "
            f"[{self.low:+.4f}, {self.high:+.4f}], p = {self.p_value:.3f}"
        )


def paired_bootstrap(
    metric: str,
    y_true: np.ndarray,
    candidate: Mapping[str, np.ndarray],
    champion: Mapping[str, np.ndarray],
    groups: Sequence[object] | None = None,
    *,
    higher_is_better: bool = True,
    resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> PairedResult:
    """Resample groups once and score both models on every resample: the difference keeps
    what the items share (their difficulty) and leaves what the models do differently.

    The p-value is the share of resamples whose difference is at least twice the observed one
    (in the better direction): the resampled differences centred on the observed one stand
    for the null hypothesis of no difference (the paired bootstrap test of Berg-Kirkpatrick
    et al., 2012). Unlike the share of resamples where the candidate is not better, it does not
    call a win on two or three images all in one direction significant. 1.0 when the observed
    difference is not in the better direction.

    Args:
        metric: a selection metric `paired_metric_supported` accepts.
        y_true: true class indices of the shared items.
        candidate, champion: predicted class indices per condition ("clean", shift names),
            item for item aligned with y_true.
        groups: group id per item (None: every item alone).
        higher_is_better: False for a metric where lower is better.
    """
    y_true = np.asarray(y_true)
    missing = set(candidate) ^ set(champion)
    if missing:
        raise ValueError(f"conditions {sorted(missing)} are scored for only one of the models")
    codes = group_codes(groups, len(y_true))
    ones = np.ones((1, len(y_true)))
    observed = float(
        metric_resamples(metric, y_true, candidate, ones)[0]
        - metric_resamples(metric, y_true, champion, ones)[0]
    )
    weights = resample_weights(codes, resamples, seed)
    diff = metric_resamples(metric, y_true, candidate, weights) - metric_resamples(
        metric, y_true, champion, weights
    )
    better = observed > 0 if higher_is_better else observed < 0
    as_extreme = diff >= 2 * observed if higher_is_better else diff <= 2 * observed
    tail = (1.0 - confidence) / 2.0
    return PairedResult(
        metric=metric,
        difference=observed,
        low=float(np.quantile(diff, tail)),
        high=float(np.quantile(diff, 1.0 - tail)),
        p_value=float(np.mean(as_extreme)) if better else 1.0,
        resamples=resamples,
        confidence=confidence,
        groups=int(codes.max()) + 1 if len(codes) else 0,
    )


def paired_on_tables(
    metric: str,
    candidate: pd.DataFrame,
    champion: Callable[[], pd.DataFrame],
    *,
    higher_is_better: bool = True,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> PairedResult | str:
    """`paired_bootstrap` on two prediction tables (chestct.evaluation.scoring.prediction_table
    with
    `predicted_<shift>` columns; evaluate's predictions.csv also has `group`), matched by
    `path`; or why it cannot run.

    Args:
        candidate: the candidate's table (its rows, groups and true labels lead).
        champion: returns the champion's table; called only when the metric can be
            recomputed, since scoring the champion costs a pass over the test split.
    """
    shifts = [c.removeprefix("predicted_") for c in candidate if c.startswith("predicted_")]
    if not paired_metric_supported(metric, shifts):
        return f"{metric} is not recomputed from per-image predictions"
    theirs = champion()
    if "path" not in theirs or "path" not in candidate:
        return "the prediction tables have no path column"
    conditions = {"clean": "predicted", **{s: f"predicted_{s}" for s in shifts}}
    if missing := [c for c in conditions.values() if c not in theirs]:
        return f"the champion's predictions lack {', '.join(missing)}"
    theirs = theirs.set_index("path").reindex(candidate["path"])
    if theirs[list(conditions.values())].isna().any().any():
        return "the champion's predictions do not cover the candidate's test images"
    index = {c: i for i, c in enumerate(CLASSES)}

    def classes(frame: pd.DataFrame, column: str) -> np.ndarray:
        return np.asarray([index[str(v)] for v in frame[column]], np.int64)

    return paired_bootstrap(
        metric,
        classes(candidate, "actual"),
        {c: classes(candidate, col) for c, col in conditions.items()},
        {c: classes(theirs, col) for c, col in conditions.items()},
        list(candidate["group"]) if "group" in candidate else None,
        higher_is_better=higher_is_better,
        confidence=confidence,
        seed=seed,
    )
