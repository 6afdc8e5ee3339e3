"""Assessment: a trained candidate scored as it will be served, and what evaluate reports.

The candidate is exported as promote exports it (chestct.evaluation.release) and opened as the
service opens it (chestct.inference.artefact): its logits on the test split, clean and under
the shift stress, calibrated on the valid split (`fit_calibration`); the memorizer and the
novel part (chestct.evaluation.novelty), the OOD statistics, the monitoring reference of the
valid and test splits (chestct.monitoring.signals), where the model looks (lung attention) and
the external set when params name one. The evaluate stage (chestct.stages.evaluate) writes the
`Evaluation` this returns and logs it to MLflow.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chestct.evaluation.attention import LungAttention, lung_attention
from chestct.evaluation.external import run_external
from chestct.evaluation.metrics import reliability
from chestct.evaluation.novelty import (
    TrainReference,
    assess,
    describe,
    frame_thumbnails,
    item_groups,
)
from chestct.evaluation.outputs import Evaluation
from chestct.evaluation.release import release_for
from chestct.evaluation.scoring import (
    ScoringError,
    full_metrics,
    label_indices,
    load_images,
    load_model,
    model_outputs,
    original_slices,
    prediction_table,
    shift_logits,
    shift_predictions,
)
from chestct.imaging.preparation import Preprocessing, prepare_slice
from chestct.inference.artefact import Artefact, open_artefact
from chestct.labels import CLASSES
from chestct.model.calibration import (
    Mahalanobis,
    TemperatureFit,
    abstain_threshold,
    abstains,
    fit_temperature,
    normalised_entropy,
    out_of_distribution,
    softmax,
)
from chestct.model.export import ExportError
from chestct.model.families import FamilyError, family_of, held_out_valid_logits, kept_calibration
from chestct.model.texture import occlusion_map
from chestct.monitoring.signals import decoded_greys, fit_reference
from chestct.settings import EvaluateParams

log = logging.getLogger(__name__)


class AssessmentError(RuntimeError):
    """The candidate cannot be assessed: the message names the problem and the fix."""


def fit_calibration(
    y_valid: np.ndarray,
    valid_logits: np.ndarray,
    shifted_valid: dict[str, np.ndarray],
    calibrate_on: str,
) -> tuple[TemperatureFit, str]:
    """The temperature fit (metrics.fit_temperature) on the data params `evaluate.calibrate_on`
    names, and a sentence saying what it was fitted on.

    `valid_and_shifted` fits one temperature on the valid split together with its copies under
    every shift of the stress set: the served probabilities then stay calibrated when the
    acquisition changes (a temperature fitted on clean valid alone is typically too low for
    shifted images, where the model is wrong more often at the same confidence).
    """
    if calibrate_on == "valid":
        fit, fitted_on = fit_temperature(y_valid, valid_logits), "the validation split"
    else:
        logits = np.concatenate([valid_logits, *shifted_valid.values()])
        y = np.concatenate([y_valid] * (1 + len(shifted_valid)))
        fit = fit_temperature(y, logits)
        fitted_on = f"the validation split and its {len(shifted_valid)} shifted copies"
    if fit.fitted:
        log.info(
            "temperature %.4f fitted on %s (NLL %.4f -> %.4f)",
            fit.temperature,
            fitted_on,
            fit.nll_before,
            fit.nll_after,
        )
    else:
        log.warning("temperature left at 1.0: %s", fit.reason)
    return fit, fitted_on


def served_artefact(model_path: Path, root: Path, batch_size: int, work_dir: Path) -> Artefact:
    """The candidate exported as promote exports it (chestct.evaluation.release) and opened as
    the service opens it (chestct.inference.artefact.open_artefact): what evaluate scores. Parity
    with
    the trained model is not checked here: the metrics are the exported files' own, and promote
    rejects an export that answers otherwise than the trained model."""
    try:
        size = int(load_model(model_path).input_shape[1])
        release = release_for(model_path, None, root, batch_size, work_dir)
    except (ExportError, FamilyError, ScoringError) as exc:
        raise AssessmentError(
            f"{model_path.name} cannot be exported as it would be served: {exc}"
        ) from None
    return open_artefact(release.inference, release.files, release.card, size)


def evaluate_candidate(
    model_path: Path,
    splits: dict[str, pd.DataFrame],
    params: EvaluateParams,
    root: Path,
    preprocessing: Preprocessing | None = None,
    class_map: dict[str, str] | None = None,
    near_copy_similarity: float = 0.9,
    seed: int = 0,
) -> Evaluation:
    """Export the trained model as it would be served, then score the exported artefact on the
    test split, clean and under the shift-stress set; fit temperature, abstention and OOD
    thresholds on valid/train; score the external set when params name one.

    Args:
        model_path: the trained model (model.keras, texture.skops or ensemble.json).
        splits: DATASET_COLUMNS frames for "train", "valid" and "test".
        params: the evaluate params.
        root: the folder the manifests' paths are relative to.
        preprocessing: how resize prepared the images (for shifted and external images, and
            images not at the model's size).
        class_map: params `ingest.class_map`, for the external set's folder names.
        near_copy_similarity: params `base.near_copy_similarity` (chestct.evaluation.novelty).
        seed: params `base.seed`, for the bootstrap.
    """
    missing = {"train", "valid", "test"} - set(splits)
    if missing:
        raise AssessmentError(
            f"evaluate needs the splits train, valid and test; missing {missing}"
        )
    if splits["test"].empty or splits["valid"].empty:
        raise AssessmentError("the test or valid split is empty; check the split stage's output")
    # The exported files live as long as the artefact runs: the interpreter maps its file.
    with tempfile.TemporaryDirectory(prefix="chestct-evaluate-") as work:
        model = served_artefact(model_path, root, params.batch_size, Path(work))
        size = int(model.input_shape[1])
        prep = (preprocessing or Preprocessing(size)).with_size(size)
        return evaluate_artefact(
            model, family_of(model_path), splits, params, root, prep, class_map,
            near_copy_similarity, seed,
        )  # fmt: skip


def evaluate_artefact(
    model: Artefact,
    family: str,
    splits: dict[str, pd.DataFrame],
    params: EvaluateParams,
    root: Path,
    prep: Preprocessing,
    class_map: dict[str, str] | None,
    near_copy_similarity: float,
    seed: int,
) -> Evaluation:
    """run_evaluate's work on the opened artefact (its arguments, `family` the model's)."""
    scored = score_splits(model, splits, params, root, prep)
    test, valid = scored.test, scored.valid
    y_test = label_indices(list(splits["test"]["label"]))
    y_valid = label_indices(list(splits["valid"]["label"]))
    kept = kept_calibration(model)  # a texture model refit on train + valid has seen valid
    fit, fitted_on = (
        (TemperatureFit(1.0, False, kept, None, None), "")
        if kept
        else fit_calibration(y_valid, valid["logits"], scored.shifted_valid, params.calibrate_on)
    )
    t = fit.temperature
    calibrated_test = softmax(test["logits"], t)
    held_out = held_out_valid_logits(model, len(y_valid))  # a refit texture model's, pre-refit
    calibrated_valid = softmax(valid["logits"] if held_out is None else held_out, t)
    abstain = abstain_threshold(y_valid, calibrated_valid, params.abstain_quantile)
    ood = Mahalanobis.fit(scored.train_gap)
    ood_threshold = float(np.quantile(ood.distance(valid["gap"]), params.ood_quantile))
    test_distance = ood.distance(test["gap"])
    reference = monitoring_reference(
        splits, root, prep, scored, np.concatenate([calibrated_valid, calibrated_test]), ood,
        ood_threshold, abstain,
    )  # fmt: skip
    metrics = full_metrics(y_test, test["logits"], t, scored.shifted_test)
    metrics.update(
        {
            "temperature": t,
            "abstain_rate": float(np.mean(abstains(normalised_entropy(calibrated_test), abstain))),
            "ood_rate": float(np.mean(out_of_distribution(test_distance, ood_threshold))),
        }
    )
    calibration = calibration_record(fit, fitted_on, params, abstain, ood_threshold, family)
    predictions = prediction_table(splits["test"], softmax(test["logits"]))
    predictions["entropy_calibrated"] = normalised_entropy(calibrated_test)
    predictions["ood_distance"] = test_distance
    for column, values in shift_predictions(scored.shifted_test).items():
        predictions[column] = values
    reference_set = TrainReference.from_frame(splits["train"], root, near_copy_similarity)
    novelty = test_novelty(
        reference_set, splits["test"], root, y_test, test["logits"], t, params,
        near_copy_similarity, seed,
    )  # fmt: skip
    metrics.update(novelty.metrics)
    for column, values in novelty.columns.items():
        predictions[column] = values
    external, external_predictions = run_external(
        model, params, root, prep, t, class_map, reference_set, seed
    )
    explainer = model.texture if model.family == "texture" else None
    attention = where_it_looks(model, explainer, splits["test"], root, prep, scored)
    metrics["attention"] = attention.summary(list(splits["test"]["label"]))
    return Evaluation(
        metrics=metrics,
        predictions=predictions,
        calibration=calibration,
        ood=ood,
        reliability_before=reliability(y_test, softmax(test["logits"])),
        reliability_after=reliability(y_test, calibrated_test),
        images=scored.test_images,
        features=test["features"],
        cam_head=model.head if explainer is None else None,
        reference=reference,
        external=external,
        external_predictions=external_predictions,
        attention=attention,
        family=family,
        explainer=explainer,
    )


def test_novelty(
    reference: TrainReference,
    test: pd.DataFrame,
    root: Path,
    y_test: np.ndarray,
    logits: np.ndarray,
    temperature: float,
    params: EvaluateParams,
    near_copy_similarity: float,
    seed: int,
) -> Any:
    """The memorizer, the near-copy and novel parts and the group bootstrap of the test split
    (chestct.evaluation.novelty.assess)."""
    thumbs = frame_thumbnails(test, root)
    novelty = assess(
        reference,
        thumbs,
        y_test,
        softmax(logits),
        softmax(logits, temperature),
        item_groups(test, thumbs, near_copy_similarity),
        resamples=params.bootstrap_resamples,
        confidence=params.confidence,
        seed=seed,
    )
    log.info("test: %s", describe(novelty.metrics))
    return novelty


@dataclass(frozen=True)
class Scored:
    """The served artefact's outputs on the splits (chestct.inference.analysis.served_logits)."""

    test: dict[str, np.ndarray]  # logits, probabilities, gap, features
    valid: dict[str, np.ndarray]  # logits, gap
    train_gap: np.ndarray
    shifted_test: dict[str, np.ndarray]  # logits per shift
    shifted_valid: dict[str, np.ndarray]  # logits per shift (evaluate.calibrate_on)
    test_images: np.ndarray
    valid_images: np.ndarray


