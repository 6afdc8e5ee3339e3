"""Fitting the texture family: scikit-learn's HistGradientBoostingClassifier on the texture
features (chestct.model.texture_features), chosen and calibrated on the valid split.

- The number of boosting iterations is the one with the lowest log-loss on the valid split
  (early stopping on valid; the trees after it are dropped, `truncate`).
- `bag` boosters (seeds seed, seed + 1, ...) are fitted that way and their probabilities
  averaged: each draws other features per split (`max_features`), so the average is smoother.
- One temperature on the log-probabilities of that average is fitted on valid with
  `chestct.model.calibration.fit_temperature`, the function that calibrates the CNN.
- With `refit`, each booster is then fitted again on train + valid with the number of
  iterations valid chose for it: more slices for the trees once nothing is left to choose.
  It keeps the temperature valid fitted before the refit, or, with `calibration_folds` K,
  one fitted on cross-fitted logits: train + valid cut into K folds by series (`groups`:
  near-copies share a fold), each fold scored by boosters of the same seeds and iterations
  fitted on the other folds (`crossfit_logits`). No slice is then scored by a booster that
  saw it. The test split is never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from chestct.labels import CLASSES
from chestct.model.calibration import fit_temperature
from chestct.model.texture_features import feature_count, feature_matrix
from chestct.model.texture_model import TextureError, TextureModel, log_probabilities


@dataclass(frozen=True)
class ClassifierSpec:
    """HistGradientBoostingClassifier settings (params base_model.texture)."""

    max_iter: int = 300
    learning_rate: float = 0.05
    max_features: float = 0.5
    max_leaf_nodes: int = 31
    l2_regularization: float = 0.0
    class_weight: str = "balanced"  # balanced | none
    threads: int = 1
    bag: int = 1  # boosters with seeds seed, seed + 1, ...: probabilities averaged
    refit: bool = False  # fit again on train + valid once valid has chosen and calibrated
    calibration_folds: int = 0  # with refit, K >= 2: the temperature from K-fold cross-fitting


@contextlib.contextmanager
def limited_threads(threads: int) -> Iterator[None]:
    """OpenMP and BLAS pools held to `threads`: the trees' default (every core, spinning)
    crawls on a shared machine."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=max(1, int(threads))):
        yield


def _classifier(spec: ClassifierSpec, seed: int, max_iter: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_iter=max_iter,
        learning_rate=spec.learning_rate,
        max_features=spec.max_features,
        max_leaf_nodes=spec.max_leaf_nodes,
        l2_regularization=spec.l2_regularization,
        class_weight="balanced" if spec.class_weight == "balanced" else None,
        early_stopping=False,  # the valid split chooses the iterations (fit_texture)
        random_state=seed,
    )


def fit_texture(
    train_images: np.ndarray,
    y_train: np.ndarray,
    valid_images: np.ndarray,
    y_valid: np.ndarray,
    spec: ClassifierSpec,
    seed: int,
) -> TextureModel:
    """Fit on the train split, iterations chosen and temperature fitted on valid (the module
    docstring says how; `fit_texture_features` on the slices' features)."""
    x_train, x_valid = feature_matrix(train_images), feature_matrix(valid_images)
    data = FeatureSplits(x_train, y_train, x_valid, y_valid)
    return fit_texture_features(data, spec, seed, int(train_images.shape[1]))


