"""evaluate: score the trained model on the test split, clean and under the shift stress
(chestct.imaging.perturb.SHIFTS applied to the ingested originals), calibrate it on the valid
split,
score the external test set when params name one, and draw the pictures. The only stage that
writes metrics (reports/evaluate/, git-tracked; the rest in artifacts/evaluate/).

Outputs in reports/evaluate/ (`cache: false` in dvc.yaml, so DVC compares them across commits):
metrics.json (dvc metrics: clean metrics, the `shift` block and robust_macro_f1), external.json
(dvc metrics, reported apart; never selected on) and the `dvc plots` tables confusion.csv,
reliability.csv, shift.csv. In artifacts/evaluate/: roc.csv, predictions.csv (one row per test
image), calibration.json (temperature, abstention and OOD thresholds for promote's model card),
ood.npz (mean and precision of GAP features on the train split), reference.json (the monitoring
profile of the valid and test splits, chestct.monitoring.signals) and the pictures confusion.png,
roc.png, reliability.png, shift.png, misclassified.png, gradcam.png.

Both metrics files also carry (chestct.evaluation.novelty) the nearest-neighbour memorizer
(`baseline.nearest_neighbour.*`, `baseline.model_above.*`), the model on the near-copy and the
novel part apart (`near_copy.*`, `novel.*`, `near_copy_share`) and bootstrap intervals that
resample groups (`ci.<metric>.low/high`, chestct.evaluation.uncertainty); metrics.json also the
share of
the attention map inside the lung field (`attention.*`, chestct.evaluation.attention)."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chestct.data.manifest import DATASET_COLUMNS, read_manifest, write_manifest
from chestct.evaluation.attention import LungAttention, lung_attention, outline
from chestct.evaluation.external import external_set, score_external
from chestct.evaluation.metrics import ReliabilityBin, confusion, reliability, roc_curves
from chestct.evaluation.novelty import (
    TrainReference,
    assess,
    assess_files,
    describe,
    frame_thumbnails,
    item_groups,
)
from chestct.evaluation.plots import (
    plot_confusion,
    plot_gallery,
    plot_reliability,
    plot_roc,
    plot_shift,
)
from chestct.evaluation.scoring import (
    Preprocessing,
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
from chestct.fsutil import atomic_write_json, staged_file
from chestct.imaging.perturb import SHIFTS
from chestct.imaging.preparation import prepare_slice
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
from chestct.model.families import (
    cam_head_of,
    explainer_of,
    family_of,
    held_out_valid_logits,
    kept_calibration,
)
from chestct.model.gradcam import CamHead, overlay
from chestct.model.texture import occlusion_map
from chestct.monitoring.signals import REFERENCE_FILE, decoded_greys, fit_reference
from chestct.pointers import PointerError, lineage_tags, read_pointer
from chestct.runner import StageFailed, run_main, stage_session
from chestct.settings import STAGES, EvaluateParams
from chestct.tracking import flatten

log = logging.getLogger(__name__)

PLOTS = (
    "confusion.png",
    "roc.png",
    "reliability.png",
    "shift.png",
    "misclassified.png",
    "gradcam.png",
    "attention.png",
)


# --------------------------------------------------------------------------- the stage's work


@dataclass(frozen=True)
class Evaluation:
    """Everything evaluate measured: what it writes and what its pictures are drawn from."""

    metrics: dict[str, Any]
    predictions: pd.DataFrame
    calibration: dict[str, Any]
    ood: Mahalanobis
    reliability_before: list[ReliabilityBin]
    reliability_after: list[ReliabilityBin]
    images: np.ndarray  # the test images, (n, s, s, 1)
    features: np.ndarray  # their last feature maps, (n, h, w, c)
    cam_head: CamHead | None  # None for the texture family: its gallery shows occlusion maps
    reference: dict[str, Any]  # the monitoring profile (chestct.monitoring.signals)
    external: dict[str, Any]  # external.json: {"source": ""} when evaluate.external is off
    external_predictions: pd.DataFrame | None = None
    attention: LungAttention | None = (
        None  # CAM mass inside the lungs (chestct.evaluation.attention)
    )
    family: str = "cnn"
    explainer: Any = None  # the texture model, for occlusion maps (families.explainer_of)


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
        return fit_temperature(y_valid, valid_logits), "the validation split"
    logits = np.concatenate([valid_logits, *shifted_valid.values()])
    y = np.concatenate([y_valid] * (1 + len(shifted_valid)))
    fit = fit_temperature(y, logits)
    return fit, f"the validation split and its {len(shifted_valid)} shifted copies"


def run_evaluate(
    model_path: Path,
    splits: dict[str, pd.DataFrame],
    params: EvaluateParams,
    root: Path,
    preprocessing: Preprocessing | None = None,
    class_map: dict[str, str] | None = None,
    near_copy_similarity: float = 0.9,
    seed: int = 0,
) -> Evaluation:
    """Score the test split, clean and under the shift-stress set; fit temperature, abstention
    and OOD thresholds on valid/train; score the external set when params name one.

    Args:
        model_path: the trained .keras model.
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
        raise StageFailed(f"evaluate needs the splits train, valid and test; missing {missing}")
    if splits["test"].empty or splits["valid"].empty:
        raise StageFailed("the test or valid split is empty; check the split stage's output")
    prep = preprocessing or Preprocessing()
    model = load_model(model_path)
    size = int(model.input_shape[1])
    names = ["logits", "probabilities", "gap", "features"]
    test_images = load_images(splits["test"], root, size, prep)
    test = model_outputs(model, test_images, params.batch_size, names)
    valid_images = load_images(splits["valid"], root, size, prep)
    valid = model_outputs(model, valid_images, params.batch_size, ["logits", "gap"])
    train_gap = model_outputs(
        model, load_images(splits["train"], root, size, prep), params.batch_size, ["gap"]
    )["gap"]
    shifted_test = shift_logits(model, splits["test"], root, params.batch_size, prep)
    shifted_valid = (
        shift_logits(model, splits["valid"], root, params.batch_size, prep)
        if params.calibrate_on == "valid_and_shifted"
        else {}
    )

    y_test = label_indices(list(splits["test"]["label"]))
    y_valid = label_indices(list(splits["valid"]["label"]))
    kept = kept_calibration(model)  # a texture model refit on train + valid has seen valid
    fit, fitted_on = (
        (TemperatureFit(1.0, False, kept, None, None), "")
        if kept
        else fit_calibration(y_valid, valid["logits"], shifted_valid, params.calibrate_on)
    )
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
    t = fit.temperature
    calibrated_test = softmax(test["logits"], t)
    held_out = held_out_valid_logits(model, len(y_valid))  # a refit texture model's, pre-refit
    calibrated_valid = softmax(valid["logits"] if held_out is None else held_out, t)
    abstain = abstain_threshold(y_valid, calibrated_valid, params.abstain_quantile)

    if len(train_gap) < 2:
        raise StageFailed(
            f"the train split has {len(train_gap)} image(s); the out-of-distribution statistics "
            "need at least two: check the split stage's output"
        )
    ood = Mahalanobis.fit(train_gap)
    ood_threshold = float(np.quantile(ood.distance(valid["gap"]), params.ood_quantile))
    test_distance = ood.distance(test["gap"])
    frames = (splits["valid"], splits["test"])
    originals = [
        o for f in frames for o in (f["original"] if "original" in f else [None] * len(f))
    ]
    reference = fit_reference(
        classes=CLASSES,
        probabilities=np.concatenate([calibrated_valid, calibrated_test]),
        ood_distance=np.concatenate([ood.distance(valid["gap"]), test_distance]),
        ood_threshold=ood_threshold,
        abstain_threshold=abstain,
        greys=decoded_greys(originals, root, np.concatenate([valid_images, test_images])),
        labels=[*splits["valid"]["label"], *splits["test"]["label"]],
        body_crop=prep.normalise.crop == "body",  # serving reuses its crop's box: so does this
    )

    metrics = full_metrics(y_test, test["logits"], t, shifted_test)
    metrics.update(
        {
            "temperature": t,
            "abstain_rate": float(np.mean(abstains(normalised_entropy(calibrated_test), abstain))),
            "ood_rate": float(np.mean(out_of_distribution(test_distance, ood_threshold))),
        }
    )
    calibration = {
        "temperature": t,
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
        "family": family_of(model_path),
        "ood_threshold": ood_threshold,
        "ood_rule": (
            f"the {params.ood_quantile:g} quantile of Mahalanobis distances of validation GAP "
            "features to the train split's mean, with Ledoit-Wolf precision"
        ),
    }
    predictions = prediction_table(splits["test"], softmax(test["logits"]))
    predictions["entropy_calibrated"] = normalised_entropy(calibrated_test)
    predictions["ood_distance"] = test_distance
    for column, values in shift_predictions(shifted_test).items():
        predictions[column] = values
    reference_set = TrainReference.from_frame(splits["train"], root, near_copy_similarity)
    test_thumbs = frame_thumbnails(splits["test"], root)
    novelty = assess(
        reference_set,
        test_thumbs,
        y_test,
        softmax(test["logits"]),
        calibrated_test,
        item_groups(splits["test"], test_thumbs, near_copy_similarity),
        resamples=params.bootstrap_resamples,
        confidence=params.confidence,
        seed=seed,
    )
    metrics.update(novelty.metrics)
    for column, values in novelty.columns.items():
        predictions[column] = values
    log.info("test: %s", describe(novelty.metrics))
    external, external_predictions = run_external(
        model, params, root, prep, t, class_map, reference_set, seed
    )
    head = cam_head_of(model)
    explainer = explainer_of(model)
    predicted = np.argmax(test["logits"], axis=1)
    # Where the model looks: the CAM of the CNN (the ensemble's CNN member), the occlusion map
    # of the texture model (what /explain draws for each family).
    if head is not None:
        heats = [head.cam(f, int(k)) for f, k in zip(test["features"], predicted, strict=True)]
    else:
        heats = [
            occlusion_map(explainer, x, int(k))
            for x, k in zip(test_images, predicted, strict=True)
        ]
    # The lungs are looked for on the slices as acquired, the map put back over them through
    # the crop the preprocessing made (as /explain does).
    greys, _ = original_slices(splits["test"], root)
    size = int(test_images.shape[1])
    attention = lung_attention(
        greys,
        [prepare_slice(g, size, prep.interpolation, prep.mode, prep.normalise).box for g in greys],
        heats,
        prep.mode,
    )
    metrics["attention"] = attention.summary(list(splits["test"]["label"]))
    return Evaluation(
        metrics=metrics,
        predictions=predictions,
        calibration=calibration,
        ood=ood,
        reliability_before=reliability(y_test, softmax(test["logits"])),
        reliability_after=reliability(y_test, calibrated_test),
        images=test_images,
        features=test["features"],
        cam_head=head,
        reference=reference,
        external=external,
        external_predictions=external_predictions,
        attention=attention,
        family=family_of(model_path),
        explainer=explainer_of(model),
    )