def score_splits(
    model: Artefact,
    splits: dict[str, pd.DataFrame],
    params: EvaluateParams,
    root: Path,
    prep: Preprocessing,
) -> Scored:
    """Run the artefact on the test, valid and train splits and on the shifted test (and,
    for `valid_and_shifted` calibration, valid) images."""
    size = model.image_size
    names = ["logits", "probabilities", "gap", "features"]
    test_images = load_images(splits["test"], root, size, prep)
    valid_images = load_images(splits["valid"], root, size, prep)
    train_images = load_images(splits["train"], root, size, prep)
    if len(train_images) < 2:
        raise AssessmentError(
            f"the train split has {len(train_images)} image(s); the out-of-distribution "
            "statistics need at least two: check the split stage's output"
        )
    batch = params.batch_size
    return Scored(
        test=model_outputs(model, test_images, batch, names),
        valid=model_outputs(model, valid_images, batch, ["logits", "gap"]),
        train_gap=model_outputs(model, train_images, batch, ["gap"])["gap"],
        shifted_test=shift_logits(model, splits["test"], root, batch, prep),
        shifted_valid=(
            shift_logits(model, splits["valid"], root, batch, prep)
            if params.calibrate_on == "valid_and_shifted"
            else {}
        ),
        test_images=test_images,
        valid_images=valid_images,
    )


