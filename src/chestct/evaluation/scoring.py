"""Scoring a saved model on a split: as it is and under the shift-stress set.

The external test set, which evaluate alone scores, is in chestct.evaluation.external.

A library module, so that evaluate (the candidate) and promote (re-scoring the champion) measure
with the very same code and produce the same metric keys; stages never import each other.

Shift stress (perturb.SHIFTS): every image of a split is taken back to its ingested original,
perturbed there (before any preprocessing, as another scanner or export would have made it),
and prepared again through `imaging.prepare`, exactly as resize and serving prepare an upload,
with the model's own `imaging.preparation.Preprocessing` (params for the candidate, the card for
the champion).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from chestct.evaluation.metrics import (
    classification_metrics,
    expected_calibration_error,
    robust_macro_f1,
)
from chestct.fsutil import sha256_bytes
from chestct.imaging.decoding import decode
from chestct.imaging.perturb import SHIFT_NAMES, SHIFTS, STRESS_SEED, apply_shift
from chestct.imaging.preparation import Preprocessing, prepare, prepare_slice, resize
from chestct.labels import CLASSES
from chestct.model.calibration import nll, softmax
from chestct.model.families import FamilyError, batched_outputs, is_family_model, load_any
from chestct.model.texture import TextureError
from chestct.pointers import PointerError, read_pointer
from chestct.settings import ResizeParams, SettingsError, WindowParams, build

log = logging.getLogger(__name__)


class ScoringError(RuntimeError):
    """Images or a model that cannot be scored; the message names the file and the fix."""


def resize_preprocessing(paths: Any, image_size: int) -> Preprocessing:
    """The Preprocessing the resize stage really ran with (its pointer's params, ingest's
    window), so that shifted, external and champion-scored images are prepared exactly like the
    training images; `image_size` (params base.image_size) when the pointer records none.

    Raises:
        ScoringError: the recorded params are not valid (the message names the key).
    """
    ran = read_pointer(paths, "resize", verify=False).params
    try:
        ingest = read_pointer(paths, "ingest", verify=False).params.get("ingest", {})
    except PointerError:  # the window only matters for DICOM files of the external set
        ingest = {}
    # A resize run from before the crop and intensity settings made neither.
    resize = {"crop": "none", "intensity": "none", **ran.get("resize", {})}
    window = ingest.get("window")
    try:
        return Preprocessing.from_params(
            build(ResizeParams, resize, "resize"),
            int(ran.get("base", {}).get("image_size", image_size)),
            None if window is None else build(WindowParams, window, "ingest.window"),
        )
    except SettingsError as exc:
        raise ScoringError(f"the resize pointer's params: {exc}; rerun `dvc repro`") from None


# --------------------------------------------------------------------------- images and outputs


def load_images(
    frame: pd.DataFrame, root: Path, size: int, preprocessing: Preprocessing | None = None
) -> np.ndarray:
    """The images of a manifest as float32 (n, size, size, 1) in [0, 255].

    Images already at `size` are used as they are. Others (a champion trained at another
    base.image_size) are prepared again from the ingested original when the manifest names it,
    else stretched from the resized copy.
    """
    prep = (preprocessing or Preprocessing(size)).with_size(size)
    out = np.empty((len(frame), size, size, 1), np.float32)
    originals = frame["original"] if "original" in frame else pd.Series([None] * len(frame))
    for i, (rel, original) in enumerate(zip(frame["path"], originals, strict=True)):
        grey = cv2.imread(str(root / rel), cv2.IMREAD_GRAYSCALE)
        if grey is None:
            raise ScoringError(f"{root / rel}: cannot be read as an image; rerun `dvc repro`")
        if grey.shape != (size, size):
            if isinstance(original, str) and original and (root / original).is_file():
                grey = prepare((root / original).read_bytes(), prep)
            else:
                grey = resize(grey, size, prep.interpolation)
        out[i, :, :, 0] = grey
    return out


def original_slices(frame: pd.DataFrame, root: Path) -> tuple[list[np.ndarray], int]:
    """The decoded originals of a manifest's images (8-bit grey), and how many were missing.

    A row without a readable original (a manifest written by hand, a moved file) falls back to
    its resized copy: the shift is then applied after resizing, which is milder; the count says
    how often that happened.
    """
    slices, missing = [], 0
    originals = frame["original"] if "original" in frame else pd.Series([None] * len(frame))
    for rel, original in zip(frame["path"], originals, strict=True):
        if isinstance(original, str) and original and (root / original).is_file():
            slices.append(decode((root / original).read_bytes()).grey)
            continue
        grey = cv2.imread(str(root / rel), cv2.IMREAD_GRAYSCALE)
        if grey is None:
            raise ScoringError(f"{root / rel}: cannot be read as an image; rerun `dvc repro`")
        slices.append(grey)
        missing += 1
    return slices, missing


def output_heads(model: Any, names: Sequence[str]) -> Any:
    """A Keras model returning the named layers' outputs (contract: features, gap, logits,
    probabilities); build it once and predict with it many times (each new one retraces).
    A texture or ensemble model (chestct.model.families) answers the contract itself."""
    if is_family_model(model):
        return model
    import keras

    try:
        return keras.Model(model.inputs, [model.get_layer(n).output for n in names])
    except ValueError as exc:
        raise ScoringError(
            f"model {model.name!r} lacks a layer the evaluation reads ({exc}); the layers "
            f"{', '.join(names)} are part of the model contract (modeling.py)"
        ) from None


def model_outputs(
    model: Any, images: np.ndarray, batch_size: int, names: Sequence[str], heads: Any = None
) -> dict[str, np.ndarray]:
    """The named layers' outputs per image (`heads`: from output_heads(model, names), reused)."""
    if is_family_model(model):
        return batched_outputs(model, images, batch_size, names)
    heads = heads if heads is not None else output_heads(model, names)
    if len(images) == 0:
        return {n: np.zeros((0, *heads.get_layer(n).output.shape[1:]), np.float32) for n in names}
    outs = heads.predict(images, batch_size=batch_size, verbose=0)
    if len(names) == 1:
        outs = [outs]
    return {n: np.asarray(o, np.float32) for n, o in zip(names, outs, strict=True)}


