"""chestct.evaluation.metrics: clinical metrics, calibration, abstention and OOD scores on
hand-made data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import fbeta_score

from chestct.evaluation.metrics import (
    classification_metrics,
    expected_calibration_error,
    reliability,
    roc_curves,
)
from chestct.labels import CLASSES
from chestct.model.calibration import (
    Mahalanobis,
    abstain_threshold,
    fit_temperature,
    nll,
    normalised_entropy,
    softmax,
)

K = len(CLASSES)


def one_hot_proba(pred: list[int], confidence: float = 0.7) -> np.ndarray:
    """Probabilities that put `confidence` on the predicted class and share the rest."""
    proba = np.full((len(pred), K), (1 - confidence) / (K - 1))
    proba[np.arange(len(pred)), pred] = confidence
    return proba


def test_per_class_metrics_match_a_hand_count() -> None:
    # class 0: 3 images, 2 found; class 1: 2 images, both found, plus 1 false alarm (a class-0)
    y_true = np.array([0, 0, 0, 1, 1, 2, 3])
    y_pred = [0, 0, 1, 1, 1, 2, 3]
    m = classification_metrics(y_true, one_hot_proba(y_pred))

    a, b = CLASSES[0], CLASSES[1]
    assert m["sensitivity"][a] == pytest.approx(2 / 3)
    assert m["sensitivity"][b] == 1.0
    assert m["precision"][b] == pytest.approx(2 / 3)
    assert m["specificity"][a] == 1.0  # no other class was called class 0
    assert m["specificity"][b] == pytest.approx(4 / 5)  # 5 negatives, one false alarm
    assert m["accuracy"] == pytest.approx(6 / 7)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 1 + 1) / 4)
    assert m["macro_f2"] == pytest.approx(fbeta_score(y_true, y_pred, beta=2, average="macro"))
    assert m["macro_f1"] == pytest.approx(fbeta_score(y_true, y_pred, beta=1, average="macro"))
    assert m["n"] == 7


def test_roc_auc_is_one_for_a_perfect_ranking_and_none_for_an_absent_class() -> None:
    y_true = np.array([0, 0, 1, 1, 2, 2])
    proba = one_hot_proba([0, 0, 1, 1, 2, 2], confidence=0.9)
    m = classification_metrics(y_true, proba)
    assert m["roc_auc_per_class"][CLASSES[0]] == 1.0
    assert m["roc_auc_per_class"][CLASSES[3]] is None  # no image of the last class
    assert m["roc_auc"] == 1.0  # the macro mean skips the absent class

    fpr, curves = roc_curves(y_true, proba)
    assert set(curves) == set(CLASSES[:3])
    assert fpr[0] == 0.0 and fpr[-1] == 1.0
    assert all(np.all(np.diff(tpr) >= 0) for tpr in curves.values())


def test_metrics_refuse_a_shape_mismatch_and_an_empty_split() -> None:
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(np.array([0, 1]), np.ones((3, K)) / K)
    with pytest.raises(ValueError, match="empty"):
        classification_metrics(np.array([], int), np.zeros((0, K)))


def test_ece_is_zero_when_confidence_equals_accuracy() -> None:
    # 10 images at confidence 0.7, exactly 7 of them right.
    y_true = np.array([0] * 7 + [1] * 3)
    proba = one_hot_proba([0] * 10, confidence=0.7)
    assert expected_calibration_error(y_true, proba) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_an_overconfident_model() -> None:
    # confidence 0.95 on every image but only half right: ECE = |0.5 - 0.95|.
    y_true = np.array([0, 1] * 5)
    proba = one_hot_proba([0] * 10, confidence=0.95)
    assert expected_calibration_error(y_true, proba) == pytest.approx(0.45)
    bins = reliability(y_true, proba)
    assert len(bins) == 15
    assert sum(b.count for b in bins) == 10
    (full,) = [b for b in bins if b.count]
    assert full.lower < 0.95 <= full.upper


def test_temperature_recovers_the_temperature_that_made_the_labels() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, K))
    true_t = 2.5  # labels drawn from softmax(logits / 2.5): the logits are overconfident
    p = softmax(logits, true_t)
    y = np.array([rng.choice(K, p=row) for row in p])

    fit = fit_temperature(y, logits)
    assert fit.fitted, fit.reason
    assert fit.temperature == pytest.approx(true_t, rel=0.1)
    assert fit.nll_after < fit.nll_before
    assert expected_calibration_error(y, softmax(logits, fit.temperature)) < (
        expected_calibration_error(y, softmax(logits))
    )
    # Scaling never changes the predicted class.
    assert np.array_equal(softmax(logits, fit.temperature).argmax(1), logits.argmax(1))


@pytest.mark.parametrize(
    ("y", "logits", "why"),
    [
        (np.array([0]), np.zeros((1, K)), "fewer than two"),
        (np.array([1, 1, 1]), np.zeros((3, K)), "fewer than two"),
        (np.array([0, 1]), np.array([[np.nan, 0, 0, 0], [0, 1, 0, 0]]), "not all finite"),
        # perfectly separated with a margin: the NLL keeps falling as T -> 0
        (np.array([0, 1, 0, 1]), np.array([[5.0, 0, 0, 0], [0, 5.0, 0, 0]] * 2), "separable"),
    ],
)
def test_temperature_falls_back_to_one_and_says_why(y, logits, why: str) -> None:
    fit = fit_temperature(y, logits)
    assert not fit.fitted
    assert fit.temperature == 1.0
    assert why in fit.reason


def test_nll_and_entropy() -> None:
    assert nll(np.array([0]), np.array([[1.0, 0, 0, 0]])) == pytest.approx(0.0)
    entropy = normalised_entropy(np.array([[1.0, 0, 0, 0], [0.25] * 4]))
    assert entropy == pytest.approx([0.0, 1.0], abs=1e-9)


def test_abstain_threshold_is_a_quantile_over_correct_predictions() -> None:
    y = np.array([0, 0, 0, 0, 1])
    # four correct predictions of rising uncertainty, one confident mistake
    proba = np.array(
        [
            [0.97, 0.01, 0.01, 0.01],
            [0.85, 0.05, 0.05, 0.05],
            [0.7, 0.1, 0.1, 0.1],
            [0.4, 0.2, 0.2, 0.2],
            [0.99, 0.0, 0.01, 0.0],
        ]
    )
    entropy = normalised_entropy(proba[:4])
    assert abstain_threshold(y, proba, 1.0) == pytest.approx(entropy.max())
    assert abstain_threshold(y, proba, 0.5) == pytest.approx(np.quantile(entropy, 0.5))
    nothing_right = np.array([[0.0, 1.0, 0, 0]] * 5)
    assert abstain_threshold(y[:4], nothing_right[:4], 0.95) == 1.0


def test_mahalanobis_scores_far_points_higher_and_copes_with_few_images() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(0, 1, (30, 64))  # fewer images than features: shrinkage needed
    ood = Mahalanobis.fit(train)
    near = ood.distance(rng.normal(0, 1, (20, 64)))
    far = ood.distance(rng.normal(6, 1, (20, 64)))
    assert np.isfinite(near).all() and far.min() > near.max()
    assert ood.distance(ood.mean[None, :]) == pytest.approx([0.0], abs=1e-9)
    with pytest.raises(ValueError, match="two feature vectors"):
        Mahalanobis.fit(train[:1])


def test_balanced_accuracy_matches_sklearn_without_its_warning() -> None:
    """A split that lacks a class the model predicts: the same figure as sklearn's
    balanced_accuracy_score, and no "y_pred contains classes not in y_true" warning on the
    terminal (before: one per scoring, from evaluate's splits and shifts)."""
    import warnings

    from sklearn.metrics import balanced_accuracy_score

    from chestct.evaluation.metrics import classification_metrics

    y_true = np.array([0, 0, 1, 1, 0, 1])
    proba = np.eye(4)[[0, 2, 1, 1, 3, 1]] * 0.9 + 0.025
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scored = classification_metrics(y_true, proba)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = balanced_accuracy_score(y_true, proba.argmax(axis=1))
    assert scored["balanced_accuracy"] == pytest.approx(expected)
    full = np.arange(8) % 4
    assert classification_metrics(full, np.eye(4)[full])["balanced_accuracy"] == 1.0