@dataclass(frozen=True)
class FeatureSplits:
    """The train and valid splits as feature matrices with their labels: what the boosters
    learn from, are cut on and (with refit) learn from again. The test split is not here."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_valid: np.ndarray
    y_valid: np.ndarray
    # A series id per train + valid row (train's first) for the cross-fitting folds; None:
    # every slice is its own series.
    groups: np.ndarray | None = None


def fit_texture_features(
    data: FeatureSplits,
    spec: ClassifierSpec,
    seed: int,
    image_size: int,
    curve: list[dict[str, float]] | None = None,
) -> TextureModel:
    """`fit_texture` on precomputed feature matrices. With `curve`, one row per boosting
    iteration of the first booster is appended to it (epoch, loss, val_loss, val_accuracy,
    val_macro_f1), the texture family's training curve."""
    x_train, y_train, x_valid, y_valid = data.x_train, data.y_train, data.x_valid, data.y_valid
    if len(np.unique(y_train)) < 2:
        raise TextureError("the texture model needs at least two classes in the train split")
    if spec.bag < 1:
        raise TextureError(f"base_model.texture.bag must be >= 1, got {spec.bag}")
    _check_folds(spec)
    boosters, chosen = [], []
    with limited_threads(spec.threads):
        for member in range(spec.bag):
            booster, losses = _fit_chosen(data, spec, seed + member, curve, member == 0)
            boosters.append(booster)
            chosen.append((booster.n_iter_, losses[booster.n_iter_ - 1]))
    mean = x_train.mean(axis=0).astype(np.float64)
    scale = x_train.std(axis=0).astype(np.float64)
    scale[scale < 1e-6] = 1.0
    texture = TextureModel(
        classifiers=boosters, temperature=1.0, mean=mean, scale=scale, image_size=image_size
    )
    fit = fit_temperature(y_valid, log_probabilities(texture.full_probabilities(x_valid)))
    texture.temperature = float(fit.temperature)
    # The valid split's calibrated logits while it is still held out: after a refit they are
    # what evaluate sets the abstain threshold on (families.held_out_valid_logits).
    held_out = texture.logits(x_valid)
    calibrated_on = "valid"
    if spec.refit:
        texture.classifiers = refit(data, spec, seed, boosters)
        texture.__dict__.pop("_trees", None)
    if spec.refit and spec.calibration_folds:
        with limited_threads(spec.threads):
            oof = crossfit_logits(data, spec, seed, [b.n_iter_ for b in boosters])
        fit = fit_temperature(np.concatenate([y_train, y_valid]), oof)
        texture.temperature = float(fit.temperature)
        held_out = oof[len(x_train) :] / texture.temperature
        calibrated_on = f"{spec.calibration_folds}-fold cross-fitting on train+valid"
    texture.details = {
        "iterations": round(float(np.mean([n for n, _ in chosen]))),
        "iterations_per_booster": [int(n) for n, _ in chosen],
        "valid_log_loss": float(np.mean([loss for _, loss in chosen])),
        "threads": spec.threads,
        "temperature": texture.temperature,
        "temperature_fitted": fit.fitted,
        "temperature_fitted_on": calibrated_on,
        "refit_on": "train+valid" if spec.refit else "",
        "held_out_valid_logits": np.round(held_out, 6).tolist() if spec.refit else [],
        "train_slices": len(x_train) + (len(x_valid) if spec.refit else 0),
        "spec": asdict(spec),
        "features": feature_count(),
    }
    return texture


def _fit_chosen(
    data: FeatureSplits,
    spec: ClassifierSpec,
    seed: int,
    curve: list[dict[str, float]] | None,
    record: bool,
) -> tuple[Any, list[float]]:
    """One booster fitted on train and cut at the iteration with the lowest valid log-loss;
    with `record`, its curve appended to `curve`. Returns it and the valid losses."""
    x_train, y_train, x_valid, y_valid = data.x_train, data.y_train, data.x_valid, data.y_valid
    booster = _classifier(spec, seed, spec.max_iter).fit(x_train, y_train)
    losses = [
        _log_loss(y_valid, proba, booster.classes_)
        for proba in booster.staged_predict_proba(x_valid)
    ]
    if record and curve is not None:
        train_losses = [
            _log_loss(y_train, proba, booster.classes_)
            for proba in booster.staged_predict_proba(x_train)
        ]
        for i, proba in enumerate(booster.staged_predict_proba(x_valid)):
            predicted = booster.classes_[np.argmax(proba, axis=1)]
            figures = classification_metrics_of(y_valid, predicted)
            curve.append(
                {"epoch": i + 1, "loss": train_losses[i], "val_loss": losses[i], **figures}
            )
    truncate(booster, int(np.argmin(losses)) + 1)
    return booster, losses