def label_indices(labels: Sequence[str]) -> np.ndarray:
    """Class indices of label names (TensorFlow loads on first use, inside a stage's session)."""
    from chestct.model.modeling import label_indices as indices

    return indices(labels)


def load_model(path: Path) -> Any:
    """A trained model of any family (chestct.model.families.load_any)."""
    try:
        return load_any(path)
    except (FamilyError, TextureError) as exc:
        raise ScoringError(str(exc)) from None


def prediction_table(test: pd.DataFrame, proba: np.ndarray) -> pd.DataFrame:
    """One row per test image: path, actual, predicted, confidence and p_<class> columns."""
    y_pred = proba.argmax(axis=1)
    return pd.DataFrame(
        {
            "path": test["path"].to_numpy(),
            "source_path": test["source_path"].to_numpy(),
            "actual": test["label"].to_numpy(),
            "predicted": [CLASSES[i] for i in y_pred],
            "confidence": proba.max(axis=1),
            **{f"p_{c}": proba[:, i] for i, c in enumerate(CLASSES)},
        }
    )


# --------------------------------------------------------------------------- shift stress


def stress_set(frame: pd.DataFrame) -> dict[str, Any]:
    """Which shift-stress set a robust score is measured on: the conditions (each shift's name
    and description, which states its figures, and the stress seed) and the items scored (the
    sha256 of every image of `frame`), as one digest; the card records it, so that promote
    compares a candidate with a champion scored on the same set."""
    conditions = [[shift.name, shift.description] for shift in SHIFTS]
    items = sorted(str(k) for k in frame["sha256"])
    payload = {"conditions": conditions, "seed": STRESS_SEED, "items": items}
    return {
        "digest": sha256_bytes(json.dumps(payload, sort_keys=True).encode()),
        "shifts": list(SHIFT_NAMES),
        "items": len(items),
    }


def shift_predictions(shifted: Mapping[str, np.ndarray]) -> dict[str, list[str]]:
    """The predicted class per image under each shift, as `predicted_<shift>` columns of a
    prediction table: promote's paired test recomputes shift metrics from them."""
    return {
        f"predicted_{name}": [CLASSES[i] for i in np.asarray(z).argmax(axis=1)]
        for name, z in shifted.items()
    }