def run_external(
    model: Any,
    params: EvaluateParams,
    root: Path,
    preprocessing: Preprocessing,
    temperature: float,
    class_map: dict[str, str] | None = None,
    reference: TrainReference | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """external.json's content and the predictions on params `evaluate.external`.

    Reported apart from metrics.json and never used for selection, calibration or thresholds:
    it is scored with the temperature fitted on valid, after everything else is decided. With
    the training slices (`reference`) it also gets the memorizer, the novelty split and the
    intervals, its groups being the series its slices form by similarity.
    """
    if not params.external:
        return {"source": "", "n": 0}, None
    with tempfile.TemporaryDirectory(prefix="chestct-external-") as staging:
        try:
            found = external_set(params.external, root, Path(staging), class_map)
            metrics, predictions = score_external(
                model, found, preprocessing, params.batch_size, temperature, root
            )
            if reference is not None:
                novelty = assess_files(
                    reference,
                    [f for _, f in found.files],
                    predictions,
                    temperature,
                    preprocessing.window,
                    resamples=params.bootstrap_resamples,
                    confidence=params.confidence,
                    seed=seed,
                )
                metrics.update(novelty.metrics)
                for column, values in novelty.columns.items():
                    predictions[column] = values
                log.info("external: %s", describe(metrics))
        except ScoringError as exc:
            raise StageFailed(str(exc)) from None
    log.info(
        "external set %s: %d images, macro-F1 %.4f, balanced accuracy %.4f, ECE %.4f",
        found.origin,
        metrics["n"],
        metrics["macro_f1"],
        metrics["balanced_accuracy"],
        metrics["ece_calibrated"],
    )
    return {"source": found.origin, "digest": found.digest, **metrics}, predictions


# --------------------------------------------------------------------------- plot data


def roc_table(predictions: pd.DataFrame) -> pd.DataFrame:
    """True-positive rate per class on a shared false-positive-rate grid (for dvc plots)."""
    proba = predictions[[f"p_{c}" for c in CLASSES]].to_numpy()
    fpr, curves = roc_curves(label_indices(list(predictions["actual"])), proba)
    return pd.DataFrame({"fpr": fpr, **curves})


def reliability_table(before: list[ReliabilityBin], after: list[ReliabilityBin]) -> pd.DataFrame:
    """One row per confidence bin, before and after temperature scaling."""
    rows = []
    for b, a in zip(before, after, strict=True):
        rows.append(
            {
                "bin_mid": round((b.lower + b.upper) / 2, 6),
                "count": b.count,
                "confidence": b.confidence,
                "accuracy": b.accuracy,
                "count_calibrated": a.count,
                "confidence_calibrated": a.confidence,
                "accuracy_calibrated": a.accuracy,
            }
        )
    return pd.DataFrame(rows)


def shift_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """One row per condition, the clean test split first, then each shift of perturb.SHIFTS."""
    rows = [
        {
            "perturbation": "clean",
            "macro_f1": metrics["macro_f1"],
            "balanced_accuracy": metrics["balanced_accuracy"],
            "ece_calibrated": metrics["ece_calibrated"],
        }
    ]
    for shift in SHIFTS:
        m = metrics["shift"][shift.name]
        rows.append(
            {
                "perturbation": shift.name,
                "macro_f1": m["macro_f1"],
                "balanced_accuracy": m["balanced_accuracy"],
                "ece_calibrated": m["ece_calibrated"],
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- pictures


def misclassified_tiles(ev: Evaluation, limit: int = 16) -> list[tuple[np.ndarray, str]]:
    """The most confident mistakes first."""
    p = ev.predictions
    wrong = p.index[p["actual"] != p["predicted"]]
    order = p.loc[wrong].sort_values("confidence", ascending=False).index[:limit]
    return [
        (
            ev.images[i].astype(np.uint8),
            f"{p.at[i, 'actual']}\n→ {p.at[i, 'predicted']} ({p.at[i, 'confidence']:.2f})",
        )
        for i in order
    ]


def gradcam_tiles(ev: Evaluation, per_class: int) -> list[tuple[np.ndarray, str]]:
    """Per class: the `per_class` most confident correct images and the `per_class` worst
    (lowest probability for their true class), each with the CAM of the predicted class."""
    p = ev.predictions
    tiles = []
    for name in CLASSES:
        mine = p[p["actual"] == name]
        top = mine[mine["predicted"] == name].sort_values(f"p_{name}", ascending=False)
        worst = mine.sort_values(f"p_{name}", ascending=True)
        picks = [(i, "top") for i in top.index[:per_class]]
        picks += [(i, "worst") for i in worst.index[:per_class] if i not in top.index[:per_class]]
        for i, kind in picks:
            predicted = CLASSES.index(p.at[i, "predicted"])
            if ev.cam_head is not None:
                heat, what = ev.cam_head.cam(ev.features[i], predicted), "CAM"
            else:
                heat = occlusion_map(ev.explainer, ev.images[i][..., 0], predicted)
                what = "occlusion"
            probability = p.at[i, f"p_{name}"]
            caption = f"{kind} {name}\np={probability:.2f}, {what} of {CLASSES[predicted]}"
            tiles.append((overlay(ev.images[i], heat), caption))
    return tiles


def attention_tiles(ev: Evaluation, limit: int = 8) -> list[tuple[np.ndarray, str]]:
    """The test images whose predicted-class CAM has the least mass inside the lungs, with the
    lung field outlined."""
    if ev.attention is None:
        return []
    p = ev.predictions
    tiles = []
    a = ev.attention
    for i in a.worst(limit):
        heat = a.heats[i] / max(float(a.heats[i].max()), 1e-6)
        tiles.append(
            (
                outline(overlay(a.greys[i], heat), a.masks[i]),
                f"{p.at[i, 'actual']} → {p.at[i, 'predicted']}\nlung share {a.shares[i]:.2f}",
            )
        )
    return tiles


def write_outputs(
    ev: Evaluation, out: Path, params: EvaluateParams, reports: Path | None = None
) -> dict[str, Path]:
    """Write OOD statistics, predictions and pictures into `out`, metrics and plot tables into
    `reports` (default `out`; the stage passes reports/evaluate/, which git tracks); returns
    the files by name."""
    reports = out if reports is None else reports
    reports.mkdir(parents=True, exist_ok=True)
    files = {
        "metrics": reports / "metrics.json",
        "predictions": out / "predictions.csv",
        "calibration": out / "calibration.json",
        "ood": out / "ood.npz",
        "reference": out / REFERENCE_FILE,
        "confusion": reports / "confusion.csv",
        # Four curves in one table: drawn by a top-level plot of dvc.yaml only, so it stays a
        # cached output (a stage-level plot takes one y column).
        "roc": out / "roc.csv",
        "reliability": reports / "reliability.csv",
        "shift": reports / "shift.csv",
        "external": reports / "external.json",
    }
    atomic_write_json(files["metrics"], ev.metrics)
    atomic_write_json(files["external"], ev.external)
    if ev.external_predictions is not None:
        files["external_predictions"] = out / "external_predictions.csv"
        write_manifest(files["external_predictions"], ev.external_predictions)
    write_manifest(files["predictions"], ev.predictions)
    atomic_write_json(files["calibration"], ev.calibration)
    atomic_write_json(files["reference"], ev.reference)
    with staged_file(files["ood"]) as tmp, tmp.open("wb") as fh:
        np.savez(fh, mean=ev.ood.mean, precision=ev.ood.precision)
    # dvc plots' confusion template reads one row per image with these two columns.
    write_manifest(files["confusion"], ev.predictions[["actual", "predicted"]])
    roc = roc_table(ev.predictions)
    write_manifest(files["roc"], roc)
    table = reliability_table(ev.reliability_before, ev.reliability_after)
    write_manifest(files["reliability"], table)
    shifts = shift_table(ev.metrics)
    write_manifest(files["shift"], shifts)
    plot_shift(shifts, out / "shift.png")

    actual, predicted = (label_indices(list(ev.predictions[c])) for c in ("actual", "predicted"))
    plot_confusion(confusion(actual, predicted), out / "confusion.png")
    plot_roc(roc, ev.metrics["roc_auc_per_class"], out / "roc.png")
    plot_reliability(
        table, (ev.metrics["ece"], ev.metrics["ece_calibrated"]), out / "reliability.png"
    )
    plot_gallery(
        misclassified_tiles(ev),
        out / "misclassified.png",
        "Misclassified test images, most confident first",
    )
    plot_gallery(
        gradcam_tiles(ev, params.gallery_per_class),
        out / "gradcam.png",
        "Grad-CAM: top-confidence and worst cases per class"
        if ev.cam_head is not None
        else "Occlusion of body tiles (texture model): top-confidence and worst cases per class",
    )
    plot_gallery(
        attention_tiles(ev),
        out / "attention.png",
        ("Grad-CAM" if ev.cam_head is not None else "Occlusion-map")
        + " mass outside the lungs (outlined): the worst test images",
    )
    return files


def memorizer_tags(metrics: dict[str, Any], threshold: float) -> dict[str, str]:
    """MLflow tags saying how the memorizer was built and how far the model is above it."""
    above = metrics["baseline"]["model_above"]
    return {
        "chestct.baseline": "nearest_neighbour: label of the most correlated training slice "
        "(body-cropped 32x32 thumbnails of the ingested originals, Pearson)",
        "chestct.near_copy_similarity": f"{threshold:g}",
        "chestct.above_memorizer": ", ".join(f"{k} {v:+.4f}" for k, v in above.items()),
    }


def upstream_params(paths: Any, upto: str, own: Sequence[str]) -> dict[str, str]:
    """The params every upstream stage ran with, flattened as MLflow params ("train.epochs").

    Logged on the evaluate run so that `mlflow ui` shows, side by side, the settings that
    produced each set of test metrics. Groups in `own` are left out: the run logs them already.
    """
    groups: dict[str, Any] = {}
    for stage in STAGES[: STAGES.index(upto)]:
        try:
            params = read_pointer(paths, stage, verify=False).params
        except PointerError:
            continue
        groups.update({g: v for g, v in params.items() if g not in own})
    return {
        k: json.dumps(v) if isinstance(v, list | dict) else str(v)
        for k, v in flatten(groups).items()
    }


def resize_preprocessing(paths: Any) -> Preprocessing:
    """The preprocessing the resize stage really ran with (its pointer's params), so that
    shifted and external images are prepared exactly like the training images."""
    resize_params = read_pointer(paths, "resize", verify=False).params.get("resize", {})
    try:
        ingest = read_pointer(paths, "ingest", verify=False).params.get("ingest", {})
    except PointerError:  # the window only matters for DICOM files of the external set
        ingest = {}
    return Preprocessing.from_spec({**resize_params, "window": ingest.get("window")})


def ingested_class_map(paths: Any) -> dict[str, str]:
    """params `ingest.class_map` as ingest ran, for the external set's folder names."""
    try:
        return dict(read_pointer(paths, "ingest", verify=False).params["ingest"]["class_map"])
    except (PointerError, KeyError, TypeError):
        return {}


def main() -> None:
    with stage_session("evaluate") as session:
        s = session.settings
        root = s.paths.root
        validate = read_pointer(s.paths, "validate")
        train = read_pointer(s.paths, "train")
        splits = {
            name: read_manifest(validate.output_path(name, root), DATASET_COLUMNS)
            for name in ("train", "valid", "test")
        }
        session.log_manifest(
            "test split", validate.output_path("test", root), splits["test"], "testing"
        )
        ev = run_evaluate(
            train.output_path("model", root),
            splits,
            s.params.evaluate,
            root,
            resize_preprocessing(s.paths),
            ingested_class_map(s.paths),
            s.params.base.near_copy_similarity,
            s.params.base.seed,
        )
        out = session.out_dir
        files = write_outputs(ev, out, s.params.evaluate, s.paths.report_dir("evaluate"))

        import mlflow

        mlflow.set_tags(lineage_tags(s.paths, "evaluate"))
        mlflow.set_tags(memorizer_tags(ev.metrics, s.params.base.near_copy_similarity))
        mlflow.log_params(upstream_params(s.paths, "evaluate", list(session.params)))
        for name in PLOTS:
            session.log_artifact(out / name, "plots")
        for name in ("predictions", "calibration", "roc", "reliability", "shift", "external"):
            session.log_artifact(files[name])
        if ev.external_predictions is not None:
            session.log_artifact(files["external_predictions"])
            # Reported apart: prefixed, and never in metrics.json, which promote selects on.
            session.log_metrics({"external": ev.external})
        shift = ev.metrics["shift"]
        log.info(
            "test: macro-F1 %.4f, balanced accuracy %.4f, ECE %.4f -> %.4f (T=%.3f); shift "
            "stress: worst macro-F1 %.4f (%s), mean %.4f, ECE worst %.4f mean %.4f; "
            "robust macro-F1 %.4f",
            ev.metrics["macro_f1"],
            ev.metrics["balanced_accuracy"],
            ev.metrics["ece"],
            ev.metrics["ece_calibrated"],
            ev.metrics["temperature"],
            shift["worst_macro_f1"],
            shift["worst_shift"],
            shift["mean_macro_f1"],
            shift["worst_ece"],
            shift["mean_ece"],
            ev.metrics["robust_macro_f1"],
        )
        session.finish(
            inputs=["validate", "train"],
            outputs={
                k: files[k]
                for k in ("metrics", "predictions", "calibration", "ood", "external", "reference")
            },
            metrics=ev.metrics,
            details={"calibration": ev.calibration},
        )


if __name__ == "__main__":
    run_main("evaluate", main)
