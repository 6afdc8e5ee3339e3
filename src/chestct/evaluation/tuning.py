"""Choosing on the valid split while training: what train fits besides the CNN's weights.

The texture model is fitted on the train split with its boosting iterations and temperature
chosen on valid (chestct.model.texture), and reported with its valid figures; an ensemble's CNN
gets its temperature from valid, so that the ensemble averages calibrated probabilities. Both
read the split's images through chestct.evaluation.scoring, as evaluate does.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from chestct.data.similarity import series_groups, thumbnails
from chestct.evaluation.metrics import classification_metrics
from chestct.evaluation.scoring import load_images, model_outputs
from chestct.model.calibration import fit_temperature, nll, softmax
from chestct.model.modeling import label_indices
from chestct.model.texture import (
    ClassifierSpec,
    TextureModel,
    feature_matrix,
    fit_texture_features,
)
from chestct.model.texture_fit import FeatureSplits
from chestct.settings import TextureParams

log = logging.getLogger(__name__)


def texture_spec(params: TextureParams | dict[str, Any]) -> ClassifierSpec:
    """The classifier settings from params base_model.texture (or family.json's copy)."""
    values = params if isinstance(params, dict) else dataclasses.asdict(params)
    return ClassifierSpec(**values)


def fit_texture_on(
    train: pd.DataFrame,
    valid: pd.DataFrame,
    spec: ClassifierSpec,
    seed: int,
    root: Path,
    image_size: int,
    series_similarity: float,
    history: list[dict[str, float]] | None = None,
) -> tuple[TextureModel, dict[str, float]]:
    """Fit the texture model on the resized train slices (chestct.model.texture.fit_texture):
    iterations and temperature chosen on valid. Returns it with its valid-split figures; with
    `history`, its training curve (a row per boosting iteration) is appended there. With
    `spec.calibration_folds`, the cross-fitting folds keep whole series: slices whose
    thumbnails correlate at `series_similarity` or more (base.near_copy_similarity) are
    linked. Raises TextureError on a split it cannot be fitted on."""
    train_images = load_images(train, root, image_size)
    valid_images = load_images(valid, root, image_size)
    y_train = label_indices(list(train["label"]))
    y_valid = label_indices(list(valid["label"]))
    log.info("texture features of %d + %d slices", len(train_images), len(valid_images))
    x_train = feature_matrix(train_images)
    x_valid = feature_matrix(valid_images)
    curve: list[dict[str, float]] = []
    groups = None
    if spec.refit and spec.calibration_folds:
        both = np.concatenate([train_images, valid_images])[..., 0].astype(np.uint8)
        groups = np.asarray(series_groups(thumbnails(both), series_similarity))
    data = FeatureSplits(x_train, y_train, x_valid, y_valid, groups)
    model = fit_texture_features(data, spec, seed, image_size, curve)
    # A refit model has seen valid: its figures are those of the boosters before the refit.
    held_out = model.details.get("held_out_valid_logits")
    proba = softmax(np.asarray(held_out) if held_out else model.logits(x_valid))
    m = classification_metrics(y_valid, proba)
    figures = {
        "val_loss": nll(y_valid, proba),
        "val_accuracy": m["accuracy"],
        "val_macro_f1": m["macro_f1"],
        "iterations": model.details["iterations"],
        "temperature": model.temperature,
    }
    if history is not None:
        history.extend(curve)
    log.info(
        "texture model: %d iterations (of %d), temperature %.3f; valid accuracy %.4f, "
        "macro-F1 %.4f",
        figures["iterations"],
        spec.max_iter,
        model.temperature,
        figures["val_accuracy"],
        figures["val_macro_f1"],
    )
    return model, figures


def cnn_temperature(model: keras.Model, valid: pd.DataFrame, root: Path) -> float:
    """The CNN's temperature on the valid split (calibration.fit_temperature), so that an
    ensemble averages calibrated probabilities."""
    images = load_images(valid, root, int(model.input_shape[1]))
    logits = model_outputs(model, images, 64, ["logits"])["logits"]
    return float(fit_temperature(label_indices(list(valid["label"])), logits).temperature)