def shift_logits(
    model: Any,
    frame: pd.DataFrame,
    root: Path,
    batch_size: int,
    preprocessing: Preprocessing,
    shifts: Sequence[str] = SHIFT_NAMES,
) -> dict[str, np.ndarray]:
    """The model's logits on every image of `frame` under each shift, keyed by shift name."""
    prep = preprocessing.with_size(int(model.input_shape[1]))
    size = prep.size
    slices, missing = original_slices(frame, root)
    if missing:
        log.warning(
            "shift stress: %d of %d images have no ingested original; they are perturbed "
            "after resizing instead",
            missing,
            len(frame),
        )
    keys = [str(k) for k in frame["sha256"]]
    heads = output_heads(model, ["logits"])
    out = {}
    for name in shifts:
        images = np.empty((len(slices), size, size, 1), np.float32)
        for i, (grey, key) in enumerate(zip(slices, keys, strict=True)):
            images[i, :, :, 0] = prepare_slice(apply_shift(name, grey, key), prep).image
        out[name] = model_outputs(model, images, batch_size, ["logits"], heads)["logits"]
    return out


def shift_metrics(
    y_true: np.ndarray, logits: Mapping[str, np.ndarray], temperature: float
) -> dict[str, Any]:
    """Per shift: macro_f1, balanced_accuracy, accuracy, ece (raw) and ece_calibrated (the
    served probabilities); then the summary over shifts: worst_macro_f1 (and which shift),
    mean_macro_f1, worst_balanced_accuracy, and worst_ece / mean_ece of the served
    (calibrated) probabilities."""
    out: dict[str, Any] = {}
    for name, z in logits.items():
        m = classification_metrics(y_true, softmax(z))
        out[name] = {
            "macro_f1": m["macro_f1"],
            "balanced_accuracy": m["balanced_accuracy"],
            "accuracy": m["accuracy"],
            "ece": m["ece"],
            "ece_calibrated": expected_calibration_error(y_true, softmax(z, temperature)),
        }
    per = {n: v for n, v in out.items()}
    worst = min(per, key=lambda n: per[n]["macro_f1"])
    out.update(
        {
            "worst_macro_f1": per[worst]["macro_f1"],
            "worst_shift": worst,
            "mean_macro_f1": float(np.mean([v["macro_f1"] for v in per.values()])),
            "worst_balanced_accuracy": min(v["balanced_accuracy"] for v in per.values()),
            "worst_ece": max(v["ece_calibrated"] for v in per.values()),
            "mean_ece": float(np.mean([v["ece_calibrated"] for v in per.values()])),
        }
    )
    return out


def full_metrics(
    y_true: np.ndarray,
    logits: np.ndarray,
    temperature: float,
    shifted: Mapping[str, np.ndarray] | None,
) -> dict[str, Any]:
    """Every metric of one model on one split: classification metrics of the raw
    probabilities, calibrated ECE and NLL, and (with `shifted` logits) the shift block and
    robust_macro_f1. Evaluate and promote's champion re-scoring both write this shape."""
    proba = softmax(logits)
    calibrated = softmax(logits, temperature)
    metrics = classification_metrics(y_true, proba)
    metrics.update(
        {
            "ece_calibrated": expected_calibration_error(y_true, calibrated),
            "nll": nll(y_true, proba),
            "nll_calibrated": nll(y_true, calibrated),
        }
    )
    if shifted:
        metrics["shift"] = shift_metrics(y_true, shifted, temperature)
        metrics["robust_macro_f1"] = robust_macro_f1(
            metrics["macro_f1"], metrics["shift"]["worst_macro_f1"]
        )
    return metrics


def score(
    model_path: Path,
    test: pd.DataFrame,
    batch_size: int,
    root: Path,
    preprocessing: Preprocessing | None = None,
    *,
    temperature: float = 1.0,
    shifts: bool = True,
    model: Any = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """Metrics (full_metrics) and predictions (with `predicted_<shift>` columns) of a saved
    model on a split; promote re-scores the champion with this, with the champion's own
    preprocessing and temperature, through its served artefact (`model`: an opened
    chestct.inference.artefact.Artefact; without one, the file at `model_path` is loaded)."""
    model = model if model is not None else load_model(model_path)
    size = int(model.input_shape[1])
    prep = preprocessing or Preprocessing(size)
    images = load_images(test, root, size, prep)
    logits = model_outputs(model, images, batch_size, ["logits"])["logits"]
    shifted = shift_logits(model, test, root, batch_size, prep) if shifts else None
    y_true = label_indices(list(test["label"]))
    metrics = full_metrics(y_true, logits, temperature, shifted)
    table = prediction_table(test, softmax(logits))
    for column, values in shift_predictions(shifted or {}).items():
        table[column] = values
    return metrics, table