def refit(data: FeatureSplits, spec: ClassifierSpec, seed: int, chosen: list[Any]) -> list[Any]:
    """Each chosen booster fitted again, with its seed and number of iterations, on the train
    and valid slices together (the test split is not an argument: it stays unseen)."""
    x = np.concatenate([data.x_train, data.x_valid])
    y = np.concatenate([data.y_train, data.y_valid])
    with limited_threads(spec.threads):
        return [
            _classifier(spec, seed + member, booster.n_iter_).fit(x, y)
            for member, booster in enumerate(chosen)
        ]


def _check_folds(spec: ClassifierSpec) -> None:
    """calibration_folds is 0 (off) or at least 2, and only means something with refit."""
    folds = spec.calibration_folds
    if folds == 0:
        return
    if folds < 2:
        raise TextureError(f"base_model.texture.calibration_folds must be 0 or >= 2, got {folds}")
    if not spec.refit:
        raise TextureError(
            "base_model.texture.calibration_folds needs refit: true (without a refit the valid "
            "split is still held out and calibrates); set calibration_folds: 0 or refit: true"
        )


def crossfit_logits(
    data: FeatureSplits, spec: ClassifierSpec, seed: int, iterations: list[int]
) -> np.ndarray:
    """Out-of-fold log-probabilities (uncalibrated) of every train + valid row (train's first):
    `spec.calibration_folds` folds stratified by class with whole series (`data.groups`) in
    one fold; each fold scored by the bag's boosters (seeds seed + member, `iterations[member]`
    iterations) fitted on the other folds, their probabilities averaged."""
    from sklearn.model_selection import StratifiedGroupKFold

    x = np.concatenate([data.x_train, data.x_valid])
    y = np.concatenate([data.y_train, data.y_valid])
    groups = np.arange(len(y)) if data.groups is None else np.asarray(data.groups)
    if len(groups) != len(y):
        raise TextureError(f"{len(groups)} series ids for {len(y)} train + valid slices")
    folds = min(spec.calibration_folds, len(np.unique(groups)))
    if folds < 2:
        raise TextureError("cross-fitting needs at least two series in train + valid")
    n_classes = len(CLASSES)  # the columns of TextureModel.full_probabilities
    out = np.zeros((len(y), n_classes))
    cutter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    for fit_rows, scored in cutter.split(x, y, groups):
        members = []
        for member, n in enumerate(iterations):
            booster = _classifier(spec, seed + member, n).fit(x[fit_rows], y[fit_rows])
            proba = np.zeros((len(scored), n_classes))
            proba[:, booster.classes_.astype(int)] = booster.predict_proba(x[scored])
            members.append(proba)
        out[scored] = log_probabilities(np.mean(members, axis=0))
    return out


def _log_loss(y: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    """Mean negative log-probability of the true class (classes absent from the fit: 1e-7)."""
    p = np.full(len(y), 1e-7)
    for j, k in enumerate(classes):
        p = np.where(y == k, np.clip(proba[:, j], 1e-7, 1.0), p)
    return float(-np.mean(np.log(p)))


def classification_metrics_of(y: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Validation accuracy and macro-F1 (over the classes present in `y`) of hard labels."""
    from sklearn.metrics import f1_score

    return {
        "val_accuracy": float(np.mean(predicted == y)),
        "val_macro_f1": float(f1_score(y, predicted, average="macro", labels=np.unique(y))),
    }


def truncate(classifier: Any, iterations: int) -> None:
    """Keep the first `iterations` boosting iterations of a fitted HistGradientBoosting model:
    exactly the model `staged_predict_proba` scored at that stage (its trees are a prefix),
    without fitting again. Reaches into the estimator's `_predictors` list (scikit-learn is
    pinned; tests/unit/test_texture.py checks the equality)."""
    if not 1 <= iterations <= classifier.n_iter_:
        raise ValueError(f"cannot keep {iterations} of {classifier.n_iter_} iterations")
    classifier._predictors = classifier._predictors[:iterations]  # n_iter_ is its length
    classifier.max_iter = iterations
