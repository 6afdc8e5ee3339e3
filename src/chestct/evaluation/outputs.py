"""What evaluate writes: metrics, predictions, calibration, OOD statistics, the plot tables of
`dvc plots` and the pictures, from one `Evaluation` (chestct.stages.evaluate measures it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from chestct.data.manifest import write_manifest
from chestct.evaluation.attention import LungAttention, outline
from chestct.evaluation.metrics import ReliabilityBin, confusion, roc_curves
from chestct.evaluation.plots import (
    plot_confusion,
    plot_gallery,
    plot_reliability,
    plot_roc,
    plot_shift,
)
from chestct.evaluation.scoring import label_indices
from chestct.fsutil import atomic_write_json, staged_file
from chestct.imaging.perturb import SHIFTS
from chestct.labels import CLASSES
from chestct.model.calibration import Mahalanobis
from chestct.model.gradcam import CamHead, overlay
from chestct.model.texture import occlusion_map
from chestct.settings import EvaluateParams

PLOTS = (
    "confusion.png",
    "roc.png",
    "reliability.png",
    "shift.png",
    "misclassified.png",
    "gradcam.png",
    "attention.png",
)


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


def write_files(
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