def monitoring_reference(
    splits: dict[str, pd.DataFrame],
    root: Path,
    prep: Preprocessing,
    scored: Scored,
    calibrated: np.ndarray,
    ood: Mahalanobis,
    ood_threshold: float,
    abstain: float,
) -> dict[str, Any]:
    """The monitoring profile of the valid and test splits (chestct.monitoring.signals), with
    the calibrated probabilities and OOD distances the service would have answered."""
    frames = (splits["valid"], splits["test"])
    originals = [
        o for f in frames for o in (f["original"] if "original" in f else [None] * len(f))
    ]
    images = np.concatenate([scored.valid_images, scored.test_images])
    return fit_reference(
        classes=CLASSES,
        probabilities=calibrated,
        ood_distance=np.concatenate(
            [ood.distance(scored.valid["gap"]), ood.distance(scored.test["gap"])]
        ),
        ood_threshold=ood_threshold,
        abstain_threshold=abstain,
        greys=decoded_greys(originals, root, images),
        labels=[*splits["valid"]["label"], *splits["test"]["label"]],
        body_crop=prep.crop == "body",  # serving reuses its crop's box: so does this
    )


def calibration_record(
    fit: TemperatureFit,
    fitted_on: str,
    params: EvaluateParams,
    abstain: float,
    ood_threshold: float,
    family: str,
) -> dict[str, Any]:
    """calibration.json: the temperature, abstention and OOD thresholds and their rules, which
    promote copies into the model card."""
    return {
        "temperature": fit.temperature,
        "temperature_fitted": fit.fitted,
        "temperature_reason": fit.reason
        if not fit.fitted
        else f"fitted on {fitted_on} (evaluate.calibrate_on: {params.calibrate_on})",
        "temperature_fit_on": params.calibrate_on,
        "valid_nll_before": fit.nll_before,
        "valid_nll_after": fit.nll_after,
        "abstain_entropy": abstain,
        "abstain_rule": (
            f"the {params.abstain_quantile:g} quantile of normalised predictive entropy "
            "(calibrated) over correctly classified validation images"
        ),
        "family": family,
        "ood_threshold": ood_threshold,
        "ood_rule": (
            f"the {params.ood_quantile:g} quantile of Mahalanobis distances of validation GAP "
            "features to the train split's mean, with Ledoit-Wolf precision"
        ),
    }


def where_it_looks(
    model: Artefact,
    explainer: Any,
    test: pd.DataFrame,
    root: Path,
    prep: Preprocessing,
    scored: Scored,
) -> LungAttention:
    """The share of each test image's explanation inside the lungs: the CAM of the CNN (the
    ensemble's CNN member), the occlusion map of the texture model (what /explain draws)."""
    predicted = np.argmax(scored.test["logits"], axis=1)
    if explainer is None:
        head = model.head
        features = scored.test["features"]
        heats = [head.cam(f, int(k)) for f, k in zip(features, predicted, strict=True)]
    else:
        heats = [
            occlusion_map(explainer, x, int(k))
            for x, k in zip(scored.test_images, predicted, strict=True)
        ]
    # The lungs are looked for on the slices as acquired, the map put back over them through
    # the crop the preprocessing made (as /explain does).
    greys, _ = original_slices(test, root)
    return lung_attention(
        greys,
        [prepare_slice(g, prep).box for g in greys],
        heats,
        prep.resize,
    )
